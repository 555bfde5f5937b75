"""Every configuration change is an audit event, once, when first seen (issue 13): the day's
configuration read from the warehouse's staging tables (a real DuckDB), compared with the store's
last-seen snapshot, on SQLite and Postgres."""

from __future__ import annotations

import json
import os
from datetime import date, datetime, timedelta, timezone

import duckdb
import pytest
from dagster import materialize
from sqlalchemy import select

from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow import audit, config_events
from rebal_pipeline.workflow.schema import audit_events, policy_versions

DAY1, DAY2 = date(2026, 11, 19), date(2026, 11, 20)
NOW1 = datetime(2026, 11, 19, 21, 30, tzinfo=timezone.utc)
NOW2 = NOW1 + timedelta(days=1)
POLICY = config_events.PolicyVersion("2026.11-2+aaaaaaaaaaaa", "2026.11-2", "version: 2026.11-2\nbands: {}\n")
NEW_POLICY = config_events.PolicyVersion("2026.12-1+bbbbbbbbbbbb", "2026.12-1", "version: 2026.12-1\nbands: {equity: 0.04}\n")

IPS = [("account", "ACC-1", "equity", 0.6), ("account", "ACC-1", "fixed_income", 0.4),
       ("household", "HH-1", "equity", 0.5), ("household", "HH-1", "fixed_income", 0.5)]
MODELS = [("M-60-40", "VTI", 0.6), ("M-60-40", "BND", 0.4)]
ACCOUNTS = [("ACC-1", False, None), ("ACC-2", True, "estate settlement pending")]


def warehouse(days: dict[date, dict]) -> duckdb.DuckDBPyConnection:
    """The three staging tables, one partition per day, as the daily run leaves them."""
    con = duckdb.connect()
    con.execute("create table stg_feed_ips_targets (as_of date, _line int, scope varchar, scope_id varchar, "
                "asset_class varchar, target_weight decimal(18, 8))")
    con.execute("create table stg_feed_models (as_of date, _line int, model_id varchar, symbol varchar, "
                "weight decimal(18, 8))")
    con.execute("create table stg_feed_accounts (as_of date, _line int, account_id varchar, suspended boolean, "
                "suspended_reason varchar)")
    for day, feed in days.items():
        for line, row in enumerate(feed.get("ips", IPS), start=2):
            con.execute("insert into stg_feed_ips_targets values (?, ?, ?, ?, ?, ?)", [day, line, *row])
        for line, row in enumerate(feed.get("models", MODELS), start=2):
            con.execute("insert into stg_feed_models values (?, ?, ?, ?, ?)", [day, line, *row])
        for line, row in enumerate(feed.get("accounts", ACCOUNTS), start=2):
            con.execute("insert into stg_feed_accounts values (?, ?, ?, ?, ?)", [day, line, *row])
    return con


def record(store, con, day, now, policy=POLICY):
    snapshot = config_events.read_snapshot(con, day, policy)
    with store.begin() as conn:
        return config_events.record_configuration(conn, day, snapshot, now)


def events_since(store, seq: int) -> list[dict]:
    with store.begin() as conn:
        rows = conn.execute(select(audit_events).where(audit_events.c.seq > seq).order_by(audit_events.c.seq)).mappings()
        return [{**dict(r), "payload": json.loads(r["payload"])} for r in rows]


def last_seq(store) -> int:
    with store.begin() as conn:
        return audit._head_seq(conn)[0]


def test_the_first_day_records_each_configuration_once_and_a_rerun_records_nothing(store):
    con = warehouse({DAY1: {}})
    first = record(store, con, DAY1, NOW1)
    kinds = sorted(e["kind"] for e in events_since(store, 0))
    # Two IPS (an account's, a household's), one model, one suspended account, the policy; the
    # active account ACC-1 is not a change.
    assert kinds == ["account_suspended", "ips_targets_changed", "ips_targets_changed", "model_weights_changed",
                     "policy_version_adopted"]
    assert first.events == 5
    suspended = next(e for e in events_since(store, 0) if e["kind"] == "account_suspended")
    assert suspended["subject_id"] == "ACC-2" and suspended["payload"]["reason"] == "estate settlement pending"
    ips = next(e for e in events_since(store, 0) if e["subject_id"] == "ACC-1")
    assert ips["payload"]["targets"] == {"equity": 0.6, "fixed_income": 0.4} and ips["payload"]["first_seen"]
    head = last_seq(store)
    assert record(store, con, DAY1, NOW1 + timedelta(minutes=5)).events == 0
    assert last_seq(store) == head
    with store.begin() as conn:
        assert audit.verify(conn).ok


