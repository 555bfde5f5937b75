"""order ledger: open orders per account, recommendation outcomes

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 17:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('wf_order_sets',
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('recommendation_id', sa.String(length=64), nullable=False),
    sa.Column('as_of', sa.Date(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('positions_as_of', sa.Date(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('opened_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('closed_by', sa.String(length=128), nullable=True),
    sa.Column('close_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('decision_id', 'account_id'),
    sa.UniqueConstraint('account_id', 'as_of', name='uq_wf_order_sets_account_as_of'),
    )
    with op.batch_alter_table('wf_order_sets', schema=None) as batch_op:
        batch_op.create_index('ix_wf_order_sets_account_state', ['account_id', 'state'], unique=False)

    op.create_table('wf_ledger_orders',
    sa.Column('decision_id', sa.String(length=64), nullable=False),
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.Column('symbol', sa.String(length=32), nullable=False),
    sa.Column('side', sa.String(length=8), nullable=False),
    sa.Column('quantity', sa.Float(), nullable=False),
    sa.Column('est_price', sa.Float(), nullable=False),
    sa.Column('fund_at_nav', sa.Boolean(), nullable=False),
    sa.Column('base_quantity', sa.Float(), nullable=False),
    sa.Column('base_as_of', sa.Date(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('filled_on', sa.Date(), nullable=True),
    sa.Column('closed_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('closed_by', sa.String(length=128), nullable=True),
    sa.Column('close_reason', sa.Text(), nullable=True),
    sa.PrimaryKeyConstraint('decision_id', 'account_id', 'symbol', 'side'),
    )
    with op.batch_alter_table('wf_ledger_orders', schema=None) as batch_op:
        batch_op.create_index('ix_wf_ledger_orders_account_state', ['account_id', 'state'], unique=False)

    op.create_table('wf_account_locks',
    sa.Column('account_id', sa.String(length=64), nullable=False),
    sa.PrimaryKeyConstraint('account_id'),
    )


def downgrade() -> None:
    op.drop_table('wf_account_locks')
    with op.batch_alter_table('wf_ledger_orders', schema=None) as batch_op:
        batch_op.drop_index('ix_wf_ledger_orders_account_state')
    op.drop_table('wf_ledger_orders')
    with op.batch_alter_table('wf_order_sets', schema=None) as batch_op:
        batch_op.drop_index('ix_wf_order_sets_account_state')
    op.drop_table('wf_order_sets')
