"""The day's feed data quality in one summary for operations.

Counts of rejected rows, accounts held out (and how many are not in accounts.csv at all),
reconciliation breaks; the commonest reasons; the held-out accounts, masked to their last four
characters (core/pii.py) because the summary leaves the warehouse (an email, the workflow store).
A clean day is `clean`: nothing is raised."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date

import duckdb

from rebal_pipeline.core.pii import mask_account, masker

DATA_QUALITY_ALERT = "feed_data_quality"
# How many masked account numbers and reasons the operations email lists (the warehouse has all).
ALERT_EXAMPLES = 20

DATA_QUALITY_COUNTS = """
select
    (select count(*) from rejects where as_of = $as_of) as rejected_rows,
    (select count(*) from data_quality_alerts where as_of = $as_of) as accounts_held_out,
    (select count(*) from data_quality_alerts where as_of = $as_of and not account_known) as unknown_accounts,
    (select count(*) from reconciliation_alerts where as_of = $as_of) as reconciliation_breaks,
    (select count(distinct account_id) from reconciliation_alerts where as_of = $as_of) as accounts_not_reconciled
"""
DATA_QUALITY_REASONS = """
select file || ': ' || regexp_replace(reason, ' \\(without it: .*\\)$', '') || ' (' || count(*)::varchar || ')'
from rejects where as_of = $as_of
group by file, regexp_replace(reason, ' \\(without it: .*\\)$', '')
order by count(*) desc, 1 limit $limit
"""
DATA_QUALITY_ACCOUNTS = """
select account_id from data_quality_alerts where as_of = $as_of order by account_id limit $limit
"""


@dataclass(frozen=True)
class DataQualityDay:
    key: str        # the operations alert's idempotency key: one alert per feed day
    summary: str
    counts: dict[str, int]
    details: dict


    @property
    def clean(self) -> bool:
        return not any(self.counts.values())


def summarize(con: duckdb.DuckDBPyConnection, as_of: date) -> DataQualityDay:
    """The day's summary (`clean` when there is nothing to tell operations)."""
    params = {"as_of": as_of}
    row = con.execute(DATA_QUALITY_COUNTS, params).fetchone()
    counts = dict(zip([d[0] for d in con.description], (int(v) for v in row)))
    key = f"{DATA_QUALITY_ALERT}:{as_of.isoformat()}"
    if not any(counts.values()):
        return DataQualityDay(key=key, summary=f"Feed of {as_of.isoformat()}: clean", counts=counts, details=counts)
    reasons = [r[0] for r in con.execute(DATA_QUALITY_REASONS, {**params, "limit": ALERT_EXAMPLES}).fetchall()]
    held = [r[0] for r in con.execute(DATA_QUALITY_ACCOUNTS, {**params, "limit": ALERT_EXAMPLES}).fetchall()]
    named = [r[0] for r in con.execute(
        "select distinct account_id from rejects where as_of = $as_of and account_id is not null", params).fetchall()]
    summary = (f"Feed of {as_of.isoformat()}: {counts['rejected_rows']} rejected row(s), "
               f"{counts['accounts_held_out']} account(s) held out of today's recommendations "
               f"({counts['unknown_accounts']} not in accounts.csv), "
               f"{counts['reconciliation_breaks']} reconciliation break(s)")
    mask = masker([*named, *held])  # reasons may name an account ("targets for account …")
    details = {**counts, "commonest_reasons": [mask(r) for r in reasons], "held_out_accounts": [mask_account(a) for a in held]}
    return DataQualityDay(key=key, summary=summary, counts=counts, details=details)
