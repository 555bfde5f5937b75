"""Orders from an approved recommendation: one `Order` per approved trade, blocks across accounts.

Pure functions, no Dagster and no database: the execute_rebalance job reads the decision, the
package and the reference data, calls `build_orders` and `build_blocks`, and hands the batch to
`fix.write_fix_file` or a custodian CSV dialect (`dialects.py`).

Every order is also its SEC Rule 204-2(a)(3) memorandum: "a memorandum of each order given by
the investment adviser for the purchase or sale of any security ... showing the terms and
conditions of the order, instruction, modification or cancellation; ... the person connected
with the investment adviser who recommended the transaction to the client and the person who
placed such order; ... the account for which entered, the date of entry, ... [and] any order
entered pursuant to the exercise of discretionary power". The fields below carry exactly that.
"""

from __future__ import annotations

import base64
import hashlib
from collections import defaultdict
from datetime import datetime, timezone
from decimal import ROUND_HALF_UP, Decimal
from typing import Iterable, Literal, Mapping

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from rebal_pipeline.workflow.package import PackageTrade, RecommendationPackage

SecurityType = Literal["stock", "etf", "mutual_fund", "bond", "money_market", "cash"]
Side = Literal["buy", "sell"]

# Funds priced once a day at NAV. A buy of one that trades in fractional shares is sent as a
# dollar amount (the fund company fills it at the day's NAV, so a share count would be a guess).
FUNDS_AT_NAV = ("mutual_fund", "money_market")
# Types a market (day) order ticket is written for. Individual bonds trade by face amount at a
# percent-of-par price and are worked by the desk; cash is never ordered.
ORDERABLE = ("stock", "etf", "mutual_fund", "money_market")
# Trading desks and FIX engines commonly cap ClOrdID at 20 characters.
CL_ORD_ID_LENGTH = 20
CENT = Decimal("0.01")


class TicketError(ValueError):
    """An approved trade that cannot be turned into an order (the reason says which and why)."""


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecurityRef(_Frozen):
    """The securities.csv facts an order needs."""

    symbol: str
    cusip: str | None = None
    security_type: SecurityType
    fractional: bool = False


class AccountRef(_Frozen):
    """The accounts.csv facts an order needs (advisor_id: the account's override of the
    household's advisor of record, if any)."""

    account_id: str
    custodian: str
    discretionary: bool
    advisor_id: str | None = None


class ApprovalDecision(_Frozen):
    """The decision that releases the trades (a row of the workflow store's decisions)."""

    decision_id: str = Field(min_length=1)
    recommendation_id: str | None = None
    action: Literal["approve", "modify", "auto_approve"]
    actor_id: str = Field(min_length=1)
    created_at: datetime
    via: str = "api"

    @property
    def approved_by(self) -> str:
        # Auto-approvals are recorded by the lifecycle as actor "policy:<rule version>"; the memo
        # names the rule, never a person who did not decide.
        if self.action == "auto_approve" and not self.actor_id.startswith("policy:"):
            return f"policy:{self.actor_id}"
        return self.actor_id


