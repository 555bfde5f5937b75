"""Custodian CSV order files (Schwab-, Fidelity-, Pershing-style): each round-trips, carries the
204-2 memo on every order row, and refuses a file that does not add up."""

from __future__ import annotations

import csv
from datetime import datetime, timezone
from decimal import Decimal

import pytest

from rebal_pipeline.tickets.dialects import (
    DIALECTS, FIDELITY, FIDELITY_HEADER, PERSHING, PERSHING_FIELDS, SCHWAB, SCHWAB_HEADER, dialect_for,
    write_custodian_files,
)
from rebal_pipeline.tickets.orders import TicketBatch, TicketError, build_blocks
from rebal_pipeline_tests.tickets.book import POLICY, book_orders


def _as_custodian(batch: TicketBatch, custodian: str) -> TicketBatch:
    """The whole book as if every account were at one custodian (blocks included)."""
    return build_blocks([o.model_copy(update={"custodian": custodian, "block_id": None}) for o in batch.orders])


@pytest.fixture
def batch():
    return build_blocks(book_orders())


@pytest.mark.parametrize("dialect", DIALECTS.values(), ids=list(DIALECTS))
def test_each_dialect_round_trips(dialect, batch, tmp_path):
    mine = _as_custodian(batch, dialect.custodian)
    assert len(mine.blocks) == 2 and len(mine.standalone) == 4  # blocks, shares and dollar amounts
    path = dialect.write(tmp_path / dialect.file_name(mine), mine)
    assert dialect.read(path) == mine
    # Written again from what was read: the same bytes.
    again = dialect.write(tmp_path / "again", dialect.read(path))
    assert again.read_bytes() == path.read_bytes()


# The 204-2(a)(3) memorandum, element by element, in each layout's column names: terms (side,
# shares or dollars, symbol, order type, duration), account, date and time of entry,
# discretionary, recommended by, approved by (and the decision), placed by.
MEMO_COLUMNS = {
    "schwab": [("Action",), ("Quantity", "Dollar Amount"), ("Symbol",), ("Order Type",), ("Duration",),
               ("Account Number",), ("Order Date",), ("Order Time (ET)",), ("Discretionary",), ("Recommended By",),
               ("Approved By",), ("Decision ID",), ("Placed By",)],
    "fidelity": [("TRAN_CD",), ("QTY",), ("QTY_TYPE",), ("SYMBOL",), ("ORDER_TYPE",), ("TIF",), ("ACCT_NO",),
                 ("ORDER_DT",), ("ORDER_TM",), ("DISC_FL",), ("RECOMMENDED_BY",), ("APPROVED_BY",), ("DECISION_ID",),
                 ("PLACED_BY",)],
    "pershing": [("side",), ("shares", "amount"), ("symbol",), ("order_type",), ("tif",), ("account",),
                 ("entered_utc",), ("discretion",), ("recommended_by",), ("approved_by",), ("decision_id",),
                 ("placed_by",)],
}


@pytest.mark.parametrize("dialect", DIALECTS.values(), ids=list(DIALECTS))
def test_every_order_row_carries_the_204_2_memo(dialect, batch):
    mine = _as_custodian(batch, dialect.custodian)
    rows = dialect.rows(mine)
    names = dialect.header or PERSHING_FIELDS
    body = rows[1:] if dialect.header else rows[1:-1]
    account_rows = [dict(zip(names, r)) for r in body if r[0] not in ("Block", "B", "K")]
    assert len(account_rows) == len(mine.orders) == 9
    for row in account_rows:
        for element in MEMO_COLUMNS[dialect.name]:
            assert any(row[column] for column in element), (element, row)
        recommended_by, _, _, placed_by = (c for (c, *_) in MEMO_COLUMNS[dialect.name][-4:])
        assert row[recommended_by].startswith("rebal:REC-") and row[recommended_by].endswith(f"@{POLICY}")
        assert row[placed_by] == "TRD-0001"


def test_schwab_style_rows_hand_checked(batch):
    rows = SCHWAB.rows(batch.for_custodian("schwab"))
    assert rows[0] == list(SCHWAB_HEADER)
    block, *allocations = rows[1:4]
    assert block[:16] == ["Block", next(b.block_id for b in batch.blocks if b.symbol == "VTI"), "", "", "Sell", "42",
                          "", "VTI", "922908769", "ETF", "Market", "Day", "11/23/2026", "09:35:00", "ADV-1", "No"]
    assert [(a[0], a[3], a[5]) for a in allocations] == [("Allocation", "ACC-1", "10"), ("Allocation", "ACC-2", "25")]
    fund_buy = next(r for r in rows if r[7] == "VBTLX")
    assert fund_buy == ["Order", "RBFBM7FIPC3XZ5BL7YKC", "", "ACC-1", "Buy", "", "1000.00", "VBTLX", "921937603",
                        "Mutual Fund", "Market", "Day", "11/23/2026", "09:35:00", "ADV-1", "No",
                        f"rebal:REC-HH1@{POLICY}", "ADV-1", "DEC-1", "TRD-0001"]


