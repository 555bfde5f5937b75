"""The approval gate: re-verify a decision against the store and today's positions, record the
verdict once, and commit the account to its orders (the ledger) in the same transaction.

Plain functions over the store's connection; the `approval_gate` op of execute_rebalance
(defs/approvals/jobs.py) is a thin shell around `gate_decision`, and the property tests call it
directly.

What the gate checks, cheap store checks first (the warehouse is read only for a decision that
passed them):
  1. the decision exists and may lead to execution (approve, modify, auto_approve); its
     recommendation is in the matching approved state, not superseded, and no newer
     recommendation of the same account/household and kind exists (a later day's, or a
     re-publish of the same day with corrected inputs): an approval of yesterday's trades must
     not run next to today's;
  2. the decider was allowed (`authority.decider_problems`: one rule for the API, the portal,
     the lifecycle and the gate) and the decision's record is intact (`audit.decision_record_problems`:
     the stored package is the one decided on);
  3. under the accounts' locks (ledger.lock_accounts: one gate per account at a time), with the
     latest `holdings` partition of the warehouse: the ledger is first brought up to date with
     those holdings (fills, ledger.record_fills); no account already has an order set for the
     recommendation's as-of date (one per account and day, ledger L1); and the trades pass
     `package.trades_still_fit` against the holdings NET of every open order of the accounts,
     from any decision of any day, rebalance and harvest alike (no overselling, cash floor, no
     restricted or barred buy, whole shares, fractional decimals, no CASH / money-market line).
A pass opens the accounts' order sets (ledger.open_order_set) and records the verdict
(`lifecycle.record_gate_verdict`) in one transaction: two gates can never both pass on one view.
A refusal records the verdict and hands the recommendation back to whoever decides it now
(pending for the advisor, escalated for compliance), the reason shown in the API (the
recommendation's `last_gate_refusal`), the portal and the audit trail (`gate_refused`).

The gate FAILS (GateCannotCheck: no verdict recorded, a re-execution checks again) only when it
cannot check: no such decision, the warehouse is busy or unreadable, or it has no holdings as
recent as the recommendation. A verdict is final: re-running reports the recorded verdict.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Callable

import duckdb
from pydantic import ValidationError
from sqlalchemy import Connection, and_, or_, select
from sqlalchemy.exc import IntegrityError

from rebal_pipeline.core.clock import utc as _utc
from rebal_pipeline.workflow import audit, authority, ledger, lifecycle
from rebal_pipeline.workflow.package import (
    PackageTrade, RecommendationPackage, TradeChange, apply_modification, trades_still_fit,
)
from rebal_pipeline.workflow.schema import decisions, recommendations

# The decisions that may lead to execution, and the recommendation state each one leaves behind.
EXECUTABLE = {"approve": "approved", "modify": "modified", "auto_approve": "auto_approved"}
APPROVED_TRADES_FORMAT = "rebal.approved_trades/1"


class GateCannotCheck(RuntimeError):
    """The gate could not check a decision (not a refusal): the run fails, no verdict is recorded."""


Positions = dict[tuple[str, str], float]
PositionsLoader = Callable[[list[str]], tuple[date, Positions]]


@dataclass(frozen=True)
class GateVerdict:
    decision_id: str
    recommendation_id: str
    passed: bool
    reason: str
    recorded_by_this_run: bool  # False: an earlier run had recorded it (the verdict is final)
    trades: tuple[PackageTrade, ...] = ()
    positions_as_of: date | None = None
    handoff: dict | None = None  # the approved-trades document, when passed


def _iso(value: Any) -> Any:
    if isinstance(value, datetime):
        return _utc(value).isoformat()
    if isinstance(value, date):
        return value.isoformat()
    return value


def latest_positions(con: duckdb.DuckDBPyConnection, account_ids: list[str]) -> tuple[date, Positions]:
    """Today's positions: the latest `holdings` partition, for these accounts only."""
    if con.execute("select 1 from information_schema.tables where table_name = 'holdings'").fetchone() is None:
        raise GateCannotCheck("the warehouse has no holdings table: the daily drift scan has not run on it")
    as_of = con.execute("select max(as_of) from holdings").fetchone()[0]
    if as_of is None:
        raise GateCannotCheck("the warehouse's holdings table is empty")
    rows = con.execute(
        "select account_id, symbol, sum(quantity)::double from holdings "
        "where as_of = $as_of and list_contains($accounts, account_id) group by account_id, symbol",
        {"as_of": as_of, "accounts": list(account_ids)},
    ).fetchall()
    return as_of, {(account, symbol): float(quantity) for account, symbol, quantity in rows}


