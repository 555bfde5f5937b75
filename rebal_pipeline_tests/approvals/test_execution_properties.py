"""Property test of execution safety (issue 12; invariants in workflow/ledger.py and gate.py).

Hypothesis draws random sequences over a one-account book (a rebalance and a harvest lineage):
publishing a day (new, re-published with perturbed prices, or an older day), decisions through the
approval API (approve, modify with random quantities, defer, escalate, compliance approving, a
batch), gate runs (`gate.gate_decision` called directly, then the ticket and submit functions),
fills seen on the next day's positions, the desk's cancellations, and market events: an event's
batch takes the waiting recommendations, their decisions are held (the single-decision gate skips
them, as the decision sensor does) and go out in a release, gated one by one and blocked together
(`submit.build_release_tickets`). After every step:
  - the open (staged + submitted, unfilled) sells of a symbol never exceed the holding;
  - cash plus what the open orders move never goes below the cash floor (5% min_cash_weight);
  - at most one order set (one set of orders, one confirmation) per account and as-of date;
  - no recommendation is stuck: each one not final is decidable by an active person, or waits
    for the gate, or has its orders open;
  - a batch member's decision is gated only through a release, and is in at most one;
  - the audit chain verifies.
A few dozen examples by default (REBAL_HYPOTHESIS_EXAMPLES for more), on SQLite always and on
Postgres when CI=true (the `store` fixture). Packages and people are built through
rebal_pipeline_tests/factories.py."""

from __future__ import annotations

import itertools
import os
import secrets
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.errors import InvalidArgument
from sqlalchemy import func, select

from rebal_pipeline.approval_api.app import create_app
from rebal_pipeline.execution import submit
from rebal_pipeline.market_events import batches
from rebal_pipeline.tickets import FixSession
from rebal_pipeline.tickets.orders import AccountRef, SecurityRef
from rebal_pipeline.workflow import audit, gate, ledger, lifecycle
from rebal_pipeline.workflow.package import (
    PackageRestriction, RecommendationPackage, TradeRules,
)
from rebal_pipeline.workflow.schema import (
    batch_recommendations, decisions, ledger_orders, order_sets, recommendations, users,
)
from rebal_pipeline_tests import factories
from rebal_pipeline_tests.factories import DESK, USERS

EXAMPLES = int(os.environ.get("REBAL_HYPOTHESIS_EXAMPLES", "30"))
PEOPLE = [*USERS, DESK]
PRICES = {"VTI": 100.0, "BND": 50.0, "CASH": 1.0}
CLASSES = {"VTI": "equity", "BND": "fixed_income", "CASH": "cash"}
FLOOR = 0.05
FINAL = ("executed", "partially_executed", "cancelled", "superseded", "resolved_by_market",
         "blocked_by_open_orders", "historical")
_examples = itertools.count()


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def note(text: str) -> None:
    """A hypothesis event (for --hypothesis-show-statistics); nothing outside a hypothesis test."""
    try:
        event(text)
    except InvalidArgument:
        pass

DECIDE = st.tuples(st.just("decide"), st.sampled_from(["approve", "approve", "modify", "modify", "defer", "escalate",
                                                        "compliance", "batch"]),
                   st.integers(0, 5), st.sampled_from([0, 3, 10, 25, 46, 60, 12.5, 1e-9]), st.integers(0, 60))
GATE = st.tuples(st.just("gate"), st.integers(0, 5), st.booleans())
step = st.one_of(
    DECIDE, GATE, DECIDE, GATE, DECIDE, GATE,
    st.tuples(st.just("publish"), st.sampled_from(["rebalance", "harvest"]), st.integers(1, 30),
              st.integers(0, 40)),
    st.tuples(st.just("republish"), st.sampled_from(["rebalance", "harvest"]), st.floats(-0.02, 0.02)),
    st.tuples(st.just("older"), st.sampled_from(["rebalance", "harvest"])),
    st.tuples(st.just("next_day"), st.lists(st.booleans(), min_size=4, max_size=4)),
    st.tuples(st.just("cancel"), st.integers(0, 5)),
    # People come and go: the advisor of record leaves users.csv (the next feed names a new one),
    # and the departed advisor then tries to decide with their old token.
    st.tuples(st.just("leave")),
    st.tuples(st.just("departed_decides"), st.integers(0, 5)),
    # A market event takes the waiting recommendations into the day's batch; a release gates its
    # held decisions and stages their orders together.
    # (review: the advisor then approves the batch's rows in one session, through the API's batch)
    st.tuples(st.just("market_event"), st.booleans()),
    st.tuples(st.just("release"), st.booleans()),
    st.tuples(st.just("release"), st.booleans()),
)
STAFF = [u for u in PEOPLE if u["role"] != "advisor"]


