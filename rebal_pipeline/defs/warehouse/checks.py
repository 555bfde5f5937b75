"""The warehouse's data checks as Dagster asset checks (the checks themselves: core/table_checks.py).

They run inside the asset that produces the table, on the partition just written. Blocking ones
stop everything downstream of the table for the day."""

from __future__ import annotations

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, MetadataValue

from rebal_pipeline.core.table_checks import TABLE_CHECKS, CheckOutcome


def check_specs(table: str) -> list[AssetCheckSpec]:
    return [AssetCheckSpec(c.name, asset=table, description=c.description, blocking=c.blocking)
            for c in TABLE_CHECKS.get(table, [])]


def run_checks(con, table: str, as_of) -> list[AssetCheckResult]:
    return [check_result(c.run(con, table, as_of)) for c in TABLE_CHECKS.get(table, [])]


def check_result(outcome: CheckOutcome) -> AssetCheckResult:
    metadata = {**outcome.metadata,
                **{k: MetadataValue.json(v) for k, v in outcome.json.items()},
                **{k: MetadataValue.text(v) for k, v in outcome.text.items()},
                **{k: MetadataValue.md(v) for k, v in outcome.md.items()}}
    if outcome.passed:
        return AssetCheckResult(check_name=outcome.name, passed=True, metadata=metadata)
    severity = AssetCheckSeverity.ERROR if outcome.severity == "error" else AssetCheckSeverity.WARN
    return AssetCheckResult(check_name=outcome.name, passed=False, severity=severity, metadata=metadata)
