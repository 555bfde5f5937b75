"""FIX 4.4 NewOrderSingle files: every message parses back with simplefix, has the right
BodyLength and CheckSum, validates against QuickFIX's FIX44.xml, and carries the order's terms and
its 204-2 memo reference."""

from __future__ import annotations

from decimal import Decimal

import pytest
import simplefix

from rebal_pipeline.tickets.fix import FixSession, encode_batch, new_order_single, read_fix_file, write_fix_file
from rebal_pipeline.tickets.fix44_dictionary import load_fix44
from rebal_pipeline.tickets.orders import build_blocks
from rebal_pipeline_tests.tickets.book import POLICY, book_orders

SOH = b"\x01"
SESSION = FixSession(sender_comp_id="RIA-REBAL", target_comp_id="TRADE-DESK", first_seq_num=101)


@pytest.fixture
def batch():
    return build_blocks(book_orders())


@pytest.fixture
def fix_file(batch, tmp_path):
    return write_fix_file(tmp_path / "orders.fix", batch, SESSION)


def _fields(message: simplefix.FixMessage) -> list[tuple[int, str]]:
    return [(int(t), v.decode()) for t, v in message.pairs]


def _by_clordid(messages, cl_ord_id):
    return next(m for m in messages if m.get(11).decode() == cl_ord_id)


def test_the_file_has_one_message_per_line_with_soh_kept(batch, fix_file):
    lines = fix_file.read_bytes().split(b"\n")
    assert lines[-1] == b"" and len(lines) - 1 == len(batch.tickets) == 6
    assert all(line.startswith(b"8=FIX.4.4\x01") and line.endswith(SOH) and line.count(b"\x0110=") == 1
               for line in lines[:-1])


def test_every_message_parses_back_with_correct_body_length_checksum_and_validates(fix_file):
    dictionary = load_fix44()
    lines = fix_file.read_bytes().splitlines()
    messages = read_fix_file(fix_file)
    assert len(messages) == len(lines) == 6
    for line, message in zip(lines, messages):
        # BodyLength: bytes after "9=nnn<SOH>" up to and including the SOH before "10=".
        head = line.index(SOH, line.index(b"\x019=") + 1) + 1
        tail = line.rindex(b"\x0110=") + 1
        assert int(message.get(9)) == tail - head
        # CheckSum: the sum of every byte before "10=", modulo 256, three digits.
        assert message.get(10) == f"{sum(line[:tail]) % 256:03d}".encode()
        assert dictionary.validate(message) == []
        assert dictionary.validate_wire(line) == []
        assert message.get(8) == b"FIX.4.4" and message.get(35) == b"D"


def test_a_single_account_order_hand_checked(fix_file):
    message = _by_clordid(read_fix_file(fix_file), "RBPBNGQY6NO3Z4OWW6YF")  # ACC-2 sells its 12.345 VTSAX
    fields = _fields(message)
    assert fields[:9] == [
        (8, "FIX.4.4"), (9, message.get(9).decode()), (35, "D"), (49, "RIA-REBAL"), (56, "TRADE-DESK"),
        (34, "106"), (52, "20261123-14:35:00.000"), (11, "RBPBNGQY6NO3Z4OWW6YF"), (1, "ACC-2"),
    ]
    assert fields[9:-1] == [
        (55, "VTSAX"), (48, "922908728"), (22, "1"), (167, "MF"), (54, "2"), (60, "20261123-14:35:00.000"),
        (38, "12.345"), (40, "1"), (59, "0"),
        (58, f"204-2 REC=REC-HH1 POL={POLICY} APR=ADV-1 PLC=TRD-0001 DISC=N"),
    ]
    assert fields[-1][0] == 10


def test_a_mutual_fund_buy_is_sent_by_cash_amount(fix_file):
    message = _by_clordid(read_fix_file(fix_file), "RBFBM7FIPC3XZ5BL7YKC")  # ACC-1 buys VBTLX
    assert message.get(167) == b"MF" and message.get(54) == b"1"
    assert message.get(152) == b"1000.00"  # 103.093 shares × $9.70 = $1,000.0021
    assert message.get(38) is None


def test_a_stock_is_common_stock_by_quantity(fix_file):
    message = _by_clordid(read_fix_file(fix_file), "RB7Y7JNLXCXTAAOK4YSI")  # ACC-4 buys 3 AAPL, auto-approved
    assert (message.get(167), message.get(38), message.get(152)) == (b"CS", b"3", None)
    assert message.get(58) == f"204-2 REC=REC-3 POL={POLICY} APR=policy:micro-trade-v1 PLC=TRD-0001 DISC=Y".encode()


def test_a_block_carries_allocations_that_sum_to_its_order_qty(batch, fix_file):
    messages = read_fix_file(fix_file)
    vti = next(b for b in batch.blocks if b.symbol == "VTI")
    message = _by_clordid(messages, vti.block_id)
    fields = _fields(message)
    assert message.get(1) is None  # the accounts are the allocations
    assert message.get(78) == b"3"
    allocations = [(a, i, q) for (ta, a), (ti, i), (tq, q) in zip(fields, fields[1:], fields[2:])
                   if (ta, ti, tq) == (79, 467, 80)]
    assert allocations == [(o.account_id, o.cl_ord_id, str(o.quantity)) for o in vti.allocations]
    assert [a for a, _, _ in allocations] == ["ACC-1", "ACC-2", "ACC-3"]
    assert sum(Decimal(q) for _, _, q in allocations) == Decimal(message.get(38).decode()) == Decimal(42)
    assert message.get(58).startswith(b"204-2 BLOCK ALLOCS=3 REC=MULTI(2) ")


def test_every_message_carries_the_memo_reference_and_the_memo_terms(batch, fix_file):
    for message in read_fix_file(fix_file):
        text = message.get(58).decode()
        assert text.startswith("204-2 ") and " APR=" in text and " PLC=TRD-0001" in text and " DISC=" in text
        # Terms (side, size, type, duration), account or allocations, and time are FIX fields.
        assert message.get(54) and (message.get(38) or message.get(152)) and message.get(40) == b"1"
        assert message.get(59) == b"0" and message.get(60) == b"20261123-14:35:00.000"
        assert message.get(1) or message.get(78)


def test_sequence_numbers_follow_the_session_and_the_file_order(fix_file):
    messages = read_fix_file(fix_file)
    assert [int(m.get(34)) for m in messages] == [101, 102, 103, 104, 105, 106]
    # Blocks first (by custodian), then single-account orders by custodian and account.
    assert [m.get(55).decode() for m in messages] == ["IVV", "VTI", "AAPL", "SWVXX", "VBTLX", "VTSAX"]
    assert {m.get(49) for m in read_fix_file(fix_file)} == {b"RIA-REBAL"}


def test_the_same_batch_encodes_to_the_same_bytes(batch):
    assert encode_batch(batch, SESSION) == encode_batch(build_blocks(book_orders()), SESSION)


def test_the_default_session_and_environment_overrides(batch):
    from rebal_pipeline.settings import load_settings

    order = batch.standalone[0]
    assert new_order_single(order, FixSession(), 1).get(49) == b"REBAL"
    session = FixSession.from_settings(
        load_settings({"REBAL_FIX_SENDER_COMP_ID": "FIRM1", "REBAL_FIX_FIRST_SEQ_NUM": "7"}))
    assert (session.sender_comp_id, session.target_comp_id, session.first_seq_num) == ("FIRM1", "DESK", 7)