class World:
    """One example's account, its positions day by day, and the API over the shared store."""

    def __init__(self, store, api: TestClient, tokens: dict[str, str], outbox):
        n = next(_examples)
        self.store, self.api, self.tokens, self.outbox = store, api, tokens, outbox
        self.account = f"P{n}-ACC"
        # Each example has days of its own, after every earlier example's (the history rule is global).
        self.base = date(2030, 1, 1) + timedelta(days=20 * n)
        self.day = 0
        self.positions = {0: {"VTI": 46.0, "BND": 60.0, "CASH": 900.0}}
        self.now = datetime(2030, 1, 1, tzinfo=timezone.utc) + timedelta(days=20 * n, hours=22)
        self.published = 0
        self.batches: set[str] = set()  # the market-event batches this example opened
        # Advisors of this example's own (the users table is shared by every example of the run):
        # A is the advisor of record until a "leave" step hands the account to B.
        self.advisors = [factories.user(f"P{n}-ADV-{x}", name=f"Advisor {x} {n}", email=f"adv{x}{n}@example-ria.com")
                         for x in "AB"]
        self.advisor, self.departed = self.advisors[0]["user_id"], None
        self.people = [*STAFF, *self.advisors]
        with store.begin() as conn:
            lifecycle.sync_users(conn, self.people, self.now)
            for person in self.advisors:
                self.tokens[person["user_id"]] = secrets.token_urlsafe(24)
                lifecycle.issue_api_token(conn, person["user_id"], self.tokens[person["user_id"]], self.now)

    def as_of(self, day: int) -> date:
        return self.base + timedelta(days=day)

    def tick(self, minutes: int = 5) -> datetime:
        self.now += timedelta(minutes=minutes)
        return self.now

    # -- the daily run ------------------------------------------------------------------------

    def package(self, kind: str, day: int, sell: float, buy: float, drift: float = 0.0) -> RecommendationPackage:
        self.published += 1
        prices = {s: (p * (1 + drift) if s != "CASH" else p) for s, p in PRICES.items()}
        held = self.positions[day]
        holdings = [factories.holding(self.account, s, CLASSES[s], q, prices[s], fractional=False,
                                      security_type="cash" if s == "CASH" else "etf") for s, q in held.items()]
        trades = []
        # est_value unrounded (quantity × the drawn price): the values these examples have always drawn.
        if sell:
            trades.append(factories.trade(self.account, "VTI", "equity", "sell", sell, prices["VTI"], kind,
                                          est_value=sell * prices["VTI"], fractional=False, security_type="etf"))
        if buy:
            trades.append(factories.trade(self.account, "BND", "fixed_income", "buy", buy, prices["BND"], kind,
                                          est_value=buy * prices["BND"], fractional=False, security_type="etf"))
        return factories.make_package(
            recommendation_id=f"{self.account}-{kind}-{day}-{self.published}", as_of=self.as_of(day),
            scope_id=self.account, kind=kind, advisor_id=self.advisor, household_id=None, policy_version="test",
            trades=trades, holdings=holdings,
            restrictions=[PackageRestriction(account_id=self.account, kind="min_cash_weight", value=str(FLOOR))],
            trade_rules=TradeRules())

    def publish(self, package: RecommendationPackage, day: int) -> None:
        with self.store.begin() as conn:
            lifecycle.sync_users(conn, self.people, self.now, {("account", self.account): self.advisor})
            lifecycle.publish_day(conn, self.as_of(day), [{
                "recommendation_id": package.recommendation_id, "scope": package.scope,
                "scope_id": package.scope_id, "kind": package.kind, "household_id": None, "advisor_id": self.advisor,
                "tier": None, "urgency": "medium", "delivery": "within_48h", "discretionary": False,
                "trade_value": sum(t.est_value for t in package.trades), "realized_gain": 10.0,
                "policy_version": "test", "positions_fingerprint": package.positions_fingerprint,
                "package": package.model_dump(mode="json")}], set(), self.tick())

    # -- reading the store -------------------------------------------------------------------

    def recs(self) -> list[dict]:
        with self.store.begin() as conn:
            return [dict(r) for r in conn.execute(select(recommendations).where(
                recommendations.c.scope_id == self.account).order_by(recommendations.c.created_at,
                                                                     recommendations.c.recommendation_id)).mappings()]

    def executable(self) -> list[dict]:
        with self.store.begin() as conn:
            return [dict(r) for r in conn.execute(
                select(decisions).join(recommendations,
                                       recommendations.c.recommendation_id == decisions.c.recommendation_id)
                .where(recommendations.c.scope_id == self.account,
                       decisions.c.action.in_(("approve", "modify", "auto_approve")))
                .order_by(decisions.c.decision_seq)).mappings()]

    def positions_for(self, _accounts):
        day = max(self.positions)
        return self.as_of(day), {(self.account, s): q for s, q in self.positions[day].items()}

    # -- the steps ---------------------------------------------------------------------------

    def run(self, action) -> None:
        kind = action[0]
        if kind == "publish":
            _, lineage, sell, buy = action
            self.day += 1
            self.positions[self.day] = dict(self.positions[self.day - 1])
            self.publish(self.package(lineage, self.day, sell, buy), self.day)
        elif kind == "republish":
            _, lineage, drift = action
            old = [r for r in self.recs() if r["kind"] == lineage and r["as_of"] == self.as_of(self.day)]
            if old:
                pkg = RecommendationPackage.model_validate_json(old[-1]["package"])
                sell = sum(t.quantity for t in pkg.trades if t.side == "sell")
                buy = sum(t.quantity for t in pkg.trades if t.side == "buy")
                self.publish(self.package(lineage, self.day, sell, buy, drift), self.day)
        elif kind == "older":
            if self.day > 1:
                self.publish(self.package(action[1], self.day - 1, 5, 10), self.day - 1)
        elif kind == "decide":
            self.decide(*action[1:])
        elif kind == "gate":
            self.gate(*action[1:])
        elif kind == "next_day":
            self.next_day(action[1])
        elif kind == "leave":
            if self.departed is None:
                self.departed, self.advisor = self.advisor, self.advisors[1]["user_id"]
                self.people = [p for p in self.people if p["user_id"] != self.departed]
                with self.store.begin() as conn:
                    lifecycle.sync_users(conn, self.people, self.tick(), {("account", self.account): self.advisor})
        elif kind == "departed_decides":
            recs = self.recs()
            if self.departed is not None and recs:
                rec = recs[action[1] % len(recs)]
                response = self.api.post(f"/recommendations/{rec['recommendation_id']}/decisions",
                                         headers={"Authorization": f"Bearer {self.tokens[self.departed]}"},
                                         json={"action": "approve"})
                assert response.status_code == 401, response.text  # the token died with the departure
        elif kind == "market_event":
            self.market_event(action[1])
        elif kind == "release":
            self.release(action[1])
        elif kind == "cancel":
            done = [d for d in self.executable() if d["gate_verdict"] == "passed"]
            if done:
                with self.store.begin() as conn:
                    try:
                        ledger.cancel(conn, done[action[1] % len(done)]["decision_id"], "DESK-1", "desk cancel",
                                      self.tick())
                    except ledger.LedgerError:
                        pass

    def decide(self, verb, pick, sell, buy) -> None:
        recs = self.recs()
        if not recs:
            return
        rec = recs[pick % len(recs)]
        user, body = self.advisor, {"action": verb}
        if verb == "compliance":
            user, body = "CCO-1", {"action": "approve"}
        elif verb == "modify":
            body["trades"] = [{"account_id": self.account, "symbol": "VTI", "side": "sell", "quantity": float(sell)},
                              {"account_id": self.account, "symbol": "BND", "side": "buy", "quantity": float(buy)}]
        if verb in ("defer", "escalate"):
            body["reason"] = f"{verb} for the property test"
        headers = {"Authorization": f"Bearer {self.tokens[user]}"}
        if verb == "batch":
            response = self.api.post("/decisions/batch", headers=headers, json={"items": [
                {"recommendation_id": r["recommendation_id"], "action": "approve"} for r in recs[-3:]]})
            assert response.status_code == 200, response.text
            assert all(item["status"] < 500 for item in response.json()["results"]), response.text
            return
        response = self.api.post(f"/recommendations/{rec['recommendation_id']}/decisions", headers=headers, json=body)
        assert response.status_code in (200, 201, 403, 409, 422), response.text
        note(f"{verb}: {response.status_code}")

    def gate(self, pick, auto_submit) -> None:
        executable = self.executable()  # read before the transaction (one writer at a time on SQLite)
        with self.store.begin() as conn:
            # A batch member's decision is not launched alone (the decision sensor skips it).
            waiting = [d for d in executable if d["gate_verdict"] is None
                       and batches.goes_with_batch(conn, d["decision_id"]) is None]
        if not waiting:
            return
        decision_id = waiting[pick % len(waiting)]["decision_id"]
        now = self.tick()
        with self.store.begin() as conn:
            verdict = gate.gate_decision(conn, decision_id, self.positions_for, now)
        note(f"gate {'passed' if verdict.passed else 'refused'}")
        if not verdict.passed:
            return
        with self.store.begin() as conn:
            approved = submit.load_approved_decision(conn, decision_id)
            _, trades = gate.passed_trades(conn, decision_id)
        tickets = submit.build_tickets(approved, trades, *self.reference(auto_submit), auto_submit=auto_submit,
                                       desk_id="trading_desk")
        submit.stage_and_submit(self.store, tickets, session=FixSession(), now=self.tick, outbox=self.outbox)
        with self.store.begin() as conn:
            ledger.record_outcome(conn, decision_id, self.tick())

    def reference(self, discretionary: bool):
        securities = {s: SecurityRef(symbol=s, cusip=None, security_type="etf", fractional=False)
                      for s in ("VTI", "BND")}
        accounts = {self.account: AccountRef(account_id=self.account, custodian="schwab", discretionary=discretionary)}
        return securities, accounts

    def market_event(self, review: bool) -> None:
        """An operator declares a market event today; the waiting recommendations join its batch
        (and, with `review`, the advisor approves the joined ones in one batch request)."""
        waiting = [r["recommendation_id"] for r in self.recs()]  # read before the transaction
        now, day = self.tick(), self.as_of(self.day)
        with self.store.begin() as conn:
            found = batches.record_event(
                conn, event_key=f"operator:{self.account}:{now.isoformat()}", source=batches.OPERATOR,
                declared_by="OPS-1", reason="property test", day=day, session_as_of=day, detected_at=now, now=now,
                basket=[("VTI", Decimal(1))], threshold=Decimal("0.03"), release_after=timedelta(minutes=20),
                basket_prices=None, session_closes=None)
            joined = batches.add_members(conn, found.event_id, waiting, now)
        self.batches.add(found.batch_id)
        note(f"market event: {len(joined)} joined")
        if review and joined:
            response = self.api.post("/decisions/batch", headers={"Authorization": f"Bearer {self.tokens[self.advisor]}"},
                                     json={"items": [{"recommendation_id": r, "action": "approve"} for r in joined]})
            assert response.status_code == 200 and all(i["status"] < 500 for i in response.json()["results"]), \
                response.text

    def release(self, auto_submit: bool) -> None:
        """Every due release of this example's batches, as execute_rebalance runs it: claimed once,
        each decision gated alone, the passed ones' orders blocked together, exactly once."""
        now = self.tick(30)
        with self.store.begin() as conn:
            due = [r for r in batches.due_releases(conn, now) if r.batch_id in self.batches]
        for release in due:
            with self.store.begin() as conn:
                claimed = batches.claim_release(conn, release.release_id, "property-test", now)
            passed = []
            for decision_id in claimed:
                with self.store.begin() as conn:
                    if gate.gate_decision(conn, decision_id, self.positions_for, self.tick()).passed:
                        passed.append(decision_id)
            note(f"release: {len(passed)} of {len(claimed)} passed")
            if not passed:
                continue
            with self.store.begin() as conn:
                approved = [submit.load_approved_decision(conn, d) for d in passed]
                trades = {d: gate.passed_trades(conn, d)[1] for d in passed}
            tickets = submit.build_release_tickets(release.release_id, approved, trades, *self.reference(auto_submit),
                                                   auto_submit=auto_submit, desk_id="trading_desk")
            submit.stage_and_submit(self.store, tickets, session=FixSession(), now=self.tick, outbox=self.outbox)
            with self.store.begin() as conn:
                for decision_id in passed:
                    ledger.record_outcome(conn, decision_id, self.tick())

    def next_day(self, fills) -> None:
        """A new session: each open line fills (or not) at the custodian; the next day's positions."""
        held = dict(self.positions[self.day])
        with self.store.begin() as conn:
            lines = ledger.open_lines(conn, [self.account])
        for line, filled in zip(lines, itertools.cycle(fills)):
            if not filled:
                continue
            sign = -1 if line["side"] == "sell" else 1
            held[line["symbol"]] = held.get(line["symbol"], 0.0) + sign * line["quantity"]
            held["CASH"] -= sign * line["quantity"] * line["est_price"]
        self.day += 1
        self.positions[self.day] = held
        with self.store.begin() as conn:
            ledger.record_fills(conn, self.as_of(self.day), {(self.account, s): q for s, q in held.items()},
                                [self.account], self.tick())

    # -- the invariants ----------------------------------------------------------------------

    def check(self) -> None:
        day, positions = self.positions_for(None)
        recs, executable = self.recs(), self.executable()
        with self.store.begin() as conn:
            reserved = ledger.reserved(conn, [self.account], day, positions)
            open_sells = reserved.sells.get((self.account, "VTI"), 0.0)
            assert open_sells <= positions[(self.account, "VTI")] + 1e-6, (open_sells, positions)
            value = sum(q * PRICES[s] for (_, s), q in positions.items())
            cash = positions[(self.account, "CASH")] + reserved.cash.get(self.account, 0.0)
            assert cash >= FLOOR * value * 0.97 - 0.01, (cash, value)
            per_day = conn.execute(select(order_sets.c.as_of, func.count()).where(
                order_sets.c.account_id == self.account).group_by(order_sets.c.as_of)).all()
            assert all(count == 1 for _, count in per_day), per_day
            lines = conn.execute(select(func.count()).select_from(ledger_orders).where(
                ledger_orders.c.account_id == self.account)).scalar()
            assert lines == 0 or per_day
            active = {r.user_id: r.role for r in conn.execute(select(users.c.user_id, users.c.role).where(users.c.active))}
            for rec in recs:
                status = rec["status"]
                if status in FINAL:
                    continue
                if status in ("pending", "deferred"):
                    assert active.get(rec["advisor_id"]) == "advisor", rec
                elif status == "escalated":
                    assert "compliance" in active.values(), rec
                else:  # approved / modified / auto_approved: waiting for the gate, or its orders are open
                    mine = [d for d in executable if d["recommendation_id"] == rec["recommendation_id"]]
                    assert mine and mine[-1]["gate_verdict"] in (None, "passed"), (rec, mine)
            joined = dict(conn.execute(select(batch_recommendations.c.recommendation_id,
                                              batch_recommendations.c.added_at)).all())
            for decision in executable:  # E5: a member's decision is gated through one release only
                added = joined.get(decision["recommendation_id"])
                if added is None or not decision["gate_verdict"] or batches.release_of(conn, decision["decision_id"]):
                    continue
                # Gated alone: only before the recommendation joined (a refusal hands it back to the
                # advisor, and a later market event may take it in then).
                assert _aware(decision["gate_checked_at"]) <= _aware(added), (decision, added)
            verified = audit.verify(conn)
            assert verified.ok, str(verified)


