"""FIX 4.4 NewOrderSingle (35=D) messages for the trading desk, built with simplefix.

simplefix computes BodyLength(9) and CheckSum(10) and puts 8/9/35 first and 10 last; every
message built here is checked against the FIX 4.4 data dictionary before it is written.

The file for the desk holds one encoded message per line: the SOH (0x01) delimiters are kept and
each message is followed by a newline, so the file opens in an editor and `read_fix_file` (or any
FIX engine's file replay) parses it line by line.
"""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import simplefix
from pydantic import BaseModel, ConfigDict, Field

from rebal_pipeline.tickets.fix44_dictionary import FixValidationError, load_fix44
from rebal_pipeline.tickets.orders import BlockOrder, Order, TicketBatch, fmt_cash, fmt_decimal

BEGIN_STRING = "FIX.4.4"
SIDE = {"buy": "1", "sell": "2"}  # Side(54)
# SecurityType(167): FIX 4.4 has no ETF code; an exchange-traded fund trades as common stock.
# A money-market fund is a mutual fund.
SECURITY_TYPE = {"stock": "CS", "etf": "CS", "mutual_fund": "MF", "money_market": "MF"}
ORD_TYPE = {"market": "1"}  # OrdType(40)
TIME_IN_FORCE = {"day": "0"}  # TimeInForce(59)
ID_SOURCE_CUSIP = "1"  # SecurityIDSource(22)


class FixSession(BaseModel):
    """The session identity written into the header (the desk's engine may re-stamp it)."""

    model_config = ConfigDict(frozen=True)

    sender_comp_id: str = Field(default="REBAL", min_length=1)
    target_comp_id: str = Field(default="DESK", min_length=1)
    first_seq_num: int = Field(default=1, ge=1)

    @classmethod
    def from_settings(cls, rebal_settings) -> FixSession:
        """REBAL_FIX_SENDER_COMP_ID, REBAL_FIX_TARGET_COMP_ID, REBAL_FIX_FIRST_SEQ_NUM of a
        RebalSettings (defaults for those not set)."""
        values = {key: getattr(rebal_settings, f"fix_{key}") for key in (
            "sender_comp_id", "target_comp_id", "first_seq_num") if getattr(rebal_settings, f"fix_{key}")}
        return cls(**values)


def utc_timestamp(value: datetime) -> str:
    """FIX UTCTIMESTAMP with milliseconds: YYYYMMDD-HH:MM:SS.sss."""
    value = value.astimezone(timezone.utc)
    return f"{value:%Y%m%d-%H:%M:%S}.{value.microsecond // 1000:03d}"


def new_order_single(ticket: Order | BlockOrder, session: FixSession, seq_num: int,
                     sending_time: datetime | None = None) -> simplefix.FixMessage:
    """The NewOrderSingle for one account order or one block (with its NoAllocs group).

    SendingTime defaults to the order's placement time, so the same batch always encodes to the
    same bytes. Body fields follow the dictionary's order for NewOrderSingle."""
    message = simplefix.FixMessage()
    message.append_pair(8, BEGIN_STRING, header=True)
    message.append_pair(35, "D", header=True)
    message.append_pair(49, session.sender_comp_id, header=True)
    message.append_pair(56, session.target_comp_id, header=True)
    message.append_pair(34, seq_num, header=True)
    message.append_pair(52, utc_timestamp(sending_time or ticket.placed_at), header=True)
    if isinstance(ticket, BlockOrder):
        message.append_pair(11, ticket.block_id)
        # PreAllocGrp: each allocation names its account, its own ClOrdID (the key to its 204-2
        # memo) and its share of the block.
        message.append_pair(78, len(ticket.allocations))
        for allocation in ticket.allocations:
            message.append_pair(79, allocation.account_id)
            message.append_pair(467, allocation.cl_ord_id)
            message.append_pair(80, fmt_decimal(allocation.quantity))
    else:
        message.append_pair(11, ticket.cl_ord_id)
        message.append_pair(1, ticket.account_id)
    message.append_pair(55, ticket.symbol)
    if ticket.cusip:
        message.append_pair(48, ticket.cusip)
        message.append_pair(22, ID_SOURCE_CUSIP)
    message.append_pair(167, SECURITY_TYPE[ticket.security_type])
    message.append_pair(54, SIDE[ticket.side])
    message.append_pair(60, utc_timestamp(ticket.placed_at))
    if isinstance(ticket, Order) and ticket.by_amount:
        message.append_pair(152, fmt_cash(ticket.cash_amount))
    else:
        message.append_pair(38, fmt_decimal(ticket.quantity))
    message.append_pair(40, ORD_TYPE[ticket.order_type])
    message.append_pair(59, TIME_IN_FORCE[ticket.time_in_force])
    message.append_pair(58, ticket.memo_text)
    return message


def encode_batch(batch: TicketBatch, session: FixSession = FixSession()) -> list[bytes]:
    """Every ticket of the batch encoded, MsgSeqNum from the session's first number in file
    order (blocks, then single-account orders). Raises FixValidationError naming the ticket if a
    message does not validate against the FIX 4.4 dictionary."""
    dictionary = load_fix44()
    encoded = []
    for offset, ticket in enumerate(batch.tickets):
        data = new_order_single(ticket, session, session.first_seq_num + offset).encode()
        errors = dictionary.validate_wire(data)
        if errors:
            ident = ticket.block_id if isinstance(ticket, BlockOrder) else ticket.cl_ord_id
            raise FixValidationError([f"{ident}: {e}" for e in errors])
        encoded.append(data)
    return encoded


def write_fix_file(path: str | os.PathLike, batch: TicketBatch, session: FixSession = FixSession()) -> Path:
    """Write the batch as FIX 4.4 NewOrderSingle messages, one per line (SOH kept)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(data + b"\n" for data in encode_batch(batch, session)))
    return path


def read_fix_file(path: str | os.PathLike) -> list[simplefix.FixMessage]:
    """The messages of a file written by `write_fix_file`, parsed with simplefix.FixParser."""
    messages = []
    for number, line in enumerate(Path(path).read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        parser = simplefix.FixParser()
        parser.append_buffer(line)
        message = parser.get_message()
        if message is None:
            raise ValueError(f"{path}: line {number} is not a complete FIX message")
        messages.append(message)
    return messages