CHANGES = {
    "account IPS": ({"ips": [("account", "ACC-1", "equity", 0.7), ("account", "ACC-1", "fixed_income", 0.3),
                             *IPS[2:]]}, POLICY, "ips_targets_changed", "ACC-1"),
    "household IPS": ({"ips": [*IPS[:2], ("household", "HH-1", "equity", 0.55),
                               ("household", "HH-1", "fixed_income", 0.45)]}, POLICY, "ips_targets_changed", "HH-1"),
    "model weights": ({"models": [("M-60-40", "VTI", 0.65), ("M-60-40", "BND", 0.35)]}, POLICY,
                      "model_weights_changed", "M-60-40"),
    "suspension": ({"accounts": [("ACC-1", True, "client request: no trading until January"), ACCOUNTS[1]]}, POLICY,
                   "account_suspended", "ACC-1"),
    "resumption": ({"accounts": [ACCOUNTS[0], ("ACC-2", False, None)]}, POLICY, "account_resumed", "ACC-2"),
    "policy version": ({}, NEW_POLICY, "policy_version_adopted", NEW_POLICY.version_id),
    "model removed": ({"models": [("M-70-30", "VTI", 0.7), ("M-70-30", "BND", 0.3)]}, POLICY, None, None),
}


@pytest.mark.parametrize("change", list(CHANGES))
def test_each_configuration_change_is_exactly_one_event_and_rerunning_the_day_adds_none(store, change):
    feed, policy, kind, subject = CHANGES[change]
    con = warehouse({DAY1: {}, DAY2: feed})
    record(store, con, DAY1, NOW1)
    before = last_seq(store)
    record(store, con, DAY2, NOW2, policy)
    new = events_since(store, before)
    if change == "model removed":  # one model replaced by another: one event each
        assert sorted((e["kind"], e["subject_id"]) for e in new) == [
            ("model_removed", "M-60-40"), ("model_weights_changed", "M-70-30")]
    else:
        assert [(e["kind"], e["subject_id"]) for e in new] == [(kind, subject)]
    again = last_seq(store)
    assert record(store, con, DAY2, NOW2 + timedelta(hours=1), policy).events == 0
    assert last_seq(store) == again
    if change == "account IPS":
        payload = new[0]["payload"]
        assert payload["targets"] == {"equity": 0.7, "fixed_income": 0.3} and not payload["first_seen"]
        assert payload["previous_sha256"] and payload["previous_sha256"] != payload["sha256"]
    if change == "suspension":
        assert new[0]["payload"]["reason"] == "client request: no trading until January"
    if change == "resumption":
        assert new[0]["payload"]["previous_reason"] == "estate settlement pending"


def test_a_policy_version_is_stored_with_its_content_so_a_past_day_can_be_explained(store):
    con = warehouse({DAY1: {}, DAY2: {}})
    record(store, con, DAY1, NOW1)
    record(store, con, DAY2, NOW2, NEW_POLICY)
    with store.begin() as conn:
        stored = {r.version_id: (r.content, r.first_seen_as_of) for r in conn.execute(select(policy_versions))}
    assert stored == {POLICY.version_id: (POLICY.content, DAY1), NEW_POLICY.version_id: (NEW_POLICY.content, DAY2)}
    adopted = [e for e in events_since(store, 0) if e["kind"] == "policy_version_adopted"]
    assert [e["payload"]["previous"] for e in adopted] == [None, POLICY.version_id]
    assert adopted[1]["payload"]["content"] == NEW_POLICY.content


def test_a_day_without_a_staging_table_compares_nothing_of_it(store):
    con = duckdb.connect()
    assert record(store, con, DAY1, NOW1, None).events == 0