def test_fidelity_style_rows_hand_checked(batch):
    rows = FIDELITY.rows(batch.for_custodian("fidelity"))
    assert rows[0] == list(FIDELITY_HEADER)
    assert rows[1] == ["O", "RB7Y7JNLXCXTAAOK4YSI", "", "ACC-4", "B", "3", "S", "AAPL", "037833100", "EQ", "M", "D",
                       "20261123", "143500", "ADV-2", "Y", f"rebal:REC-3@{POLICY}", "policy:micro-trade-v1", "DEC-3",
                       "TRD-0001"]
    assert rows[2][4:7] == ["B", "500.00", "D"]  # SWVXX by dollars


def test_pershing_style_records_hand_checked(batch):
    rows = PERSHING.rows(batch.for_custodian("pershing"))
    assert rows[0] == ["H", "REBAL-ORDERS", "1", "2026-11-23"]
    assert [r[:7] for r in rows[1:4]] == [
        ["K", next(b.block_id for b in batch.blocks if b.symbol == "IVV"), "", "", "BUY", "10", ""],
        ["L", "RBV65WDELLU2MN6WMDAC", rows[1][1], "ACC-5", "BUY", "4", ""],
        ["L", "RBHQINWQ24VKPZFWPEJA", rows[1][1], "ACC-6", "BUY", "6", ""],
    ]
    assert rows[1][12] == "2026-11-23T14:35:00Z"
    assert rows[-1] == ["T", "3", "10", "0.00"]  # 3 records; 4 + 6 shares in the account records


def test_write_custodian_files_writes_one_file_per_custodian_in_its_dialect(batch, tmp_path):
    written = write_custodian_files(batch, tmp_path)
    assert {c: p.name for c, p in written.items()} == {
        "fidelity": "fidelity_orders_20261123.csv", "pershing": "pershing_orders_20261123.txt",
        "schwab": "schwab_orders_20261123.csv"}
    for custodian, path in written.items():
        assert dialect_for(custodian).read(path) == batch.for_custodian(custodian)


def test_a_file_for_one_custodian_refuses_another_custodians_orders(batch, tmp_path):
    with pytest.raises(TicketError, match="holds schwab orders only; the batch also has fidelity, pershing"):
        SCHWAB.write(tmp_path / "x.csv", batch)
    with pytest.raises(TicketError, match="no CSV order layout for custodian 'apex'"):
        dialect_for("apex")


def _rewrite(path, change):
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle, delimiter="|" if path.suffix == ".txt" else ","))
    change(rows)
    with path.open("w", newline="") as handle:
        csv.writer(handle, delimiter="|" if path.suffix == ".txt" else ",").writerows(rows)


def test_an_allocation_that_breaks_the_block_total_is_refused(batch, tmp_path):
    path = SCHWAB.write(tmp_path / "s.csv", batch.for_custodian("schwab"))
    _rewrite(path, lambda rows: rows[2].__setitem__(5, "11"))  # ACC-1 10 → 11 VTI
    with pytest.raises(TicketError, match="allocations sum to 43, not the block's 42"):
        SCHWAB.read(path)


def test_a_pershing_file_whose_trailer_does_not_match_is_refused(batch, tmp_path):
    path = PERSHING.write(tmp_path / "p.txt", batch.for_custodian("pershing"))
    _rewrite(path, lambda rows: rows[-1].__setitem__(2, "11"))  # the control total says 11 shares
    with pytest.raises(TicketError, match=r"trailer T\|3\|11\|0.00 does not match the records \(3 records, 10 shares"):
        PERSHING.read(path)
    path = PERSHING.write(tmp_path / "p.txt", batch.for_custodian("pershing"))
    _rewrite(path, lambda rows: rows.pop(-2))  # an allocation lost in transit
    with pytest.raises(TicketError, match="p.txt: a block has at least two allocations"):
        PERSHING.read(path)


def test_a_file_with_another_header_or_an_unknown_code_is_refused(batch, tmp_path):
    path = FIDELITY.write(tmp_path / "f.csv", batch.for_custodian("fidelity"))
    _rewrite(path, lambda rows: rows[1].__setitem__(4, "X"))
    with pytest.raises(TicketError, match=r"row 2: TRAN_CD 'X' is not one of B, S"):
        FIDELITY.read(path)
    with pytest.raises(TicketError, match="not a Schwab-style order file"):
        SCHWAB.read(path)


def test_schwab_style_times_are_new_york_local_across_daylight_saving(tmp_path):
    summer = datetime(2026, 7, 1, 13, 35, tzinfo=timezone.utc)  # EDT: 09:35
    orders = [o.model_copy(update={"placed_at": summer}) for o in book_orders() if o.custodian == "schwab"]
    mine = build_blocks(orders)
    rows = SCHWAB.rows(mine)
    assert {(r[12], r[13]) for r in rows[1:]} == {("07/01/2026", "09:35:00")}
    assert SCHWAB.read(SCHWAB.write(tmp_path / "s.csv", mine)) == mine
    assert all(o.placed_at == summer for o in SCHWAB.read(tmp_path / "s.csv").orders)
    assert Decimal(rows[1][5]) == 42
