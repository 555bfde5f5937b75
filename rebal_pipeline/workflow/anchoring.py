"""Anchoring the audit chain's head outside the database (docs/audit.md).

`anchor_chain` is the one anchoring step of rebal: the daily `audit_anchor` asset
(defs/workflow/anchor.py) and the `anchor_audit_chain` op at the end of `execute_rebalance`
(defs/approvals/jobs.py) both call it. It verifies the chain and writes its head (seq, hash,
count) to a write-once anchor file (workflow/audit.py `anchor`); a chain that does not verify is
`AnchorRefused`, and nothing is anchored on top of a broken record.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection

from rebal_pipeline.workflow import audit


class AnchorRefused(Exception):
    """The audit chain does not verify: nothing was anchored. The message says what to do."""


def anchor_chain(conn: Connection, now: datetime, archive_root: Path | str | None,
                 rebal_settings=None) -> dict | None:
    """The anchor document written for the chain's head (None: the chain is empty).
    `rebal_settings`: the RebalSettings whose audit keys and REBAL_AUDIT_ANCHOR_DIR apply (default:
    the process environment's, read now)."""
    try:
        return audit.anchor(conn, now, audit.anchor_dir(conn, archive_root, rebal_settings),
                            rebal_settings=rebal_settings)
    except audit.AuditBroken as broken:
        raise AnchorRefused(f"the audit chain does not verify; nothing was anchored. {broken} "
                            "(run `rebal audit verify`, find the cause before the next run)") from None


def anchor_summary(document: dict | None) -> dict:
    """What a run shows of an anchor: its head, key and file (the file as a plain path)."""
    if document is None:
        return {"events": 0}
    return {"seq": document["seq"], "head_hash": document["hash"], "events": document["events"],
            "key_id": document["key_id"], "anchored_at": document["anchored_at"], "anchor_file": document["file"]}


def without_signature(document: dict | None) -> dict:
    """The anchor as an op's output: everything but its signature."""
    return {k: v for k, v in (document or {}).items() if k != "signature"}