def test_the_daily_assets_record_the_changes_and_anchor_the_head(tmp_path, monkeypatch):
    """configuration_changes then audit_anchor, as the daily job runs them (Dagster, real DuckDB file)."""
    from rebal_pipeline.defs.workflow.anchor import audit_anchor, configuration_changes
    from rebal_pipeline.resources import DriftPolicySource, FeedLocation, Warehouse, WorkflowStoreResource
    from rebal_pipeline.workflow.store import WorkflowStore

    # The daily asset reads REBAL_AUDIT_ANCHOR_DIR from the environment when it anchors: none here.
    monkeypatch.delenv("REBAL_AUDIT_ANCHOR_DIR", raising=False)
    # What `rebal audit verify` reads: the deployment's archive root (and the tests' audit key, conftest.py).
    deployment = load_settings({"REBAL_ARCHIVE_ROOT": str(tmp_path / "archive"),
                                "REBAL_AUDIT_KEY": os.environ["REBAL_AUDIT_KEY"]})
    path = tmp_path / "warehouse.duckdb"
    con = warehouse({DAY2: {}})
    con.execute(f"attach '{path}' as w")
    con.execute("copy from database memory to w")
    con.close()
    url = f"sqlite:///{tmp_path / 'workflow.sqlite'}"
    resources = {"warehouse": Warehouse(database=str(path)), "workflow_store": WorkflowStoreResource(url=url),
                 "drift_policy_source": DriftPolicySource(),
                 "feed": FeedLocation(feed_root=str(tmp_path / "feeds"), archive_root=str(tmp_path / "archive"))}
    for _ in range(2):  # the second run of the day records nothing new and anchors nothing new
        result = materialize([configuration_changes, audit_anchor], partition_key=DAY2.isoformat(),
                             resources=resources)
        assert result.success
    changes = result.asset_materializations_for_node("configuration_changes")[0].metadata
    anchored = result.asset_materializations_for_node("audit_anchor")[0].metadata
    assert changes["configuration_events"].value == 0
    assert anchored["seq"].value == 5 and anchored["events"].value == 5
    files = list((tmp_path / "archive" / "audit_anchors").glob("*/*.json"))
    assert [f.name for f in files] == [f"{date.today().isoformat()}_{5:012d}.json"]
    assert anchored["anchor_file"].value == str(files[0])
    store = WorkflowStore(url)
    with store.begin() as conn:
        checked = audit.verify(conn, rebal_settings=deployment)
    assert checked.ok and checked.anchor == str(files[0])
    store.dispose()


def test_the_whole_daily_graph_records_the_configuration_and_anchors_after_publishing(workspace, dagster_instance):
    """A real feed through every daily asset, then configuration_changes and audit_anchor."""
    from rebal_pipeline.defs.feed.assets import assets as feed_assets
    from rebal_pipeline.defs.trades.assets import assets as trade_assets
    from rebal_pipeline.defs.warehouse.assets import assets as warehouse_assets
    from rebal_pipeline.defs.workflow.anchor import assets as record_assets
    from rebal_pipeline.defs.workflow.assets import assets as workflow_assets
    from rebal_pipeline.workflow.store import WorkflowStore
    from rebal_pipeline_tests.feedkit import AS_OF
    from rebal_pipeline_tests.trades.test_trade_proposals import book

    book().write(workspace.feed_root)
    every = [*feed_assets, *warehouse_assets, *trade_assets, *workflow_assets, *record_assets]
    store = WorkflowStore(workspace.workflow_url)
    heads = []
    for _ in range(2):  # the same day twice: the second run records and anchors nothing new
        result = materialize(every, partition_key=AS_OF.isoformat(), resources=workspace.resources(),
                             instance=dagster_instance)
        assert result.success
        with store.begin() as conn:
            heads.append(audit.head(conn))
            kinds = conn.execute(select(audit_events.c.kind)).scalars().all()
            checked = audit.verify(conn, anchors=audit.anchor_dir(conn, workspace.root / "archive"))
        assert checked.ok, str(checked)
    assert heads[0] == heads[1]
    # This book trades to its models (no IPS file): the policy and its two models are recorded, once.
    assert sorted(k for k in kinds if k in ("policy_version_adopted", "model_weights_changed", "ips_targets_changed")) \
        == ["model_weights_changed", "model_weights_changed", "policy_version_adopted"]
    assert "recommendation_alerted" in kinds
    anchored = result.asset_materializations_for_node("audit_anchor")[0].metadata
    assert anchored["events"].value == heads[0][0] and anchored["head_hash"].value == heads[0][1]
    assert len(list((workspace.root / "archive" / "audit_anchors").glob("*/*.json"))) == 1
    store.dispose()
