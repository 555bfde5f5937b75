"""workflow store: users, team routing, recommendations, decisions, links, notifications, audit chain

Revision ID: 0001
Revises: 
Create Date: 2026-11-24 12:16:49.113244
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('wf_advisor_team',
    sa.Column('advisor_id', sa.String(length=64), nullable=False),
    sa.Column('member_user_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('advisor_id', 'member_user_id')
    )
    op.create_table('wf_audit_events',
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('event_id', sa.String(length=200), nullable=False),
    sa.Column('occurred_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('kind', sa.String(length=48), nullable=False),
    sa.Column('subject_id', sa.String(length=200), nullable=True),
    sa.Column('actor', sa.String(length=128), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('prev_hash', sa.String(length=64), nullable=False),
    sa.Column('hash', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('seq'),
    sa.UniqueConstraint('event_id', name='uq_wf_audit_events_event_id')
    )
    op.create_table('wf_notifications',
    sa.Column('notification_key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=32), nullable=False),
    sa.Column('recommendation_id', sa.String(length=64), nullable=True),
    sa.Column('recipient_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.PrimaryKeyConstraint('notification_key')
    )
    op.create_table('wf_recommendations',
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('lineage', sa.String(length=200), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=False),
    sa.Column('scope', sa.String(length=16), nullable=False),
    sa.Column('scope_id', sa.String(length=64), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('household_id', sa.String(length=64), nullable=True),
    sa.Column('advisor_id', sa.String(length=64), nullable=True),
    sa.Column('tier', sa.String(length=32), nullable=True),
    sa.Column('urgency', sa.String(length=16), nullable=True),
    sa.Column('delivery', sa.String(length=32), nullable=True),
    sa.Column('discretionary', sa.Boolean(), nullable=False),
    sa.Column('trade_value', sa.Float(), nullable=False),
    sa.Column('realized_gain', sa.Float(), nullable=False),
    sa.Column('policy_version', sa.String(length=64), nullable=True),
    sa.Column('positions_fingerprint', sa.String(length=64), nullable=True),
    sa.Column('package', sa.Text(), nullable=False),
    sa.Column('status', sa.String(length=32), nullable=False),
    sa.Column('clock_started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('supersedes', sa.String(length=64), nullable=True),
    sa.Column('superseded_by', sa.String(length=64), nullable=True),
    sa.Column('deferred_until', sa.DateTime(timezone=True), nullable=True),
    sa.Column('reminder_sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('escalated_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('escalated_to', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('recommendation_id')
    )
    with op.batch_alter_table('wf_recommendations', schema=None) as batch_op:
        batch_op.create_index('ix_wf_recommendations_advisor_status', ['advisor_id', 'status'], unique=False)
        batch_op.create_index('ix_wf_recommendations_lineage_status', ['lineage', 'status'], unique=False)

    op.create_table('wf_used_links',
    sa.Column('link_id', sa.String(length=64), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.PrimaryKeyConstraint('link_id')
    )
    op.create_table('wf_users',
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('email', sa.String(length=320), nullable=False),
    sa.Column('role', sa.String(length=32), nullable=False),
    sa.Column('active', sa.Boolean(), nullable=False),
    sa.Column('api_token_sha256', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('user_id'),
    sa.UniqueConstraint('api_token_sha256')
    )
    op.create_table('wf_decisions',
    sa.Column('decision_seq', sa.Integer(), autoincrement=True, nullable=False),
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('action', sa.String(length=16), nullable=False),
    sa.Column('actor_id', sa.String(length=64), nullable=False),
    sa.Column('via', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('gate_verdict', sa.String(length=16), nullable=True),
    sa.Column('gate_reason', sa.Text(), nullable=True),
    sa.Column('gate_checked_at', sa.DateTime(timezone=True), nullable=True),
    sa.ForeignKeyConstraint(['recommendation_id'], ['wf_recommendations.recommendation_id'], ),
    sa.PrimaryKeyConstraint('decision_seq'),
    sa.UniqueConstraint('decision_id')
    )
    # ### end Alembic commands ###
    _make_audit_append_only()


# SEC Rule 17a-4(f) style: the audit trail can be appended to, never rewritten. The database
# itself refuses UPDATE and DELETE (and, on Postgres, TRUNCATE) of audit events, whoever asks.
def _make_audit_append_only() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("""
            create or replace function wf_audit_events_refuse() returns trigger language plpgsql as $$
            begin
                raise exception 'wf_audit_events is append-only: % refused', tg_op;
            end $$""")
        op.execute("""create trigger wf_audit_events_no_update_delete before update or delete on wf_audit_events
                      for each row execute function wf_audit_events_refuse()""")
        op.execute("""create trigger wf_audit_events_no_truncate before truncate on wf_audit_events
                      for each statement execute function wf_audit_events_refuse()""")
    else:
        op.execute("""create trigger wf_audit_events_no_update before update on wf_audit_events
                      begin select raise(abort, 'wf_audit_events is append-only: UPDATE refused'); end""")
        op.execute("""create trigger wf_audit_events_no_delete before delete on wf_audit_events
                      begin select raise(abort, 'wf_audit_events is append-only: DELETE refused'); end""")


def downgrade() -> None:
    op.drop_table('wf_decisions')
    op.drop_table('wf_users')
    op.drop_table('wf_used_links')
    with op.batch_alter_table('wf_recommendations', schema=None) as batch_op:
        batch_op.drop_index('ix_wf_recommendations_lineage_status')
        batch_op.drop_index('ix_wf_recommendations_advisor_status')

    op.drop_table('wf_recommendations')
    op.drop_table('wf_notifications')
    op.drop_table('wf_audit_events')
    op.drop_table('wf_advisor_team')
    # ### end Alembic commands ###
