"""A week of supervision on the real workflow store (SQLite and Postgres): recommendations,
decisions and exceptions whose report figures are computed by hand in test_report.py.

The week: Monday 16 to Sunday 22 November 2026 (New York), so the period runs from
2026-11-16 05:00 UTC to 2026-11-23 05:00 UTC. Everything below is published on Friday 20 at
16:30 New York (PUBLISHED_AT, 21:30 UTC) unless it says otherwise:

| rec    | account      | advisor | what happens                                              | hours |
|--------|--------------|---------|-----------------------------------------------------------|-------|
| REC-A1 | ACC-0001001  | ADV-1   | approved at +2h                                           | 2     |
| REC-A2 | ACC-0001002  | ADV-1   | deferred at +6h (client travelling)                       | 6     |
| REC-A3 | ACC-0001003  | ADV-1   | modified at +4h, the new trades leave equity outside      | 4     |
| REC-A4 | ACC-0001004  | ADV-1   | its trades cannot reach the bands; approved at +30h       | 30    |
| REC-B1 | ACC-0002001  | ADV-2   | escalated by the advisor at +10h                          | 10    |
| REC-B2 | ACC-0002002  | ADV-2   | no decision: escalated by the 48h rule at +49h; approved  | —     |
|        |              |         | by compliance on 24 Nov, after the period (not in it)     |       |
| REC-B3 | ACC-0002003  | ADV-2   | discretionary $2,000, no gain: auto-approved (micro-trade) | —     |
| REC-OLD| ACC-0001009  | ADV-1   | published 13 Nov (last week), approved on 17 Nov          | —     |

plus: ACC-0003001 suspended on 18 Nov, a data-quality hold on 19 Nov, an advisor's wash-sale
override on 20 Nov, a second compliance user (both get the email).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import pytest

from rebal_pipeline.core.overrides import WashSaleOverride, record_override
from rebal_pipeline.supervision.report import Period
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.operations_alerts import raise_operations_alert
from rebal_pipeline_tests.approvals.conftest import AS_OF, PUBLISHED_AT, package, publish, store  # noqa: F401
from rebal_pipeline_tests.factories import USERS, trade, user

WEEK = Period(date(2026, 11, 16), date(2026, 11, 22))
PERIOD_END = datetime(2026, 11, 23, 5, 0, tzinfo=timezone.utc)
LAST_WEEK = date(2026, 11, 13)
FIRM = [*USERS, user("CCO-2", "compliance", name="Casey Compliance", email="casey@example-ria.com")]
ADV1 = {"user_id": "ADV-1", "role": "advisor"}
ADV2 = {"user_id": "ADV-2", "role": "advisor"}
CCO1 = {"user_id": "CCO-1", "role": "compliance"}
ACCOUNTS = {"REC-A1": "ACC-0001001", "REC-A2": "ACC-0001002", "REC-A3": "ACC-0001003", "REC-A4": "ACC-0001004",
            "REC-B1": "ACC-0002001", "REC-B2": "ACC-0002002", "REC-B3": "ACC-0002003", "REC-OLD": "ACC-0001009"}
DEFER_REASON = "Client travelling until the 27th; revisit on return"
MODIFY_REASON = "Client prefers to keep more equity this quarter"
ESCALATE_REASON = "Request from the client's attorney about ACC-0002001; needs compliance"
OVERRIDE_REASON = "Client insists on the bond fund for its yield"
UNRESOLVED = "equity cannot reach its band: VTI may not be sold (no_sell_symbol)"


def at(hours: float) -> datetime:
    return PUBLISHED_AT + timedelta(hours=hours)


@dataclass(frozen=True)
class Book:
    store: object
    anchors: Path
    overrides: Path
    out: Path


def decide(store, rec_id: str, who: dict, action: str, when: datetime, **kwargs) -> dict:
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, rec_id, who, action, when, **kwargs)
    return decision


def after_the_period(store) -> None:
    """What happens after the week: compliance approves REC-B2 on 24 Nov (not in the report)."""
    decide(store, "REC-B2", CCO1, "approve", datetime(2026, 11, 24, 15, 0, tzinfo=timezone.utc))


@pytest.fixture
def book(store, tmp_path) -> Book:  # noqa: F811 (the store fixture of the approvals tests)
    pkg = {rec_id: package(rec_id, account_id=account, advisor_id="ADV-1" if rec_id.startswith(("REC-A", "REC-OLD"))
                           else "ADV-2") for rec_id, account in ACCOUNTS.items()}
    pkg["REC-A4"] = pkg["REC-A4"].model_copy(update={"inside_bands": False, "unresolved": UNRESOLVED})
    pkg["REC-B3"] = package("REC-B3", account_id=ACCOUNTS["REC-B3"], advisor_id="ADV-2", discretionary=True)
    pkg["REC-OLD"] = pkg["REC-OLD"].model_copy(update={"as_of": LAST_WEEK})

    publish(store, pkg["REC-OLD"], as_of=LAST_WEEK, now=datetime(2026, 11, 13, 21, 30, tzinfo=timezone.utc),
            users=FIRM)
    publish(store, *(pkg[r] for r in ("REC-A1", "REC-A2", "REC-A3", "REC-A4", "REC-B1", "REC-B2")), users=FIRM)
    publish(store, pkg["REC-B3"], realized_gain=0.0, users=FIRM)

    decide(store, "REC-OLD", ADV1, "approve", datetime(2026, 11, 17, 15, 0, tzinfo=timezone.utc))
    decide(store, "REC-A1", ADV1, "approve", at(2))
    decide(store, "REC-A3", ADV1, "modify", at(4), reason=MODIFY_REASON, payload={
        "trades": [trade(ACCOUNTS["REC-A3"], "VTI", "equity", "sell", 4, 100).model_dump(mode="json"),
                   trade(ACCOUNTS["REC-A3"], "BND", "fixed_income", "buy", 8, 50).model_dump(mode="json")],
        "band_report": [{"asset_class": "equity", "weight_after": 0.66, "target_weight": 0.6, "band": 0.05,
                         "inside": False},
                        {"asset_class": "fixed_income", "weight_after": 0.34, "target_weight": 0.4, "band": 0.05,
                         "inside": False}],
        "inside_bands": False})
    decide(store, "REC-A2", ADV1, "defer", at(6), reason=DEFER_REASON,
           payload={"deferred_until": "2026-11-27T14:00:00+00:00"})
    decide(store, "REC-B1", ADV2, "escalate", at(10), reason=ESCALATE_REASON)
    decide(store, "REC-A4", ADV1, "approve", at(30))
    with store.begin() as conn:
        due = {d["recommendation_id"]: d for d in lifecycle.due_notifications(conn, at(49))}
        assert lifecycle.record_notification(conn, "escalation", "REC-B2", due["REC-B2"]["notification_key"], at(49))
        audit.append(conn, "config:suspension:ACC-0003001:2026-11-18:test", "account_suspended", "rebal:configuration",
                     datetime(2026, 11, 18, 21, 30, tzinfo=timezone.utc), "ACC-0003001",
                     {"account_id": "ACC-0003001", "as_of": "2026-11-18", "reason": "Estate of the client pending",
                      "reason_changed": False})
        raise_operations_alert(conn, key="feed_data_quality:2026-11-19", alert="feed_data_quality",
                               summary="Feed of 2026-11-19: 3 rejected row(s), 1 account(s) held out",
                               details={"rejected_rows": 3, "accounts_held_out": 1, "unknown_accounts": 0,
                                        "reconciliation_breaks": 0, "held_out_accounts": ["\u2022\u2022\u2022\u20224001"]},
                               now=datetime(2026, 11, 19, 21, 30, tzinfo=timezone.utc), as_of=date(2026, 11, 19))

    overrides = tmp_path / "overrides" / "wash_sale_overrides.csv"
    record_override(overrides, WashSaleOverride(as_of=AS_OF, account_id=ACCOUNTS["REC-A1"], symbol="BND",
                                                reason=OVERRIDE_REASON, decided_by="ADV-1",
                                                decided_at=datetime(2026, 11, 20, 18, 0, tzinfo=timezone.utc)))
    anchors = tmp_path / "anchors"
    with store.begin() as conn:  # the daily anchoring after the week's last run
        audit.anchor(conn, datetime(2026, 11, 23, 6, 0, tzinfo=timezone.utc), anchors)
    return Book(store, anchors, overrides, tmp_path / "out")
