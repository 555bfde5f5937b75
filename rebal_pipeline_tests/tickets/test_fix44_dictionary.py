"""The FIX 4.4 dictionary (QuickFIX's FIX44.xml, shipped with its licence) and the validator: good
messages pass, broken ones are rejected with a reason that names the problem."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest
import simplefix

from rebal_pipeline.tickets.fix import FixSession, new_order_single
from rebal_pipeline.tickets.fix44_dictionary import FIX44_XML, FixValidationError, load_fix44
from rebal_pipeline.tickets.orders import build_blocks
from rebal_pipeline_tests.tickets.book import book_orders

DATA = Path(FIX44_XML).parent


@pytest.fixture(scope="module")
def dictionary():
    return load_fix44()


def _order() -> simplefix.FixMessage:
    order = next(o for o in book_orders() if o.symbol == "AAPL")
    return new_order_single(order, FixSession(), 1)


def _block() -> simplefix.FixMessage:
    block = next(b for b in build_blocks(book_orders()).blocks if b.symbol == "VTI")
    return new_order_single(block, FixSession(), 1)


def _rebuilt(pairs) -> simplefix.FixMessage:
    """A message with these pairs, re-encoded so BodyLength and CheckSum stay right."""
    message = simplefix.FixMessage()
    for tag, value in pairs:
        if int(tag) not in (9, 10):
            message.append_pair(tag, value)
    parser = simplefix.FixParser()
    parser.append_buffer(message.encode())
    return parser.get_message()


def _replace(message, tag, value):
    return _rebuilt([(t, value if int(t) == tag else v) for t, v in message.pairs])


def test_the_dictionary_is_quickfix_fix44_with_its_licence_alongside():
    assert hashlib.sha256(FIX44_XML.read_bytes()).hexdigest() == (
        "a82655b54363aa9c6d1b2f21f294f1198c0d7125d7b44c26d93d3179f3358425")
    licence = (DATA / "QUICKFIX_LICENSE.txt").read_text()
    assert licence.startswith("The QuickFIX Software License, Version 1.0")
    assert "quickfix==1.16.0" in (DATA / "README.md").read_text()


def test_the_dictionary_knows_new_order_single_and_its_allocation_group(dictionary):
    nos = dictionary.messages["D"]
    assert nos.name == "NewOrderSingle" and dictionary.version == "FIX.4.4"
    assert {t for t, required in nos.layout.required.items() if required} == {11, 54, 60, 40}
    group = nos.layout.groups[78]
    assert group.delimiter == 79 and {79, 467, 80} <= set(group.layout.required)
    assert dictionary.fields[152].type == "QTY" and {"CS", "MF"} <= dictionary.fields[167].values


def test_built_messages_validate(dictionary):
    assert dictionary.validate(_order()) == []
    assert dictionary.validate(_block()) == []
    assert dictionary.validate_wire(_block().encode()) == []


@pytest.mark.parametrize("broken, reason", [
    (lambda m: _rebuilt(list(m.pairs) + [(b"9999", b"x")]), "tag 9999 is not a FIX 4.4 field (unknown tag)"),
    (lambda m: _replace(m, 54, "Z"), "Side(54): 'Z' is not one of its enumerated values"),
    (lambda m: _replace(m, 59, "X"), "TimeInForce(59): 'X' is not one of its enumerated values"),
    (lambda m: _replace(m, 167, "ETF"), "SecurityType(167): 'ETF' is not one of its enumerated values"),
    (lambda m: _rebuilt([p for p in m.pairs if p[0] != b"11"]),
     "required field ClOrdID(11) is missing from NewOrderSingle"),
    (lambda m: _rebuilt([p for p in m.pairs if p[0] != b"49"]),
     "required field SenderCompID(49) is missing from header"),
    (lambda m: _replace(m, 38, "ten"), "OrderQty(38): 'ten' is not a valid QTY"),
    (lambda m: _replace(m, 60, "20261123-25:00:00.000"),
     "TransactTime(60): '20261123-25:00:00.000' is not a valid UTCTIMESTAMP"),
    (lambda m: _replace(m, 34, "-1"), "MsgSeqNum(34): '-1' is not a valid SEQNUM"),
    (lambda m: _replace(m, 40, "12"), "OrdType(40): '12' is not a valid CHAR"),
    (lambda m: _rebuilt([p for p in m.pairs if p[0] != b"22"]),
     "SecurityIDSource(22) is required when SecurityID(48) is given"),
    (lambda m: _rebuilt(list(m.pairs) + [(b"152", b"100.00")]), "needs exactly one of OrderQty(38), CashOrderQty(152)"),
    (lambda m: _rebuilt(list(m.pairs) + [(b"79", b"ACC-9")]), "AllocAccount(79) is not allowed here in NewOrderSingle"),
    (lambda m: _rebuilt(list(m.pairs) + [(b"55", b"MSFT")]), "Symbol(55) appears twice in NewOrderSingle"),
    (lambda m: _rebuilt(list(m.pairs) + [(b"49", b"LATE")]), "SenderCompID(49) is not allowed here in NewOrderSingle"),
    (lambda m: _replace(m, 8, "FIX.4.2"), "BeginString(8) is 'FIX.4.2', the dictionary is FIX.4.4"),
])
def test_a_broken_single_order_is_rejected_with_a_clear_reason(dictionary, broken, reason):
    errors = dictionary.validate(broken(_order()))
    assert any(reason in e for e in errors), errors
    with pytest.raises(FixValidationError, match=re.escape(reason)):
        dictionary.check(broken(_order()))


def test_a_block_whose_group_count_disagrees_is_rejected(dictionary):
    errors = dictionary.validate(_replace(_block(), 78, "4"))
    assert errors == ["NoAllocs(78) says 4 instances, the message has 3 (each must begin with AllocAccount(79))"]


def test_an_allocation_without_its_delimiter_is_rejected(dictionary):
    pairs = list(_block().pairs)
    first_account = next(i for i, (t, _) in enumerate(pairs) if t == b"79")
    errors = dictionary.validate(_rebuilt(pairs[:first_account] + pairs[first_account + 1:]))
    assert errors[0] == "NoAllocs(78) says 3 instances, the message has 0 (each must begin with AllocAccount(79))"
    assert "IndividualAllocID(467) is not allowed here in NewOrderSingle" in errors


def test_wrong_body_length_or_checksum_on_the_wire_is_rejected(dictionary):
    data = _order().encode()
    tampered = data.replace(b"55=AAPL", b"55=AAPX")  # same length, different bytes
    assert any(e.startswith("CheckSum(10) is ") for e in dictionary.validate_wire(tampered))
    longer = data.replace(b"55=AAPL", b"55=AAPLX")
    errors = dictionary.validate_wire(longer)
    assert any(e.startswith("BodyLength(9) is ") for e in errors), errors
    assert dictionary.validate_wire(b"garbage") == ["not a framed FIX message (8=...|9=...| ... |10=nnn|)"]
