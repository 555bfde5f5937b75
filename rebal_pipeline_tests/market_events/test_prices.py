"""The intraday prices drop file (rebal_pipeline/market_events/prices.py): read strictly, archived
untouched, every bad row a reject naming its line and column, and the reference basket's move
worked out by hand.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from collections import Counter
from datetime import UTC, date, datetime
from decimal import Decimal as D
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from rebal_pipeline.core.policy import MarketEventRule
from rebal_pipeline.market_events.prices import (
    INTRADAY_FOLDER,
    PriceReject,
    PricesFileError,
    archive_drop,
    archive_snapshot,
    basket_move,
    basket_of,
    exceeds,
    intraday_dir,
    read_session_closes,
    read_snapshot,
    snapshots,
    write_rejects,
)
from rebal_pipeline.sandbox.generator import SandboxConfig, generate_feed
from rebal_pipeline.sandbox.intraday import shocked_prices, write_intraday_prices

DAY = date(2026, 11, 20)  # a Friday session; New York is on EST (-05:00)
PREVIOUS_SESSION = date(2026, 11, 19)
BASKET = [("VTI", D("0.6")), ("VEA", D("0.2")), ("BND", D("0.2"))]
CLOSES = {"VTI": D("280.00"), "VEA": D("50.00"), "BND": D("73.00")}
T = "2026-11-20T14:31:00-05:00"
SHOWN = "intraday/2026-11-20/prices_143100.csv"


def drop(feed_root: Path, content: bytes | str, name: str = "prices_143100.csv") -> Path:
    folder = intraday_dir(feed_root, DAY)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_bytes(content.encode("utf-8") if isinstance(content, str) else content)
    return path


# --------------------------------------------------------------------------------------------
# The basket's move


def test_the_move_is_the_weighted_sum_of_each_symbols_move():
    # VTI 280 → 271.60: 271.6/280 − 1 = −0.03, × 0.6 = −0.018
    # VEA  50 →  48.50:  48.5/50  − 1 = −0.03, × 0.2 = −0.006
    # BND  73 →  73.00:  73/73    − 1 =  0,    × 0.2 =  0
    # move = −0.018 − 0.006 + 0 = −0.024: under the 3% threshold either way.
    prices = {"VTI": D("271.60"), "VEA": D("48.50"), "BND": D("73.00")}
    move = basket_move(BASKET, CLOSES, prices)
    assert move == D("-0.024")
    assert str(move) == "-0.02400000"  # quantized to 1e-8
    assert not exceeds(move, D("0.03"))


def test_the_move_is_rounded_half_even_to_one_hundred_millionth():
    # 4/3 − 1 = 0.333333333… → 0.33333333
    assert basket_move([("A", D(1))], {"A": D(3)}, {"A": D(4)}) == D("0.33333333")
    # 0.5 × (1.00000001/1 − 1) = 0.000000005: a tie, to the even 0.00000000
    assert basket_move([("A", D("0.5"))], {"A": D(1)}, {"A": D("1.00000001")}) == D("0.00000000")
    # 0.5 × 0.00000003 = 0.000000015: a tie, to the even 0.00000002
    assert basket_move([("A", D("0.5"))], {"A": D(1)}, {"A": D("1.00000003")}) == D("0.00000002")


def test_an_incomplete_basket_has_no_move_and_never_triggers():
    crash = {"VTI": D("200.00"), "VEA": D("30.00")}  # −28.6% and −40%, but BND has no price
    assert basket_move(BASKET, CLOSES, crash) is None
    assert not exceeds(basket_move(BASKET, CLOSES, crash), D("0.03"))
    no_reference = {"VTI": D("280.00"), "VEA": D("50.00")}
    assert basket_move(BASKET, no_reference, {**crash, "BND": D("73")}) is None
    zero_reference = {**CLOSES, "BND": D("0")}
    assert basket_move(BASKET, zero_reference, {**crash, "BND": D("73")}) is None
    # A symbol outside the basket, priced or not, changes nothing.
    assert basket_move(BASKET, CLOSES, {**CLOSES, "QQQ": D("1")}) == D("0")


def test_a_move_of_exactly_the_threshold_triggers_either_way():
    assert exceeds(D("-0.03"), D("0.03"))
    assert exceeds(D("0.03"), D("0.03"))
    assert not exceeds(D("-0.02999999"), D("0.03"))
    assert not exceeds(D("0.02999999"), D("0.03"))
    assert not exceeds(None, D("0.03"))


def test_the_policys_basket_and_a_whole_basket_three_percent_down():
    rule = MarketEventRule()
    assert basket_of(rule) == BASKET
    shocked = shocked_prices(CLOSES, D("-0.03"))
    # 280 × 0.97 = 271.60, 50 × 0.97 = 48.50, 73 × 0.97 = 70.81: each −3%, so the basket −3%.
    assert shocked == {"VTI": D("271.60"), "VEA": D("48.50"), "BND": D("70.81")}
    move = basket_move(basket_of(rule), CLOSES, shocked)
    assert move == D("-0.03")
    assert exceeds(move, rule.threshold)


# --------------------------------------------------------------------------------------------
# shocked_prices


def test_shocked_prices_moves_the_chosen_symbols_to_the_cent_and_leaves_cash():
    closes = {**CLOSES, "CASH": D("1.00"), "X": D("1.05")}
    # Default: every symbol but CASH. 1.05 × 0.9 = 0.945 → 0.95 (half-up, as the sandbox's closes).
    assert shocked_prices(closes, D("-0.1")) == {
        "VTI": D("252.00"), "VEA": D("45.00"), "BND": D("65.70"), "CASH": D("1.00"), "X": D("0.95")}
    # Only VTI and VEA: the −0.024 day of the first test.
    assert shocked_prices(CLOSES, D("-0.03"), ["VTI", "VEA"]) == {
        "VTI": D("271.60"), "VEA": D("48.50"), "BND": D("73.00")}
    with pytest.raises(KeyError, match="no close for QQQ"):
        shocked_prices(CLOSES, D("-0.03"), ["QQQ"])
    with pytest.raises(ValueError, match="leaves no positive price"):
        shocked_prices(CLOSES, D("-1"))


# --------------------------------------------------------------------------------------------
# Reading a drop file


def test_good_rows_give_prices_and_the_latest_time_of_a_price(tmp_path):
    path = drop(tmp_path, "symbol,price,priced_at\r\n"
                          f"VTI,271.60,{T}\r\n"
                          "VEA,48.5,2026-11-20T19:32:00Z\r\n"
                          "\r\n"  # a blank line: skipped, counted
                          "BND,73.000001,2026-11-20T14:30:59.5-05:00\r\n")
    snap = read_snapshot(path, feed_root=tmp_path)
    assert snap.prices == {"VTI": D("271.60"), "VEA": D("48.5"), "BND": D("73.000001")}
    # 19:32Z (14:32 New York) is the latest of 14:31, 14:32 and 14:30:59.5.
    assert snap.priced_at == datetime(2026, 11, 20, 19, 32, tzinfo=UTC)
    assert snap.priced_at.utcoffset().total_seconds() == 0
    assert snap.rejects == ()
    assert snap.day == DAY
    assert snap.shown_as == SHOWN
    assert snap.size == len(path.read_bytes())
    assert snap.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_byte_order_mark_and_quoted_values_are_read(tmp_path):
    path = drop(tmp_path, b'\xef\xbb\xbf"symbol","price","priced_at"\n"VTI","271.60","' + T.encode() + b'"\n')
    assert read_snapshot(path).prices == {"VTI": D("271.60")}


NYT = "2026-11-20T14:31:00-05:00"
NOT_A_DECIMAL = "not a decimal number (plain digits with an optional '.', no sign, exponent or thousands separator)"
EXAMPLE = "e.g. 2026-11-20T14:31:00-05:00 or 2026-11-20T19:31:00Z"
EVERY_REJECT = f"""symbol,price,priced_at
VTI,271.60,{NYT}
BND
AGG,98.09,{NYT},extra
,98.09,{NYT}
 GLD,246.39,{NYT}
