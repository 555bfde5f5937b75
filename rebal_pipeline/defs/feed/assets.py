"""Feed ingestion: the custodian/sandbox feed folder → archived raw files → landing tables."""


from datetime import date
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetSpec,
    Failure,
    MaterializeResult,
    MetadataValue,
    multi_asset,
)

from rebal_pipeline.core.feed_contract import FEED_FILES
from rebal_pipeline.core.landing import FeedFileError, land_feed, landing_table
from rebal_pipeline.partitions import daily_partitions
from rebal_pipeline.resources import WAREHOUSE_POOL, FeedLocation, Warehouse

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

@multi_asset(
    specs=[*LANDING_SPECS, TYPE_ERRORS_SPEC, MANIFEST_SPEC],
    partitions_def=daily_partitions,
    name="land_feed",
    pool=WAREHOUSE_POOL,
)
def land_feed_asset(context: AssetExecutionContext, feed: FeedLocation, warehouse: Warehouse):
    """Archive the day's raw files untouched, then land each one as text with its problems."""
    as_of = date.fromisoformat(context.partition_key)
    feed_dir = feed.feed_dir(context.partition_key)
    if not feed_dir.is_dir():
        # Checked before the warehouse is opened: a backfill over sessions whose files never
        # arrived fails each of them with the folder to look at, and nothing is written.
        raise Failure(
            description=f"no feed folder for the {as_of.isoformat()} session: {feed_dir} does not exist "
                        f"(the day's files have not arrived there, or REBAL_FEED_ROOT points elsewhere)",
            metadata={"feed_dir": MetadataValue.path(str(feed_dir))},
            allow_retries=False,
        )
    try:
        with warehouse.connect() as con:
            landed = land_feed(con, feed_dir, as_of, archive_root=Path(feed.archive_root))
    except FeedFileError as exc:
        # File-level problems stop the day: running on a partial feed would be wrong.
        # Every file was archived first (land_feed), so nothing received is lost. One message
        # names each failing file, its line and the problem; no traceback for bad input.
        problems = [exc, *exc.also]
        description = "; ".join(str(p) for p in problems)
        raise Failure(description=description, metadata={
            "file": exc.path, "line": exc.line if exc.line is not None else "", "problem": exc.problem,
            "files_with_problems": MetadataValue.json(
                [{"file": p.file, "line": p.line, "problem": p.problem} for p in problems]),
        }, allow_retries=False) from exc
    for warning in landed.warnings:
        context.log.warning(warning)

    for spec in FEED_FILES.values():
        yield MaterializeResult(
            asset_key=landing_table(spec.name),
            metadata={
                "rows": landed.rows[spec.name],
                "rows_with_type_errors": landed.rows_with_type_errors[spec.name],
                "sha256": landed.received[spec.name].sha256,
            },
        )
    yield MaterializeResult(asset_key="feed_type_errors", metadata={"type_errors": landed.type_errors})
    yield MaterializeResult(
        asset_key="feed_manifest",
        metadata={
            "files": len(landed.received),
            "bytes": sum(r.size_bytes for r in landed.received.values()),
            "feed_dir": MetadataValue.path(str(feed_dir)),
            "ignored_columns": MetadataValue.json(landed.warnings),
        },
    )


assets = [custodian_feed, land_feed_asset]