def _utc_seconds(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("order times must be timezone-aware (UTC)")
    return value.astimezone(timezone.utc).replace(microsecond=0)


def _b32(text: str, length: int) -> str:
    return base64.b32encode(hashlib.sha256(text.encode("utf-8")).digest()).decode("ascii")[:length]


def cl_ord_id(decision_id: str, account_id: str, symbol: str, side: str) -> str:
    """The order's ClOrdID: "RB" + 18 base32 characters of SHA-256(decision|account|symbol|side).

    20 characters, [A-Z2-7] only, and the same on every run for the same approved trade, so a
    re-run stages the same order and the desk's engine (or the custodian) refuses a duplicate."""
    return "RB" + _b32(f"order|{decision_id}|{account_id}|{symbol}|{side}", CL_ORD_ID_LENGTH - 2)


def block_id(member_cl_ord_ids: Iterable[str]) -> str:
    """A block's ClOrdID: "BK" + 18 base32 characters of SHA-256 over its sorted allocations'
    ClOrdIDs (deterministic: the same allocations always make the same block)."""
    return "BK" + _b32("block|" + "|".join(sorted(member_cl_ord_ids)), CL_ORD_ID_LENGTH - 2)


def fmt_decimal(value: Decimal) -> str:
    """A quantity as written on a ticket: plain digits, no exponent, no trailing zeros."""
    return format(value.normalize(), "f")


def _plain(value: Decimal) -> Decimal:
    """Without trailing zeros (0.300 → 0.3) and without an exponent (1E+1 → 10)."""
    value = value.normalize()
    return value.quantize(Decimal(1)) if value.as_tuple().exponent > 0 else value


def fmt_cash(value: Decimal) -> str:
    return format(value.quantize(CENT), "f")


class OrderMemo(_Frozen):
    """The SEC Rule 204-2(a)(3) order memorandum, as the books and records keep it."""

    terms: str
    recommended_by: str
    approved_by: str
    placed_by: str
    account_id: str
    order_time: datetime
    discretionary: bool


class Order(_Frozen):
    """One account's order: what goes to the custodian, and its 204-2 memorandum."""

    cl_ord_id: str = Field(min_length=1, max_length=CL_ORD_ID_LENGTH)
    block_id: str | None = None  # set when the order is an allocation of a block
    decision_id: str
    recommendation_id: str
    policy_version: str
    advisor_id: str | None
    custodian: str
    account_id: str
    discretionary: bool
    symbol: str
    cusip: str | None
    security_type: SecurityType
    side: Side
    quantity: Decimal | None = None  # shares (OrderQty)
    cash_amount: Decimal | None = None  # dollars (CashOrderQty)
    order_type: Literal["market"] = "market"
    time_in_force: Literal["day"] = "day"
    approved_by: str
    placed_by: str
    placed_at: datetime

    @field_validator("placed_at")
    @classmethod
    def _placed_at_utc(cls, value: datetime) -> datetime:
        return _utc_seconds(value)

    @model_validator(mode="after")
    def _one_quantity(self) -> Order:
        if (self.quantity is None) == (self.cash_amount is None):
            raise ValueError("an order has either a share quantity or a cash amount, not both or neither")
        amount = self.quantity if self.quantity is not None else self.cash_amount
        if amount <= 0:
            raise ValueError("an order's quantity or amount must be positive")
        return self

    @property
    def by_amount(self) -> bool:
        return self.cash_amount is not None

    @property
    def recommended_by(self) -> str:
        """rebal's recommendation and the policy version it was made under."""
        return f"rebal:{self.recommendation_id}@{self.policy_version}"

    @property
    def terms(self) -> str:
        size = f"${fmt_cash(self.cash_amount)}" if self.by_amount else fmt_decimal(self.quantity)
        return f"{self.side.upper()} {size} {self.symbol} {self.order_type.upper()} {self.time_in_force.upper()}"

    @property
    def memo(self) -> OrderMemo:
        return OrderMemo(terms=self.terms, recommended_by=self.recommended_by, approved_by=self.approved_by,
                         placed_by=self.placed_by, account_id=self.account_id, order_time=self.placed_at,
                         discretionary=self.discretionary)

    @property
    def memo_text(self) -> str:
        """The memo reference carried in FIX Text(58): who recommended (recommendation and
        policy version), who approved, who placed, discretionary or not. Terms, account and
        time are the order's own fields (54/38/152/40/59, 1, 60)."""
        return (f"204-2 REC={self.recommendation_id} POL={self.policy_version} APR={self.approved_by} "
                f"PLC={self.placed_by} DISC={'Y' if self.discretionary else 'N'}")


def parse_recommended_by(text: str) -> tuple[str, str]:
    """(recommendation_id, policy_version) from `Order.recommended_by`."""
    if not text.startswith("rebal:") or "@" not in text:
        raise ValueError(f"not a rebal recommended-by reference: {text!r}")
    recommendation_id, policy_version = text[len("rebal:"):].split("@", 1)
    return recommendation_id, policy_version


class BlockOrder(_Frozen):
    """One symbol and side for several accounts of one advisor at one custodian, sent as one
    order with per-account allocations (FIX PreAllocGrp: NoAllocs/AllocAccount/AllocQty)."""

    block_id: str = Field(min_length=1, max_length=CL_ORD_ID_LENGTH)
    advisor_id: str | None
    custodian: str
    symbol: str
    cusip: str | None
    security_type: SecurityType
    side: Side
    discretionary: bool
    quantity: Decimal
    order_type: Literal["market"] = "market"
    time_in_force: Literal["day"] = "day"
    placed_by: str
    placed_at: datetime
    allocations: tuple[Order, ...]

    @field_validator("placed_at")
    @classmethod
    def _placed_at_utc(cls, value: datetime) -> datetime:
        return _utc_seconds(value)

    @model_validator(mode="after")
    def _allocations_make_the_block(self) -> BlockOrder:
        if len(self.allocations) < 2:
            raise ValueError("a block has at least two allocations")
        for order in self.allocations:
            same = (order.block_id, order.custodian, order.advisor_id, order.symbol, order.side, order.discretionary,
                    order.placed_by, order.placed_at)
            if same != (self.block_id, self.custodian, self.advisor_id, self.symbol, self.side, self.discretionary,
                        self.placed_by, self.placed_at) or order.by_amount:
                raise ValueError(f"allocation {order.cl_ord_id} does not belong to block {self.block_id}")
        total = sum((o.quantity for o in self.allocations), Decimal(0))
        if total != self.quantity:
            raise ValueError(f"block {self.block_id}: allocations sum to {total}, not the block's {self.quantity}")
        return self

    @property
    def terms(self) -> str:
        return (f"{self.side.upper()} {fmt_decimal(self.quantity)} {self.symbol} {self.order_type.upper()} "
                f"{self.time_in_force.upper()} BLOCK OF {len(self.allocations)}")

    @property
    def memo_text(self) -> str:
        """The block's memo reference: the shared fields, MULTI where allocations differ; each
        allocation's full memo is found by its IndividualAllocID (its own ClOrdID)."""
        def one(values: set[str]) -> str:
            return values.pop() if len(values) == 1 else f"MULTI({len(values)})"
        return (f"204-2 BLOCK ALLOCS={len(self.allocations)} "
                f"REC={one({o.recommendation_id for o in self.allocations})} "
                f"POL={one({o.policy_version for o in self.allocations})} "
                f"APR={one({o.approved_by for o in self.allocations})} "
                f"PLC={self.placed_by} DISC={'Y' if self.discretionary else 'N'}")


class TicketBatch(_Frozen):
    """Every order of a run: account orders (some of them allocations of a block) and blocks."""

    orders: tuple[Order, ...]
    blocks: tuple[BlockOrder, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> TicketBatch:
        ids = [o.cl_ord_id for o in self.orders] + [b.block_id for b in self.blocks]
        if len(ids) != len(set(ids)):
            raise ValueError("ClOrdIDs repeat within the batch")
        allocations = {o.cl_ord_id: o for b in self.blocks for o in b.allocations}
        for order in self.orders:
            if order.block_id is not None and allocations.get(order.cl_ord_id) != order:
                raise ValueError(f"order {order.cl_ord_id} names block {order.block_id}, which does not allocate it")
        if len(allocations) != sum(1 for o in self.orders if o.block_id):
            raise ValueError("a block allocates an order that is not in the batch")
        return self

    @property
    def standalone(self) -> tuple[Order, ...]:
        return tuple(o for o in self.orders if o.block_id is None)

    @property
    def tickets(self) -> tuple[BlockOrder | Order, ...]:
        """What goes to the desk, in file order: blocks, then the orders not in a block."""
        return self.blocks + self.standalone

    def for_custodian(self, custodian: str) -> TicketBatch:
        return TicketBatch(orders=tuple(o for o in self.orders if o.custodian == custodian),
                           blocks=tuple(b for b in self.blocks if b.custodian == custodian))

    @property
    def custodians(self) -> tuple[str, ...]:
        return tuple(sorted({o.custodian for o in self.orders}))


def order_sort_key(order: Order) -> tuple:
    return (order.custodian, order.account_id, order.symbol, order.side, order.cl_ord_id)


def build_orders(package: RecommendationPackage, trades: Iterable[PackageTrade], decision: ApprovalDecision,
                 securities: Mapping[str, SecurityRef], accounts: Mapping[str, AccountRef], *,
                 placed_by: str, placed_at: datetime, fractional_decimals: int = 3) -> list[Order]:
    """One order per approved trade (zero quantities dropped), sorted by custodian, account,
    symbol, side.

    `trades` are the approved trades: the package's own for an approval, the modified list for a
    modification. Share counts are whole for securities that do not trade fractionally and
    rounded to `fractional_decimals` for those that do. A buy of a fractional fund priced at NAV
    (mutual fund, money market) is a dollar amount, quantity × estimated price to the cent;
    every sell is a share quantity, so a sale of the whole position leaves nothing behind and
    relieves exactly the lots the tax engine chose."""
    if decision.recommendation_id not in (None, package.recommendation_id):
        raise TicketError(f"decision {decision.decision_id} is for recommendation {decision.recommendation_id}, "
                          f"not {package.recommendation_id}")
    if not placed_by:
        raise TicketError("placed_by is required (SEC Rule 204-2(a)(3): the person who placed the order)")
    orders: dict[str, Order] = {}
    for trade in trades:
        if trade.quantity <= 0:
            continue
        where = f"{trade.account_id} {trade.side} {trade.symbol}"
        if trade.account_id not in package.account_ids:
            raise TicketError(f"{where}: the account is not part of recommendation {package.recommendation_id}")
        account = accounts.get(trade.account_id)
        if account is None:
            raise TicketError(f"{where}: no account reference (custodian, discretionary) for the account")
        security = securities.get(trade.symbol)
        if security is None:
            raise TicketError(f"{where}: no security reference (type, CUSIP) for the symbol")
        if security.security_type not in ORDERABLE:
            raise TicketError(f"{where}: a {security.security_type} is not sent as a market order ticket")
        quantity = cash_amount = None
        shares = Decimal(repr(float(trade.quantity)))
        if trade.side == "buy" and security.fractional and security.security_type in FUNDS_AT_NAV:
            cash_amount = (shares * Decimal(repr(float(trade.est_price)))).quantize(CENT, ROUND_HALF_UP)
        elif security.fractional:
            quantity = _plain(shares.quantize(Decimal(1).scaleb(-fractional_decimals), ROUND_HALF_UP))
        else:
            if shares != shares.to_integral_value():
                raise TicketError(f"{where}: {trade.quantity:g} shares, but {trade.symbol} trades in whole shares")
            quantity = _plain(shares)
        order_id = cl_ord_id(decision.decision_id, trade.account_id, trade.symbol, trade.side)
        if order_id in orders:
            raise TicketError(f"{where}: the trade is listed twice")
        orders[order_id] = Order(
            cl_ord_id=order_id, decision_id=decision.decision_id, recommendation_id=package.recommendation_id,
            policy_version=package.policy_version, advisor_id=account.advisor_id or package.advisor_id,
            custodian=account.custodian, account_id=trade.account_id, discretionary=account.discretionary,
            symbol=trade.symbol, cusip=security.cusip or None, security_type=security.security_type, side=trade.side,
            quantity=quantity, cash_amount=cash_amount, approved_by=decision.approved_by, placed_by=placed_by,
            placed_at=placed_at,
        )
    return sorted(orders.values(), key=order_sort_key)


def build_blocks(orders: Iterable[Order]) -> TicketBatch:
    """Block the orders that one advisor places for several accounts at one custodian in the same
    symbol and side; the rest stay single-account orders.

    A block is by share quantity and its allocations sum exactly to it (Decimal arithmetic).
    Not blocked: dollar-amount fund buys (FIX 4.4's PreAllocGrp allocates AllocQty, shares only,
    and a fund fills every account at the same NAV anyway), and discretionary with
    non-discretionary accounts (the first may be auto-submitted, the second are staged for the
    desk, so they are never one order). Orders from several decisions can share a block (a batch
    approval after a market event)."""
    orders = sorted(orders, key=order_sort_key)
    ids = [o.cl_ord_id for o in orders]
    if len(ids) != len(set(ids)):
        raise TicketError("ClOrdIDs repeat: the same approved trade was given twice")
    groups: dict[tuple, list[Order]] = defaultdict(list)
    for order in orders:
        if order.by_amount:
            continue
        groups[(order.custodian, order.advisor_id or "", order.symbol, order.side, order.discretionary,
                order.placed_by, order.placed_at)].append(order)
    blocked: dict[str, str] = {}
    blocks = []
    for (custodian, advisor, symbol, side, discretionary, placed_by, placed_at), members in sorted(
            groups.items(), key=lambda kv: kv[0]):
        if len({o.account_id for o in members}) < 2:
            continue
        block = block_id(o.cl_ord_id for o in members)
        allocations = tuple(o.model_copy(update={"block_id": block}) for o in members)
        blocks.append(BlockOrder(
            block_id=block, advisor_id=members[0].advisor_id, custodian=custodian, symbol=symbol,
            cusip=members[0].cusip, security_type=members[0].security_type, side=side, discretionary=discretionary,
            quantity=sum((o.quantity for o in members), Decimal(0)), placed_by=placed_by, placed_at=placed_at,
            allocations=allocations,
        ))
        blocked.update({o.cl_ord_id: block for o in members})
    final = tuple(o.model_copy(update={"block_id": blocked[o.cl_ord_id]}) if o.cl_ord_id in blocked else o
                  for o in orders)
    return TicketBatch(orders=final, blocks=tuple(blocks))