# ---------------------------------------------------------------------------------------------
# Who decided (authority.py owns the rule) and whether the record still matches (audit.py)
# ---------------------------------------------------------------------------------------------


def warehouse_positions(connect: Callable[[], Any]) -> PositionsLoader:
    """The gate's positions loader over a warehouse (`connect`: opens a DuckDB connection as a
    context manager). A warehouse that cannot be read now (e.g. the daily run holds the file's
    write lock) is GateCannotCheck caused by the duckdb error: try again later."""
    def positions_for(account_ids: list[str]) -> tuple[date, Positions]:
        try:
            with connect() as con:
                return latest_positions(con, account_ids)
        except duckdb.Error as exc:
            raise GateCannotCheck(f"the warehouse cannot be read now: {type(exc).__name__}: {exc}") from exc
    return positions_for


def accounts_of(conn: Connection, recommendation_id: str) -> list[str]:
    """The accounts of a recommendation's package (what a verdict's reason may name)."""
    package = conn.execute(select(recommendations.c.package).where(
        recommendations.c.recommendation_id == recommendation_id)).scalar_one()
    return list(json.loads(package).get("account_ids", ()))


def _decider_problems(conn: Connection, decision: dict, rec: dict, policy: lifecycle.LifecyclePolicy) -> list[str]:
    return authority.decider_problems(conn, decision, rec, policy)


def _record_problems(conn: Connection, decision: dict, rec: dict) -> list[str]:
    # The stored package and decision row must still be the ones the decision's audit event
    # recorded (their SHA-256): an edited package never reaches an order file.
    return audit.decision_record_problems(conn, decision, rec)


def _state_problems(conn: Connection, decision: dict, rec: dict) -> list[str]:
    expected = EXECUTABLE.get(decision["action"])
    if expected is None:
        return [f"a {decision['action']} decision does not lead to execution"]
    problems = []
    if rec["status"] == "superseded" or rec["superseded_by"]:
        problems.append(f"the recommendation was superseded by {rec['superseded_by']}")
    elif rec["status"] != expected:
        problems.append(f"the recommendation is {rec['status']}, not {expected}")
    newer = newer_recommendation(conn, rec)
    if newer is not None:
        when = (f"a later scan ({_iso(newer.as_of)})" if newer.as_of > rec["as_of"]
                else f"a re-run of {_iso(newer.as_of)} with changed inputs")
        problems.append(f"{when} produced recommendation {newer.recommendation_id} for {rec['lineage']}: "
                        "the approved trades are out of date")
    return problems


def newer_recommendation(conn: Connection, rec: dict):
    """The newest recommendation of the same lineage published after this one (a later day, or
    the same day re-published with changed inputs), historical ones aside; None if none."""
    r = recommendations.c
    return conn.execute(
        select(r.recommendation_id, r.as_of).where(and_(
            r.lineage == rec["lineage"], r.recommendation_id != rec["recommendation_id"], r.status != "historical",
            or_(r.as_of > rec["as_of"], and_(r.as_of == rec["as_of"], r.created_at > rec["created_at"]))))
        .order_by(r.as_of.desc(), r.created_at.desc()).limit(1)
    ).first()