BRK B,1.00,{NYT}
IAU,1e3,{NYT}
IEF,0,{NYT}
TIP,-1.5,{NYT}
VNQ,88.1234567,{NYT}
MUB,,{NYT}
QQQ,1000000.01,{NYT}
XOM,0.009,{NYT}
SCHB,23.56,2026-11-20T14:31:00
SCHX,22.41,20261120T143100Z
SCHH,21.56,2026-13-20T14:31:00Z
JPM,241.90,
MSFT,429.84,2026-11-21T05:00:00Z
JNJ,154.77,2026-11-20T04:59:59Z
VWO,43.99,{NYT}
VWO,43.99,{NYT}
IWF,411.12,2026-11-20T23:59:59-05:00
CASH,0.001,{NYT}
"""


def test_every_reject_names_its_line_column_reason_and_raw_value(tmp_path):
    snap = read_snapshot(drop(tmp_path, EVERY_REJECT), feed_root=tmp_path)
    assert snap.rejects == (
        PriceReject(3, "price", "1 field(s) but the header has 3 (no price value)", "BND"),
        PriceReject(4, "priced_at", "4 field(s) but the header has 3 (a value after priced_at)",
                    f"AGG,98.09,{NYT},extra"),
        PriceReject(5, "symbol", "symbol is empty", ""),
        PriceReject(6, "symbol", "leading or trailing whitespace in the symbol (without it: GLD)", " GLD"),
        PriceReject(7, "symbol", "not a symbol: it has whitespace, a quote or a control character inside", "BRK B"),
        PriceReject(8, "price", NOT_A_DECIMAL, "1e3"),
        PriceReject(9, "price", "price must be positive", "0"),
        PriceReject(10, "price", "price must be positive", "-1.5"),
        PriceReject(11, "price", "more than 6 decimal places", "88.1234567"),
        PriceReject(12, "price", "price is empty", ""),
        PriceReject(13, "price", "price above the plausibility limit of $1000000", "1000000.01"),
        PriceReject(14, "price", "price below the plausibility limit of $0.01 (rebal does not size trades in "
                                 "sub-penny prices)", "0.009"),
        PriceReject(15, "priced_at", f"priced_at has no UTC offset, so the moment is unknown ({EXAMPLE})",
                    "2026-11-20T14:31:00"),
        PriceReject(16, "priced_at", f"not an ISO-8601 date-time with a UTC offset ({EXAMPLE})", "20261120T143100Z"),
        PriceReject(17, "priced_at", f"not an ISO-8601 date-time with a UTC offset ({EXAMPLE})",
                    "2026-13-20T14:31:00Z"),
        PriceReject(18, "priced_at", "priced_at is empty", ""),
        # 05:00Z is midnight in New York: the next day.
        PriceReject(19, "priced_at", "priced_at is on 2026-11-21 in New York, not the folder's date 2026-11-20",
                    "2026-11-21T05:00:00Z"),
        # 04:59:59Z is 23:59:59 the evening before in New York.
        PriceReject(20, "priced_at", "priced_at is on 2026-11-19 in New York, not the folder's date 2026-11-20",
                    "2026-11-20T04:59:59Z"),
        PriceReject(21, "symbol", "symbol VWO is on 2 rows of the file: which price is right? (none of them is used)",
                    "VWO"),
        PriceReject(22, "symbol", "symbol VWO is on 2 rows of the file: which price is right? (none of them is used)",
                    "VWO"),
    )
    # Line 23 (23:59:59 New York, still the folder's date) and CASH at a tenth of a cent are good.
    assert snap.prices == {"VTI": D("271.60"), "IWF": D("411.12"), "CASH": D("0.001")}
    assert snap.priced_at == datetime(2026, 11, 21, 4, 59, 59, tzinfo=UTC)


def test_a_row_with_several_bad_values_gets_one_reject_for_each(tmp_path):
    path = drop(tmp_path, f"symbol,price,priced_at\nVTI,271.60,{NYT}\n VTI,-3,2026-11-20T14:31:00\n")
    snap = read_snapshot(path)
    # ' VTI' is VTI with a space: two rows claim VTI's price, so neither is used.
    duplicate = "symbol VTI is on 2 rows of the file: which price is right? (none of them is used)"
    assert [(r.line, r.column, r.reason) for r in snap.rejects] == [
        (2, "symbol", duplicate),
        (3, "symbol", "leading or trailing whitespace in the symbol (without it: VTI)"),
        (3, "symbol", duplicate),
        (3, "price", "price must be positive"),
        (3, "priced_at", f"priced_at has no UTC offset, so the moment is unknown ({EXAMPLE})"),
    ]
    assert snap.prices == {}


def test_a_file_whose_every_row_is_rejected_is_still_a_snapshot(tmp_path):
    snap = read_snapshot(drop(tmp_path, "symbol,price,priced_at\nVTI,0,2026-11-20T14:31:00Z\n"))
    assert snap.prices == {}
    assert snap.priced_at is None  # no price, so no time of a price
    assert [(r.line, r.column) for r in snap.rejects] == [(2, "price")]
    header_only = read_snapshot(drop(tmp_path, "symbol,price,priced_at\n", "prices_143200.csv"))
    assert (header_only.prices, header_only.priced_at, header_only.rejects) == ({}, None, ())


# File-level problems: (content, line, column, what the message says after the file's name).
FILE_ERRORS = {
    "unknown column": (
        b"symbol,price,priced_at,bid\n", 1, 24,
        "the header must be exactly symbol,price,priced_at: unknown column(s): 'bid' "
        "(it is 'symbol,price,priced_at,bid')"),
    "no header": (
        f"VTI,271.60,{NYT}\n".encode(), 1, 1,
        f"no header row: line 1 must be exactly symbol,price,priced_at (it is 'VTI,271.60,{NYT}')"),
    "missing column": (
        b"symbol,price\nVTI,271.60\n", 1, None,
        "the header must be exactly symbol,price,priced_at: missing column(s): priced_at (it is 'symbol,price')"),
    "out of order": (
        b"symbol,priced_at,price\n", 1, None,
        "the header must be exactly symbol,price,priced_at: the columns are out of order "
        "(it is 'symbol,priced_at,price')"),
    # Line 1 is 23 bytes with its LF, line 2 is 37: line 3 starts at byte 60. 'VÉA,4' is 5
    # characters but 6 bytes (É is two), so the bad byte is at offset 66, column 6.
    "not UTF-8": (
        f"symbol,price,priced_at\nVTI,271.60,{NYT}\nVÉA,4".encode() + b"\xff8.5," + NYT.encode() + b"\n", 3, 6,
        "not UTF-8: byte 0xff at byte offset 66 cannot be decoded"),
    "cut multi-byte character": (
        b"symbol,price,priced_at\nV\xc3", 2, 2,
        "not UTF-8: the file ends inside a multi-byte character (byte offset 24)"),
    "NUL byte": (
        b"symbol,price,priced_at\nVTI,27\x001.60," + NYT.encode() + b"\n", 2, 7,
        "a NUL byte (0x00) at byte offset 29: not a text file"),
    "CR-only line ends": (
        b"symbol,price,priced_at\rVTI,271.60," + NYT.encode() + b"\r", 1, 23,
        "a carriage return (CR) that does not end a line: lines must end with LF or CRLF"),
    "empty": (b"", None, None, "empty file: no header row (symbol,price,priced_at)"),
    "only a byte order mark": (b"\xef\xbb\xbf", None, None, "empty file: no header row (symbol,price,priced_at)"),
    "blank first line": (
        b"\nsymbol,price,priced_at\n", 1, None,
        "line 1 is blank: the header row (symbol,price,priced_at) must be line 1"),
    "unclosed quote": (
        f'symbol,price,priced_at\nVTI,"271.60,{NYT}\nVEA,48.50,{NYT}\n'.encode(), 2, None,
        "malformed CSV in the record starting on line 2: unexpected end of data"),
}


@pytest.mark.parametrize("case", FILE_ERRORS)
def test_a_file_level_problem_names_the_file_line_column_and_reason(tmp_path, case):
    content, line, column, reason = FILE_ERRORS[case]
    path = drop(tmp_path, content)
    with pytest.raises(PricesFileError) as caught:
        read_snapshot(path, feed_root=tmp_path)
    error = caught.value
    assert (error.file, error.line, error.column, error.reason) == (SHOWN, line, column, reason)
    where = "" if line is None else f", line {line}" + ("" if column is None else f", column {column}")
    assert str(error) == f"{SHOWN}{where}: {reason}"
    assert isinstance(error, ValueError)
    assert path.read_bytes() == content  # never modified


def test_a_file_over_the_size_limit_is_refused_unread(tmp_path):
    path = drop(tmp_path, f"symbol,price,priced_at\nVTI,271.60,{NYT}\n")  # 23 + 37 = 60 bytes
    with pytest.raises(PricesFileError) as caught:
        read_snapshot(path, feed_root=tmp_path, max_bytes=59)
    assert str(caught.value) == f"{SHOWN}: larger than the limit of 59 bytes (60 bytes)"
    assert read_snapshot(path, max_bytes=60).prices == {"VTI": D("271.60")}


def test_a_file_must_be_named_and_placed_as_a_drop_file(tmp_path):
    with pytest.raises(PricesFileError, match=r"not an intraday prices file name: 'prices_1431.csv' "
                                              r"\(expected prices_HHMMSS.csv\)"):
        read_snapshot(drop(tmp_path, "symbol,price,priced_at\n", "prices_1431.csv"))
    elsewhere = tmp_path / "intraday" / "today" / "prices_143100.csv"
    elsewhere.parent.mkdir(parents=True)
    elsewhere.write_text("symbol,price,priced_at\n")
    with pytest.raises(PricesFileError) as caught:
        read_snapshot(elsewhere, feed_root=tmp_path)
    assert str(caught.value) == ("intraday/today/prices_143100.csv: the folder 'today' is not a date "
                                 "(expected intraday/YYYY-MM-DD/prices_HHMMSS.csv)")
    with pytest.raises(PricesFileError, match="prices_143100.csv: no such file"):
        read_snapshot(intraday_dir(tmp_path, date(2026, 11, 23)) / "prices_143100.csv", feed_root=tmp_path)


# --------------------------------------------------------------------------------------------
# Archive and quarantine


def test_the_archive_is_a_byte_for_byte_copy_write_once_read_only_and_the_drop_is_untouched(tmp_path):
    content = f"symbol,price,priced_at\nVTI,271.60,{NYT}\nVEA,0,{NYT}\n".encode()
    path = drop(tmp_path / "feed", content)
    before = os.stat(path)
    snap = read_snapshot(path, feed_root=tmp_path / "feed")
    archived = archive_snapshot(snap, tmp_path / "archive")
    sha = hashlib.sha256(content).hexdigest()
    assert archived == tmp_path / "archive" / "sha256" / sha[:2] / sha
    assert archived.read_bytes() == content
    assert stat.S_IMODE(os.stat(archived).st_mode) == 0o440
    # Again (a sensor's second look), and a second drop with the same bytes: the same copy.
    assert archive_snapshot(snap, tmp_path / "archive") == archived
    twin = read_snapshot(drop(tmp_path / "feed", content, "prices_143200.csv"))
    assert archive_snapshot(twin, tmp_path / "archive") == archived
    assert sorted(p.name for p in archived.parent.iterdir()) == [sha]
    after = os.stat(path)
    assert path.read_bytes() == content
    assert (after.st_mode, after.st_mtime_ns, after.st_size) == (before.st_mode, before.st_mtime_ns, before.st_size)


def test_a_file_read_snapshot_refuses_is_still_archived_as_it_arrived(tmp_path):
    content = b"symbol,price,priced_at\nVTI,\xff\n"
    path = drop(tmp_path, content)
    with pytest.raises(PricesFileError):
        read_snapshot(path)
    archived = archive_drop(path, tmp_path / "archive")
    assert archived.read_bytes() == content
    assert stat.S_IMODE(os.stat(archived).st_mode) == 0o440


def test_a_file_changed_after_it_was_read_is_not_archived_as_the_snapshot(tmp_path):
    path = drop(tmp_path, f"symbol,price,priced_at\nVTI,271.60,{NYT}\n")
    snap = read_snapshot(path, feed_root=tmp_path)
    path.write_text(f"symbol,price,priced_at\nVTI,2716.0,{NYT}\n")
    with pytest.raises(PricesFileError) as caught:
        archive_snapshot(snap, tmp_path / "archive")
    now = hashlib.sha256(path.read_bytes()).hexdigest()
    assert str(caught.value) == (f"{SHOWN}: the file changed after it was read (SHA-256 {snap.sha256} when read, "
                                 f"{now} now): read it again")


def test_the_rejects_file_beside_the_archive_lists_line_column_reason_and_raw(tmp_path):
    path = drop(tmp_path, f"symbol,price,priced_at\nVTI,271.60,{NYT}\nVEA,\"4,850\",{NYT}\nBND\n")
    snap = read_snapshot(path, feed_root=tmp_path)
    archive = tmp_path / "archive"
    with pytest.raises(PricesFileError, match="not archived yet: archive_snapshot comes before write_rejects"):
        write_rejects(snap, archive)
    archived = archive_snapshot(snap, archive)
    quarantine = write_rejects(snap, archive)
    assert quarantine == archived.with_name(archived.name + ".rejects.csv")
    assert quarantine.read_text(encoding="utf-8") == (
        "line,column,reason,raw\n"
        f"3,price,\"{NOT_A_DECIMAL}\",\"4,850\"\n"
        "4,price,1 field(s) but the header has 3 (no price value),BND\n"
    )
    assert stat.S_IMODE(os.stat(quarantine).st_mode) == 0o440
    assert write_rejects(snap, archive) == quarantine  # write-once: a second call leaves it
    clean = read_snapshot(drop(tmp_path, f"symbol,price,priced_at\nVTI,271.60,{NYT}\n", "prices_143200.csv"))
    archive_snapshot(clean, archive)
    assert write_rejects(clean, archive) is None


# --------------------------------------------------------------------------------------------
# The day's drop files


def test_snapshots_lists_the_days_drop_files_oldest_first_and_nothing_else(tmp_path):
    assert snapshots(tmp_path, DAY) == []  # no folder yet
    for name in ("prices_143100.csv", "prices_093000.csv", "prices_101500.csv",
                 ".prices_150000.csv.0f3a.tmp", "prices_150000.csv.tmp", "prices_1500.csv", "prices_250000.csv",
                 "prices_150000.CSV", "notes.txt", "prices.csv"):
        drop(tmp_path, "symbol,price,priced_at\n", name)
    (intraday_dir(tmp_path, DAY) / "prices_160000.csv").mkdir()  # a folder, not a file
    folder = tmp_path / INTRADAY_FOLDER / "2026-11-20"
    assert intraday_dir(tmp_path, DAY) == folder
    assert snapshots(tmp_path, DAY) == [folder / "prices_093000.csv", folder / "prices_101500.csv",
                                        folder / "prices_143100.csv"]
    assert snapshots(tmp_path, PREVIOUS_SESSION) == []


# --------------------------------------------------------------------------------------------
# The sandbox's drop files


def test_write_intraday_prices_round_trips_through_read_snapshot(tmp_path):
    at = datetime(2026, 11, 20, 19, 31, tzinfo=UTC)  # 14:31 in New York (EST)
    path = write_intraday_prices(tmp_path, DAY, at, {"VTI": D("271.60"), "VEA": 48.5, "BND": D("73"),
                                                     "VBTLX": 1 / 3})
    assert path == tmp_path / "intraday" / "2026-11-20" / "prices_143100.csv"
    assert path.read_text(encoding="utf-8") == (
        "symbol,price,priced_at\n"
        f"VTI,271.60,{NYT}\n"
        f"VEA,48.5,{NYT}\n"
        f"BND,73,{NYT}\n"
        f"VBTLX,0.333333,{NYT}\n"  # a float, to 6 places
    )
    assert os.listdir(path.parent) == ["prices_143100.csv"]  # no temporary left behind
    snap = read_snapshot(path, feed_root=tmp_path)
    assert snap.prices == {"VTI": D("271.60"), "VEA": D("48.5"), "BND": D("73"), "VBTLX": D("0.333333")}
    assert snap.priced_at == at
    assert snap.rejects == ()
    assert snapshots(tmp_path, DAY) == [path]
    with pytest.raises(FileExistsError):
        write_intraday_prices(tmp_path, DAY, at, {"VTI": D("280")})
    assert path.read_text(encoding="utf-8").count("\n") == 5  # not replaced


def test_write_intraday_prices_names_the_file_in_new_york_time_and_refuses_what_the_reader_would(tmp_path):
    summer = write_intraday_prices(tmp_path, date(2026, 7, 1), datetime(2026, 7, 1, 18, 31, tzinfo=UTC), {"VTI": D("1")})
    assert summer.name == "prices_143100.csv"  # EDT, -04:00
    assert summer.read_text().splitlines()[1] == "VTI,1,2026-07-01T14:31:00-04:00"
    with pytest.raises(ValueError, match="timezone-aware"):
        write_intraday_prices(tmp_path, DAY, datetime(2026, 11, 20, 14, 31), {"VTI": D("1")})
    with pytest.raises(ValueError, match="is on 2026-11-19 in New York, not 2026-11-20"):
        write_intraday_prices(tmp_path, DAY, datetime(2026, 11, 20, 2, 0, tzinfo=UTC), {"VTI": D("1")})
    with pytest.raises(ValueError, match="more than 6 decimal places"):
        write_intraday_prices(tmp_path, DAY, datetime(2026, 11, 20, 19, 0, tzinfo=UTC), {"VTI": D("1.0000001")})
    with pytest.raises(ValueError, match="not a positive number"):
        write_intraday_prices(tmp_path, DAY, datetime(2026, 11, 20, 19, 0, tzinfo=UTC), {"VTI": D("0")})
    assert snapshots(tmp_path, DAY) == []


# --------------------------------------------------------------------------------------------
# The last session's closes


def test_read_session_closes_gives_the_usable_closes_of_the_canonical_prices_file(tmp_path):
    folder = tmp_path / PREVIOUS_SESSION.isoformat()
    folder.mkdir()
    (folder / "prices.csv").write_text("symbol,close\nVTI,280.00\nVEA,50.00\nBND,73.00\nZVXQ,0.00\n"
                                       "DUP,10\nDUP,11\nCASH,1.00\n")
    # A zero close and a symbol on two rows cannot be a reference: left out (the ingest
    # quarantined them), so a basket needing them has no move.
    assert read_session_closes(tmp_path, PREVIOUS_SESSION) == {**CLOSES, "CASH": D("1.00")}


def test_read_session_closes_refuses_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(PricesFileError) as caught:
        read_session_closes(tmp_path, PREVIOUS_SESSION)
    assert str(caught.value) == "2026-11-19/prices.csv: no canonical prices file for the 2026-11-19 session"
    folder = tmp_path / PREVIOUS_SESSION.isoformat()
    folder.mkdir()
    (folder / "prices.csv").write_bytes(b"symbol,close\nVTI,28\xff0\n")
    with pytest.raises(PricesFileError) as caught:
        read_session_closes(tmp_path, PREVIOUS_SESSION)
    assert (caught.value.file, caught.value.line) == ("2026-11-19/prices.csv", 2)
    assert str(caught.value) == ("2026-11-19/prices.csv, line 2: not UTF-8: byte 0xff at line 2 cannot be decoded")
    (folder / "prices.csv").write_text("symbol,price\nVTI,280\n")
    with pytest.raises(PricesFileError, match=r"missing required column\(s\): close"):
        read_session_closes(tmp_path, PREVIOUS_SESSION)


def test_the_sandbox_feed_closes_and_a_drill_day_crossing_the_threshold(tmp_path):
    generate_feed(SandboxConfig(as_of=PREVIOUS_SESSION, households=20, defects=True), tmp_path)
    text = (tmp_path / "2026-11-19" / "prices.csv").read_text().splitlines()
    written = dict(line.split(",") for line in text[1:])
    closes = read_session_closes(tmp_path, PREVIOUS_SESSION)
    # Every close as written, but the planted zero close of the thinly held stock.
    assert closes == {s: D(c) for s, c in written.items() if s != "ZVXQ"}
    assert written["ZVXQ"] == "0.00"
    rule = MarketEventRule()
    basket = basket_of(rule)
    # The whole book 3.5% down at 14:31: each basket close × 0.965 to the cent moves it by at most
    # half a cent, far less than the 0.5% between the shock and the 3% threshold.
    path = write_intraday_prices(tmp_path, DAY, datetime(2026, 11, 20, 19, 31, tzinfo=UTC),
                                 shocked_prices(closes, D("-0.035")))
    snap = read_snapshot(path, feed_root=tmp_path)
    assert snap.rejects == ()
    move = basket_move(basket, closes, snap.prices)
    assert abs(move - D("-0.035")) < D("0.0001")
    assert exceeds(move, rule.threshold)
    assert basket_move(basket, closes, closes) == D("0")


# --------------------------------------------------------------------------------------------
# Row order does not matter

SYMBOLS = st.sampled_from(["VTI", "VEA", "BND", "AGG", " VTI", ""])
PRICES = st.sampled_from(["271.60", "48.5", "73", "1e3", "0", "1.1234567", ""])
TIMES = st.sampled_from([NYT, "2026-11-20T19:45:00Z", "2026-11-20T14:31:00", "2026-11-19T14:31:00-05:00"])
ROWS = st.lists(st.tuples(SYMBOLS, PRICES, TIMES).map(",".join) | st.sampled_from(["BND,73", f"AGG,98.09,{NYT},x"]),
                max_size=12)


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), rows=ROWS)
def test_shuffling_the_rows_gives_the_same_prices_and_rejects(data, rows):
    shuffled = data.draw(st.permutations(rows))
    with tempfile.TemporaryDirectory() as root:
        read = []
        for name, order in (("prices_100000.csv", rows), ("prices_100001.csv", shuffled)):
            path = drop(Path(root), "symbol,price,priced_at\n" + "".join(r + "\n" for r in order), name)
            snap = read_snapshot(path)
            lines = path.read_text().split("\n")
            for reject in snap.rejects:  # the line named holds the raw value named
                assert reject.raw in lines[reject.line - 1]
            # Nothing is dropped silently: each row is a price or has a reject.
            assert len(snap.prices) + len({r.line for r in snap.rejects}) == len(order)
            read.append(snap)
        first, second = read
        assert first.prices == second.prices
        assert first.priced_at == second.priced_at
        assert (Counter((r.column, r.reason, r.raw) for r in first.rejects)
                == Counter((r.column, r.reason, r.raw) for r in second.rejects))
