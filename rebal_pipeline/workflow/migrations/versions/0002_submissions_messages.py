"""submissions and outbound messages

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-24 12:54:40.306667
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('wf_messages',
    sa.Column('message_key', sa.String(length=200), nullable=False),
    sa.Column('kind', sa.String(length=48), nullable=False),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('recipient_id', sa.String(length=64), nullable=True),
    sa.Column('recommendation_id', sa.String(length=64), nullable=True),
    sa.Column('external_id', sa.String(length=200), nullable=True),
    sa.Column('status', sa.String(length=24), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('last_error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('sent_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('message_key')
    )
    with op.batch_alter_table('wf_messages', schema=None) as batch_op:
        batch_op.create_index('ix_wf_messages_status', ['status', 'next_attempt_at'], unique=False)

    op.create_table('wf_submissions',
    sa.Column('cl_ord_id', sa.String(length=32), nullable=False),
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('custodian', sa.String(length=32), nullable=True),
    sa.Column('symbol', sa.String(length=32), nullable=False),
    sa.Column('side', sa.String(length=8), nullable=False),
    sa.Column('quantity', sa.Float(), nullable=True),
    sa.Column('cash_amount', sa.Float(), nullable=True),
    sa.Column('block_id', sa.String(length=32), nullable=True),
    sa.Column('channel', sa.String(length=16), nullable=False),
    sa.Column('destination', sa.Text(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('completed_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('cl_ord_id')
    )
    with op.batch_alter_table('wf_submissions', schema=None) as batch_op:
        batch_op.create_index('ix_wf_submissions_decision', ['decision_id'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('wf_submissions', schema=None) as batch_op:
        batch_op.drop_index('ix_wf_submissions_decision')

    op.drop_table('wf_submissions')
    with op.batch_alter_table('wf_messages', schema=None) as batch_op:
        batch_op.drop_index('ix_wf_messages_status')

    op.drop_table('wf_messages')