@pytest.fixture
def world_factory(store, tmp_path):
    tokens = {}
    with store.begin() as conn:
        lifecycle.sync_users(conn, PEOPLE, datetime(2030, 1, 1, tzinfo=timezone.utc))
        for user in PEOPLE:
            tokens[user["user_id"]] = secrets.token_urlsafe(24)
            lifecycle.issue_api_token(conn, user["user_id"], tokens[user["user_id"]],
                                      datetime(2030, 1, 1, tzinfo=timezone.utc))
    state = {}
    app = create_app(store, b"property-test-secret-of-at-least-32-bytes", clock=lambda: state["world"].now)
    api = TestClient(app)

    def make() -> World:
        state["world"] = World(store, api, tokens, tmp_path / "outbox")
        return state["world"]
    return make


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(steps=st.lists(step, min_size=4, max_size=16))
def test_no_sequence_places_a_wrong_or_duplicate_order(world_factory, steps):
    world = world_factory()
    # Every example starts from a day with both lineages waiting: a rebalance (sell 10 VTI, buy 18
    # BND) and a harvest (sell 30 VTI) of the same account: 40 of its 46 VTI between them.
    world.run(("publish", "rebalance", 10, 18))
    world.publish(world.package("harvest", world.day, 30, 0), world.day)
    world.check()
    for action in steps:
        world.run(action)
        world.check()