def approved_trades(decision: dict, package: RecommendationPackage) -> tuple[list[PackageTrade], list[str]]:
    """The trades the decision approved, and why they cannot be used (empty: they can).
    modify: the decision payload's `trades` (the modified trade list, as `apply_modification`
    returned it), or else its `changes` (TradeChange lines) applied to the package again."""
    if decision["action"] != "modify":
        return list(package.trades), []
    payload = json.loads(decision["payload"] or "{}")
    try:
        if "trades" in payload:
            trades = [PackageTrade.model_validate(t) for t in payload["trades"]]
        elif "changes" in payload:
            check = apply_modification(package, [TradeChange.model_validate(c) for c in payload["changes"]])
            if check.errors:
                return [], [f"the modification no longer validates: {error}" for error in check.errors]
            trades = check.trades
        else:
            return [], ["the modify decision does not carry its modified trades (payload 'trades' or 'changes')"]
    except ValidationError as exc:
        return [], [f"the modified trades in the decision cannot be read ({exc.error_count()} invalid fields)"]
    strangers = sorted({t.account_id for t in trades} - set(package.account_ids))
    return trades, [f"{a}: not an account of this recommendation" for a in strangers]


def gate_decision(conn: Connection, decision_id: str, positions_for: PositionsLoader, now: datetime,
                  policy: lifecycle.LifecyclePolicy = lifecycle.LifecyclePolicy()) -> GateVerdict:
    """Re-verify a decision and record the verdict (once), in the caller's transaction (see the
    module docstring). On a pass the accounts' order sets are opened in the same transaction."""
    now = _utc(now)
    decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
    if decision is None:
        raise GateCannotCheck(f"no decision {decision_id} in the workflow store")
    rec = conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == decision["recommendation_id"])).mappings().one()
    package = RecommendationPackage.model_validate_json(rec["package"])
    if decision["gate_verdict"] is not None:
        return _verdict(dict(decision), dict(rec), package, recorded_by_this_run=False)

    problems = (_state_problems(conn, decision, rec) + _decider_problems(conn, dict(decision), dict(rec), policy)
                + _record_problems(conn, dict(decision), dict(rec)))
    trades: list[PackageTrade] = []
    as_of = None
    today: Positions = {}
    if not problems:
        trades, problems = approved_trades(decision, package)
    if not problems and not trades:
        problems = ["the approved trade list is empty: nothing to execute"]
    accounts = sorted(set(package.account_ids) | {t.account_id for t in trades})
    if not problems:
        ledger.lock_accounts(conn, accounts)
        # Read again under the lock: another gate may have decided this one meanwhile.
        if conn.execute(select(decisions.c.gate_verdict).where(decisions.c.decision_id == decision_id)
                        ).scalar_one() is not None:
            stored = dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id))
                          .mappings().one())
            return _verdict(stored, dict(rec), package, recorded_by_this_run=False)
        as_of, today = positions_for(accounts)
        if as_of < rec["as_of"]:
            raise GateCannotCheck(f"the warehouse's latest holdings are of {as_of}, older than the recommendation "
                                  f"({_iso(rec['as_of'])}): is this the warehouse it came from?")
        held = {account for account, _ in today}
        problems = [f"{a}: no positions in the latest holdings ({as_of}): held out for data quality or closed"
                    for a in accounts if a not in held]
        if not problems:
            ledger.record_fills(conn, as_of, today, accounts, now)
            taken = ledger.order_sets_on(conn, {t.account_id for t in trades}, rec["as_of"])
            problems = [f"{a}: already has orders for {_iso(rec['as_of'])} (decision {s['decision_id']}, "
                        f"{s['kind']}, {s['state']}): one set of orders per account and day"
                        for a, s in sorted(taken.items())]
            reserved = ledger.reserved(conn, accounts, as_of, today)
            problems += trades_still_fit(package, trades, today, reserved)
    if not problems:
        try:
            with conn.begin_nested():
                ledger.open_order_set(conn, decision_id, dict(rec), trades, as_of, today, now)
        except IntegrityError:  # the store's unique key (account, as-of date): never two order sets
            problems = ["an order set of this account and day was recorded meanwhile: one set of orders per "
                        "account and day"]
    if problems:
        reason = "; ".join(problems)
    else:
        reason = (f"{decision['action']} by {decision['actor_id']} re-verified: {len(trades)} trades fit the "
                  f"positions of {as_of} net of the accounts' open orders")
    lifecycle.record_gate_verdict(conn, decision_id, not problems, reason, now)
    stored = dict(conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().one())
    # Two runs of one decision at once: the first verdict stands and both report it.
    mine = stored["gate_reason"] == reason and _utc(stored["gate_checked_at"]) == now
    return _verdict(stored, dict(rec), package, recorded_by_this_run=mine, positions_as_of=as_of)


