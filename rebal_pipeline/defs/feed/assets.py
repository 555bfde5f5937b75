"""Feed ingestion: the custodian/sandbox feed folder → archived raw files → landing tables."""


from datetime import date
from pathlib import Path

import polars as pl
from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.landing import FeedFileError, archive_manifest, land_feed
from rebal_pipeline.core.sql_models import landing_table, replace_partition
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import FeedLocation, Warehouse

FEED_GROUP = "feed"

# The feed folder itself, produced outside Dagster (custodian SFTP, OAuth pull, drop folder,
# or `rebal sandbox`). Declared so the lineage starts at the raw files.
custodian_feed = AssetSpec(
    "custodian_feed",
    description="Canonical feed folder <feed_root>/<as_of>/*.csv (docs/feed_contract.md).",
    group_name=FEED_GROUP,
    partitions_def=daily_partitions,
)

LANDING_SPECS = [
    AssetSpec(
        landing_table(spec.name),
        deps=[custodian_feed],
        description=f"{spec.filename} exactly as received (text), one row per line, with _line "
        f"and _type_ok. {spec.doc}",
        group_name=FEED_GROUP,
    )
    for spec in FEED_FILES.values()
]
TYPE_ERRORS_SPEC = AssetSpec(
    "feed_type_errors",
    deps=[custodian_feed],
    description="Values that are not of their column's type (file, line, column, value, reason).",
    group_name=FEED_GROUP,
)
MANIFEST_SPEC = AssetSpec(
    "feed_manifest",
    deps=[custodian_feed],
    description="Each raw file received: SHA-256, size, rows and its write-once archive path.",
    group_name=FEED_GROUP,
)

# Landing tables are all text so that nothing is lost or coerced on the way in.
_LANDING_META = "as_of date, _line bigint, _type_ok boolean"
_PROBLEM_DDL = (
    "as_of date, file varchar, line bigint, \"column\" varchar, value varchar, reason varchar, "
    "account_id varchar, household_id varchar, model_id varchar, symbol varchar, scope varchar, "
    "scope_id varchar"
)
_MANIFEST_DDL = (
    "as_of date, file varchar, sha256 varchar, size_bytes bigint, rows bigint, "
    "archive_path varchar, landed_at timestamp"
)


@multi_asset(
    specs=[*LANDING_SPECS, TYPE_ERRORS_SPEC, MANIFEST_SPEC],
    partitions_def=daily_partitions,
    name="land_feed",
)
def land_feed_asset(context: AssetExecutionContext, feed: FeedLocation, warehouse: Warehouse):
    """Archive the day's raw files untouched, then land each one as text with its problems."""
    as_of = date.fromisoformat(context.partition_key)
    feed_dir = feed.feed_dir(context.partition_key)
    try:
        landed = land_feed(feed_dir, as_of, archive_root=Path(feed.archive_root))
    except FeedFileError as exc:
        # File-level problems stop the day: running on a partial feed would be wrong.
        raise Failure(
            description=str(exc),
            metadata={"file": exc.path, "problem": exc.problem},
        ) from exc
    for warning in landed.warnings:
        context.log.warning(warning)

    problems = landed.problems.with_columns(pl.lit(as_of).alias("as_of"))
    manifest = archive_manifest(landed)
    with warehouse.connect() as con:
        for spec in FEED_FILES.values():
            rows = landed.files[spec.name].rows.with_columns(pl.lit(as_of).alias("as_of"))
            ddl = ", ".join([_LANDING_META] + [f'"{c}" varchar' for c in spec.column_names])
            replace_partition(con, landing_table(spec.name), as_of, rows.to_arrow(), columns_ddl=ddl)
        replace_partition(con, "feed_type_errors", as_of, problems.to_arrow(), columns_ddl=_PROBLEM_DDL)
        replace_partition(con, "feed_manifest", as_of, manifest.to_arrow(), columns_ddl=_MANIFEST_DDL)

    for spec in FEED_FILES.values():
        frame = landed.files[spec.name].rows
        yield MaterializeResult(
            asset_key=landing_table(spec.name),
            metadata={
                "rows": frame.height,
                "rows_with_type_errors": int((~frame["_type_ok"]).sum()) if frame.height else 0,
            },
        )
    yield MaterializeResult(
        asset_key="feed_type_errors",
        metadata={
            "type_errors": problems.height,
            "by_file": MetadataValue.json(
                dict(problems.group_by("file").len().iter_rows()) if problems.height else {}
            ),
        },
    )
    yield MaterializeResult(
        asset_key="feed_manifest",
        metadata={
            "files": manifest.height,
            "bytes": int(manifest["size_bytes"].sum()),
            "feed_dir": MetadataValue.path(str(feed_dir)),
            "ignored_columns": MetadataValue.json(landed.warnings),
        },
    )


assets = [custodian_feed, land_feed_asset]
