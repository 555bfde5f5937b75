"""The compliance record as an examiner or a careless DBA would try it (issue 13), on SQLite and
Postgres: a keyed chain, anchored outside the database, covering what was decided.

"Tampering" is done the way someone with raw database access could: on SQLite by dropping the
triggers, on Postgres as the superuser with `session_replication_role = replica` (triggers off) or
by dropping the triggers."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from datetime import timedelta

import pytest
from sqlalchemy import select, text

from rebal_pipeline.settings import load_settings
from rebal_pipeline.workflow import audit, lifecycle
from rebal_pipeline.workflow.schema import audit_events
from rebal_pipeline_tests.approvals.conftest import PUBLISHED_AT, package, publish

DECIDED_AT = PUBLISHED_AT + timedelta(hours=2)
ADVISOR = {"user_id": "ADV-1", "role": "advisor"}


@pytest.fixture
def anchors(tmp_path):
    """The anchor folder (a deployment's REBAL_AUDIT_ANCHOR_DIR), given to anchor and verify."""
    return tmp_path / "archive" / "audit_anchors"


def _day(store, anchors):
    """Two recommendations published, REC-1 approved by its advisor, the head anchored."""
    publish(store, package("REC-1"), package("REC-2", account_id="ACC-2"))
    with store.begin() as conn:
        decision, _ = lifecycle.decide(conn, "REC-1", ADVISOR, "approve", DECIDED_AT, reason="rebalance to model")
        anchored = audit.anchor(conn, DECIDED_AT, anchors)
    return decision, anchored


def _triggers_off(conn, how: str = "default"):
    """What someone with raw database access could do: switch the guards off."""
    if conn.dialect.name == "postgresql":
        if how == "drop":
            conn.execute(text("drop trigger wf_audit_events_no_update_delete on wf_audit_events"))
            conn.execute(text("drop trigger wf_audit_events_no_truncate on wf_audit_events"))
        else:
            conn.execute(text("set local session_replication_role = replica"))
    else:
        for name in ("wf_audit_events_no_update", "wf_audit_events_no_delete", "wf_audit_events_no_replace"):
            conn.execute(text(f"drop trigger if exists {name}"))


def _verify(store, anchors=None, rebal_settings=None):
    """verify, comparing with the anchors in `anchors` (None: the settings' anchor folder), with the
    keys of `rebal_settings` (None: the process environment's)."""
    with store.begin() as conn:
        return audit.verify(conn, anchors=anchors, rebal_settings=rebal_settings)


def test_an_untouched_day_verifies_against_its_anchor(store, anchors):
    _, anchored = _day(store, anchors)
    result = _verify(store, anchors)
    assert result.ok, str(result)
    assert result.anchor == anchored["file"] and result.decisions == 1
    assert f"matches the latest anchor {os.path.basename(anchored['file'])}" in str(result)
    mode = stat.S_IMODE(os.stat(anchored["file"]).st_mode)
    assert mode == 0o440
    # Nothing new appended: anchoring again writes no second file.
    with store.begin() as conn:
        assert audit.anchor(conn, DECIDED_AT + timedelta(hours=1), anchors)["file"] == anchored["file"]
    assert len(list(anchors.glob("*.json"))) == 1


@pytest.mark.parametrize("how", ["default", "drop"])
def test_a_deleted_tail_is_named_against_the_anchor(store, anchors, how):
    _, anchored = _day(store, anchors)
    head = anchored["seq"]
    with store.begin() as conn:
        _triggers_off(conn, how)
        conn.execute(text("delete from wf_audit_events where seq > :keep"), {"keep": head - 3})
    result = _verify(store, anchors)
    assert not result.ok
    assert f"missing tail: events {head - 2}..{head} are gone" in str(result)
    assert result.seq == head - 2


@pytest.mark.parametrize("how", ["default", "drop"])
def test_a_full_wipe_is_named(store, anchors, how):
    _day(store, anchors)
    with store.begin() as conn:
        _triggers_off(conn, how)
        conn.execute(text("delete from wf_audit_events"))
    result = _verify(store, anchors)
    assert not result.ok and "full wipe" in result.problem
    # The decision rows outlived their events: each is named too.
    assert any("has no audit event" in p for p in result.problems)


def test_a_deleted_event_in_the_middle_is_a_gap(store, anchors):
    _day(store, anchors)
    with store.begin() as conn:
        _triggers_off(conn)
        conn.execute(text("delete from wf_audit_events where seq = 3"))
    result = _verify(store, anchors)
    assert not result.ok and result.seq == 3 and "gap: events 3..3 are missing" in result.problem


def _forge(conn, seq_offset: int = 1, kind: str = "decision_approve", key: bytes | None = None,
           key_id: str | None = None, event_id: str = "decision:forged") -> None:
    """Append an event the way a forger would: correct seq and prev_hash, a correct SHA-256 (or an
    HMAC under a key of their own), inserted straight into the table."""
    last = conn.execute(text("select seq, hash, key_id from wf_audit_events order by seq desc limit 1")).one()
    seq = last.seq + seq_offset
    payload = audit.canonical_json({"reason": "looks fine", "via": "api"})
    digest = audit.event_hash(last.hash, seq, event_id, DECIDED_AT, kind, "REC-2", "ADV-1", payload,
                              key=key, key_id=key_id)
    conn.execute(text("insert into wf_audit_events (seq, event_id, occurred_at, kind, subject_id, actor, payload, "
                      "prev_hash, hash, key_id) values (:seq, :event_id, :at, :kind, 'REC-2', 'ADV-1', :payload, "
                      ":prev, :hash, :key_id)"),
                 {"seq": seq, "event_id": event_id, "at": DECIDED_AT, "kind": kind, "payload": payload,
                  "prev": last.hash, "hash": digest, "key_id": key_id})


def test_a_forged_append_with_a_correct_sha256_is_refused(store, anchors):
    _day(store, anchors)
    with store.begin() as conn:
        _forge(conn)  # the chain's old rule: plain SHA-256, no key
    result = _verify(store, anchors)
    assert not result.ok and "'decision:forged'" in result.problem and "unsigned" in result.problem


def test_a_forged_append_signed_with_another_key_is_refused(store, anchors):
    _day(store, anchors)
    with store.begin() as conn:
        current = conn.execute(text("select key_id from wf_audit_events order by seq desc limit 1")).scalar()
        _forge(conn, key=b"mallory's own key, long enough to pass the check", key_id=current)
    result = _verify(store, anchors)
    assert not result.ok and "'decision:forged'" in result.problem and "without the audit key" in result.problem


def test_an_altered_event_with_recomputed_sha256_hashes_is_named(store, anchors):
    """The attack on the unkeyed chain: edit an event, recompute every later hash with SHA-256."""
    _day(store, anchors)
    with store.begin() as conn:
        _triggers_off(conn)
        rows = conn.execute(select(audit_events).order_by(audit_events.c.seq)).mappings().all()
        prev = audit.GENESIS
        for row in rows:
            actor = "ADV-2" if row["event_id"] == "recommendation:REC-1" else row["actor"]
            digest = audit.event_hash(prev, row["seq"], row["event_id"], row["occurred_at"], row["kind"],
                                      row["subject_id"], actor, row["payload"])
            conn.execute(text("update wf_audit_events set actor = :actor, prev_hash = :prev, hash = :hash, "
                              "key_id = null where seq = :seq"), {"actor": actor, "prev": prev, "hash": digest,
                                                                  "seq": row["seq"]})
            prev = digest
    result = _verify(store, anchors)
    assert not result.ok
    assert any("anchor" in p and "rewritten" in p for p in result.problems)


def test_sqlite_refuses_insert_or_replace_over_an_event(tmp_path):
    from rebal_pipeline.workflow.store import WorkflowStore

    store = WorkflowStore(f"sqlite:///{tmp_path / 'workflow.sqlite'}")
    store.migrate()
    publish(store, package("REC-1"))
    replace = ("insert or replace into wf_audit_events (seq, event_id, occurred_at, kind, subject_id, actor, payload, "
               "prev_hash, hash, key_id) select seq, event_id, occurred_at, kind, subject_id, 'mallory', payload, "
               "prev_hash, hash, key_id from wf_audit_events where event_id = 'recommendation:REC-1'")
    for recursive in ("off", "on"):
        with pytest.raises(Exception, match="append-only"):
            with store.begin() as conn:
                conn.execute(text(f"pragma recursive_triggers = {recursive}"))
                conn.execute(text(replace))
    with store.begin() as conn:
        assert conn.execute(text("select actor from wf_audit_events where event_id = 'recommendation:REC-1'")
                            ).scalar() == "rebal:daily_scan"
        assert audit.verify(conn).ok
    # With the guard dropped the replacement goes through, and verify names it.
    with store.begin() as conn:
        conn.execute(text("pragma recursive_triggers = off"))  # SQLite's default: delete triggers stay silent
        conn.execute(text("drop trigger wf_audit_events_no_replace"))
        conn.execute(text(replace))
    with store.begin() as conn:
        result = audit.verify(conn)
    assert not result.ok and "'recommendation:REC-1'" in result.problem and "altered" in result.problem
    store.dispose()


def test_a_package_edited_after_approval_is_named_and_the_gate_check_refuses_it(store, anchors):
    decision, _ = _day(store, anchors)
    with store.begin() as conn:
        rec = dict(conn.execute(text("select * from wf_recommendations where recommendation_id = 'REC-1'")
                                ).mappings().one())
        assert audit.decision_record_problems(conn, decision, rec) == []
        edited = json.loads(rec["package"])
        bnd = next(t for t in edited["trades"] if t["symbol"] == "BND")
        bnd["quantity"], bnd["est_value"] = 286, 286 * 50  # the BND 573 → 286, in this book's numbers
        conn.execute(text("update wf_recommendations set package = :p where recommendation_id = 'REC-1'"),
                     {"p": audit.canonical_json(edited)})
    with store.begin() as conn:
        rec = dict(conn.execute(text("select * from wf_recommendations where recommendation_id = 'REC-1'")
                                ).mappings().one())
        problems = audit.decision_record_problems(conn, decision, rec)
        result = audit.verify(conn, anchors=anchors)
    assert problems and "package of recommendation REC-1 was changed after decision" in problems[0]
    assert not result.ok and f"package of recommendation REC-1 was changed after decision {decision['decision_id']}" \
        in result.problem


def test_an_edited_decision_row_is_named(store, anchors):
    decision, _ = _day(store, anchors)
    with store.begin() as conn:
        conn.execute(text("update wf_decisions set actor_id = 'ADV-2', reason = 'someone else decided' "
                          "where decision_id = :d"), {"d": decision["decision_id"]})
    with store.begin() as conn:
        stored = dict(conn.execute(text("select * from wf_decisions where decision_id = :d"),
                                   {"d": decision["decision_id"]}).mappings().one())
        rec = dict(conn.execute(text("select * from wf_recommendations where recommendation_id = 'REC-1'")
                                ).mappings().one())
        problems = audit.decision_record_problems(conn, stored, rec)
        result = audit.verify(conn, anchors=anchors)
    assert not result.ok
    assert f"decision {decision['decision_id']} in wf_decisions was edited" in result.problem
    assert "decided by 'ADV-2' (the event says 'ADV-1')" in result.problem
    assert problems and "edited" in problems[0]


def test_a_deleted_decision_row_is_named(store, anchors):
    decision, _ = _day(store, anchors)
    with store.begin() as conn:
        conn.execute(text("delete from wf_decisions where decision_id = :d"), {"d": decision["decision_id"]})
    result = _verify(store, anchors)
    assert not result.ok and "deleted from wf_decisions" in result.problem and decision["decision_id"] in result.problem


def test_a_decision_event_records_the_package_and_trades_decided_on(store, anchors):
    decision, _ = _day(store, anchors)
    with store.begin() as conn:
        payload = json.loads(conn.execute(text("select payload from wf_audit_events where event_id = :e"),
                                          {"e": f"decision:{decision['decision_id']}"}).scalar())
        stored = conn.execute(text("select package from wf_recommendations where recommendation_id = 'REC-1'")).scalar()
    assert payload["package_sha256"] == hashlib.sha256(stored.encode()).hexdigest()
    trades = json.loads(stored)["trades"]
    assert [(t["symbol"], t["side"], t["quantity"]) for t in trades] == [("VTI", "sell", 10), ("BND", "buy", 20)]
    assert payload["trades_sha256"] == hashlib.sha256(audit.canonical_json(trades).encode()).hexdigest()


def test_an_altered_anchor_file_is_named(store, anchors):
    _, anchored = _day(store, anchors)
    path = anchored["file"]
    os.chmod(path, 0o640)
    document = json.loads(open(path).read())
    document["seq"] -= 3  # pretend the head was earlier, to hide a deleted tail
    open(path, "w").write(json.dumps(document))
    result = _verify(store, anchors)
    assert not result.ok and "not signed by the audit key" in result.problem


# ---------------------------------------------------------------------------------------------
# The key: required, sandbox only by choice, rotation
# ---------------------------------------------------------------------------------------------


def test_no_key_no_append_outside_the_sandbox(store, monkeypatch):
    # Appends (here the publication's) sign with the key of the process environment, read when
    # they append: it is not passed down, so the environment is what these key tests set.
    monkeypatch.delenv("REBAL_AUDIT_KEY", raising=False)
    monkeypatch.delenv("REBAL_SANDBOX", raising=False)
    with pytest.raises(audit.AuditKeyError, match="REBAL_AUDIT_KEY is not set"):
        publish(store, package("REC-1"))


def test_sandbox_events_are_not_evidence_outside_the_sandbox(store, monkeypatch):
    monkeypatch.delenv("REBAL_AUDIT_KEY", raising=False)
    monkeypatch.setenv("REBAL_SANDBOX", "1")  # the publication signs with the environment's (sandbox) key
    publish(store, package("REC-1"))
    assert _verify(store).ok
    production = load_settings({"REBAL_AUDIT_KEY": "a-production-key-that-is-long-enough-0123456789"})
    result = _verify(store, rebal_settings=production)
    assert not result.ok and "sandbox key" in result.problem


def test_a_rotated_key_verifies_with_the_old_key_in_the_keyring(store, monkeypatch):
    old, new = "the-first-audit-key-of-this-firm-0123456789", "the-second-audit-key-of-this-firm-9876543210"
    # Each publication signs with the environment's key of the moment (appends read it themselves).
    monkeypatch.setenv("REBAL_AUDIT_KEY", old)
    publish(store, package("REC-1"))
    monkeypatch.setenv("REBAL_AUDIT_KEY", new)
    publish(store, package("REC-2", account_id="ACC-2"))
    result = _verify(store, rebal_settings=load_settings({"REBAL_AUDIT_KEY": new}))
    assert not result.ok and audit.key_id_of(old.encode()) in result.problem
    assert _verify(store, rebal_settings=load_settings({"REBAL_AUDIT_KEY": new, "REBAL_AUDIT_KEYS": old})).ok
    with store.begin() as conn:
        ids = conn.execute(text("select distinct key_id from wf_audit_events")).scalars().all()
    assert set(ids) == {audit.key_id_of(old.encode()), audit.key_id_of(new.encode())}


# ---------------------------------------------------------------------------------------------
# Property: whatever a DBA without the key does to the rows, verify does not say intact
# ---------------------------------------------------------------------------------------------

from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st  # noqa: E402

EXAMPLES = int(os.environ.get("REBAL_HYPOTHESIS_EXAMPLES", "25"))
TAMPERS = st.one_of(
    st.tuples(st.just("delete"), st.integers(1, 40)),
    st.tuples(st.just("delete_from"), st.integers(1, 40)),
    st.tuples(st.just("alter"), st.integers(1, 40), st.sampled_from(["actor", "payload", "kind", "subject_id",
                                                                        "occurred_at", "event_id"])),
    st.tuples(st.just("wipe")),
    st.tuples(st.just("forge"), st.booleans()),
    st.tuples(st.just("nothing")),
)


@hypothesis_settings(max_examples=EXAMPLES, deadline=None,
                     suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(tamper=TAMPERS)
def test_no_tampering_without_the_key_verifies(store, anchors, tamper):
    # One anchored book per store (hypothesis reuses the test's fixtures for every example); each
    # example tampers inside a transaction that is rolled back.
    with store.begin() as conn:
        empty = audit.head(conn)[0] == 0
    if empty:
        _day(store, anchors)
    with store.engine.connect() as conn:
        transaction = conn.begin()
        try:
            count = conn.execute(text("select count(*) from wf_audit_events")).scalar()
            seq = min(tamper[1], count) if tamper[0] in ("delete", "delete_from", "alter") else None
            if tamper[0] != "nothing":
                _triggers_off(conn)
            if tamper[0] == "delete":
                conn.execute(text("delete from wf_audit_events where seq = :s"), {"s": seq})
            elif tamper[0] == "delete_from":
                conn.execute(text("delete from wf_audit_events where seq >= :s"), {"s": seq})
            elif tamper[0] == "alter":
                column = tamper[2]
                value = {"occurred_at": "2026-11-21 09:00:00", "payload": '{"edited":true}'}.get(column, "edited")
                if column == "occurred_at" and conn.dialect.name == "postgresql":
                    value = DECIDED_AT + timedelta(days=1)
                conn.execute(text(f"update wf_audit_events set {column} = :v where seq = :s"), {"v": value, "s": seq})
            elif tamper[0] == "wipe":
                conn.execute(text("delete from wf_audit_events"))
            elif tamper[0] == "forge":
                _forge(conn, key=b"a key that is not the firm's audit key at all" if tamper[1] else None,
                       key_id=audit.key_id_of(os.environ["REBAL_AUDIT_KEY"].encode()) if tamper[1] else None)
            result = audit.verify(conn, anchors=anchors)
        finally:
            transaction.rollback()
    assert result.ok == (tamper[0] == "nothing"), (tamper, str(result))


def test_the_gate_refuses_an_approval_whose_package_was_edited_after_it(store, anchors):
    """The issue's case: BND changed in the stored package after approval never reaches an order."""
    from rebal_pipeline.workflow import gate

    decision, _ = _day(store, anchors)
    with store.begin() as conn:
        edited = json.loads(conn.execute(text("select package from wf_recommendations "
                                              "where recommendation_id = 'REC-1'")).scalar())
        next(t for t in edited["trades"] if t["symbol"] == "BND")["quantity"] = 286
        conn.execute(text("update wf_recommendations set package = :p where recommendation_id = 'REC-1'"),
                     {"p": audit.canonical_json(edited)})

    def positions_for(accounts):  # not reached: the record check refuses first
        raise AssertionError("the gate read positions for a decision whose record is broken")

    with store.begin() as conn:
        verdict = gate.gate_decision(conn, decision["decision_id"], positions_for, DECIDED_AT + timedelta(hours=1))
    assert not verdict.passed and "package of recommendation REC-1 was changed after decision" in verdict.reason


def test_the_anchor_op_anchors_after_a_job_that_appends(tmp_path):
    """anchor_audit_chain at the end of a job (e.g. execute_rebalance after stage_or_submit_orders)."""
    from dagster import job, op

    from rebal_pipeline.defs.approvals.jobs import anchor_audit_chain
    from rebal_pipeline.resources import AuditResource, FeedLocation, WorkflowStoreResource
    from rebal_pipeline.workflow.store import WorkflowStore

    # The op anchors into the feed resource's archive, signed with the audit resource's key (the
    # tests' key, conftest.py, that the publication signs with); no REBAL_AUDIT_ANCHOR_DIR.
    deployment = load_settings({"REBAL_ARCHIVE_ROOT": str(tmp_path / "archive"),
                                "REBAL_AUDIT_KEY": os.environ["REBAL_AUDIT_KEY"]})
    url = f"sqlite:///{tmp_path / 'workflow.sqlite'}"
    store = WorkflowStore(url)
    store.migrate()

    @op
    def appends() -> None:
        publish(store, package("REC-1"))

    @job
    def appending_job():
        anchor_audit_chain(appends())

    result = appending_job.execute_in_process(resources={
        "workflow_store": WorkflowStoreResource(url=url),
        "feed": FeedLocation(feed_root=str(tmp_path / "feeds"), archive_root=str(deployment.archive_root())),
        "audit": AuditResource.from_settings(deployment)})
    assert result.success
    anchored = result.output_for_node("anchor_audit_chain")
    with store.begin() as conn:
        checked = audit.verify(conn, anchors=audit.anchor_dir(conn, tmp_path / "archive", deployment))
        assert anchored["seq"] == audit.head(conn)[0]
    assert checked.ok and checked.anchor == anchored["file"]
    store.dispose()