def handoff_document(decision: dict, rec: dict, package: RecommendationPackage,
                     trades: list[PackageTrade]) -> dict:
    """The approved-trades document (rebal.approved_trades/1) of a passed decision, built from the
    store alone: the same on every call."""
    return {
        "format": APPROVED_TRADES_FORMAT,
        "decision_id": decision["decision_id"],
        "decision_seq": decision["decision_seq"],
        "action": decision["action"],
        "decided_by": decision["actor_id"],
        "decided_via": decision["via"],
        "decided_at": _iso(decision["created_at"]),
        "decision_reason": decision["reason"],
        "gate": {"verdict": "passed", "reason": decision["gate_reason"],
                 "checked_at": _iso(decision["gate_checked_at"])},
        "recommendation": {
            "recommendation_id": rec["recommendation_id"], "as_of": _iso(rec["as_of"]), "scope": rec["scope"],
            "scope_id": rec["scope_id"], "kind": rec["kind"], "advisor_id": rec["advisor_id"],
            "household_id": rec["household_id"], "account_ids": list(package.account_ids),
            "discretionary": bool(rec["discretionary"]), "policy_version": rec["policy_version"],
            "model_version": package.model_version,
        },
        "trades": [t.model_dump(mode="json") for t in trades],
    }


def passed_trades(conn: Connection, decision_id: str) -> tuple[dict, list[PackageTrade]]:
    """The approved-trades document and trades of a decision the gate passed, read from the
    workflow store (the source of truth for ticketing; the outbox file is for people). Raises
    GateCannotCheck when the decision is unknown or was not passed."""
    decision = conn.execute(select(decisions).where(decisions.c.decision_id == decision_id)).mappings().first()
    if decision is None:
        raise GateCannotCheck(f"no decision {decision_id} in the workflow store")
    if decision["gate_verdict"] != "passed":
        raise GateCannotCheck(f"decision {decision_id} has gate verdict {decision['gate_verdict'] or 'none'}, "
                              "not passed: nothing is ticketed")
    rec = conn.execute(select(recommendations).where(
        recommendations.c.recommendation_id == decision["recommendation_id"])).mappings().one()
    package = RecommendationPackage.model_validate_json(rec["package"])
    trades, problems = approved_trades(dict(decision), package)
    if problems:
        raise GateCannotCheck("; ".join(problems))
    return handoff_document(dict(decision), dict(rec), package, trades), trades


def _verdict(decision: dict, rec: dict, package: RecommendationPackage, recorded_by_this_run: bool,
             positions_as_of: date | None = None) -> GateVerdict:
    passed = decision["gate_verdict"] == "passed"
    trades = approved_trades(decision, package)[0] if passed else []
    return GateVerdict(
        decision_id=decision["decision_id"], recommendation_id=rec["recommendation_id"], passed=passed,
        reason=decision["gate_reason"] or "", recorded_by_this_run=recorded_by_this_run, trades=tuple(trades),
        positions_as_of=positions_as_of, handoff=handoff_document(decision, rec, package, trades) if passed else None,
    )
