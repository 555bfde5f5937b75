"""market-event batch scans: batches, events, members, releases

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 20:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('wf_market_batches',
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('trading_day', sa.Date(), nullable=False),
    sa.Column('session_as_of', sa.Date(), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('release_due_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('events', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('batch_id'),
    sa.UniqueConstraint('trading_day')
    )
    op.create_table('wf_market_events',
    sa.Column('event_id', sa.String(length=48), nullable=False),
    sa.Column('event_key', sa.String(length=200), nullable=False),
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('source', sa.String(length=16), nullable=False),
    sa.Column('declared_by', sa.String(length=64), nullable=False),
    sa.Column('reason', sa.Text(), nullable=False),
    sa.Column('move', sa.Float(), nullable=True),
    sa.Column('reference', sa.Text(), nullable=False),
    sa.Column('detected_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('scanned_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('scan_run_id', sa.String(length=64), nullable=True),
    sa.Column('recommendations', sa.Integer(), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['wf_market_batches.batch_id']),
    sa.PrimaryKeyConstraint('event_id'),
    sa.UniqueConstraint('batch_id', 'seq', name='uq_wf_market_events_batch_seq'),
    sa.UniqueConstraint('event_key')
    )
    op.create_table('wf_batch_recommendations',
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('event_id', sa.String(length=48), nullable=False),
    sa.Column('severity', sa.Float(), nullable=False),
    sa.Column('added_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['wf_market_batches.batch_id']),
    sa.ForeignKeyConstraint(['event_id'], ['wf_market_events.event_id']),
    sa.ForeignKeyConstraint(['recommendation_id'], ['wf_recommendations.recommendation_id']),
    sa.PrimaryKeyConstraint('recommendation_id')
    )
    op.create_index('ix_wf_batch_recommendations_batch', 'wf_batch_recommendations', ['batch_id'])
    op.create_table('wf_batch_releases',
    sa.Column('release_id', sa.String(length=48), nullable=False),
    sa.Column('batch_id', sa.String(length=32), nullable=False),
    sa.Column('seq', sa.Integer(), nullable=False),
    sa.Column('claimed_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('claimed_by_run', sa.String(length=64), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['wf_market_batches.batch_id']),
    sa.PrimaryKeyConstraint('release_id'),
    sa.UniqueConstraint('batch_id', 'seq', name='uq_wf_batch_releases_batch_seq')
    )
    op.create_table('wf_batch_release_decisions',
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('release_id', sa.String(length=48), nullable=False),
    sa.ForeignKeyConstraint(['decision_id'], ['wf_decisions.decision_id']),
    sa.ForeignKeyConstraint(['release_id'], ['wf_batch_releases.release_id']),
    sa.PrimaryKeyConstraint('decision_id')
    )
    op.create_index('ix_wf_batch_release_decisions_release', 'wf_batch_release_decisions', ['release_id'])


def downgrade() -> None:
    op.drop_index('ix_wf_batch_release_decisions_release', table_name='wf_batch_release_decisions')
    op.drop_table('wf_batch_release_decisions')
    op.drop_table('wf_batch_releases')
    op.drop_index('ix_wf_batch_recommendations_batch', table_name='wf_batch_recommendations')
    op.drop_table('wf_batch_recommendations')
    op.drop_table('wf_market_events')
    op.drop_table('wf_market_batches')
