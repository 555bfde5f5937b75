"""audit record: keyed chain, anchors, policy versions, configuration snapshots

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02 17:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # The id of the HMAC key that signed each event (NULL: written before the chain was keyed).
    op.add_column('wf_audit_events', sa.Column('key_id', sa.String(length=32), nullable=True))
    op.create_table('wf_policy_versions',
    sa.Column('version_id', sa.String(length=64), nullable=False),
    sa.Column('version', sa.String(length=64), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('first_seen_as_of', sa.Date(), nullable=False),
    sa.Column('first_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('version_id')
    )
    op.create_table('wf_config_snapshots',
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('scope_id', sa.String(length=200), nullable=False),
    sa.Column('content_sha256', sa.String(length=64), nullable=False),
    sa.Column('content', sa.Text(), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=False),
    sa.Column('seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('kind', 'scope_id')
    )
    if op.get_bind().dialect.name == "sqlite":
        # INSERT OR REPLACE deletes the existing row without firing delete triggers (unless
        # recursive_triggers is on): refuse, before the insert, any event whose seq or event_id is
        # already in the chain, whatever the conflict clause.
        op.execute("""create trigger wf_audit_events_no_replace before insert on wf_audit_events
                      when exists (select 1 from wf_audit_events where seq = new.seq or event_id = new.event_id)
                      begin select raise(abort, 'wf_audit_events is append-only: an existing event cannot be replaced'); end""")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("drop trigger if exists wf_audit_events_no_replace")
        op.execute("alter table wf_audit_events drop column key_id")
    else:
        op.drop_column('wf_audit_events', 'key_id')
    op.drop_table('wf_config_snapshots')
    op.drop_table('wf_policy_versions')
