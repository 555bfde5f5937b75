"""people: deactivated users, team alert settings

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02 17:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('wf_users', schema=None) as batch_op:
        batch_op.add_column(sa.Column('deactivated_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column('deactivated_by', sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column('deactivation_reason', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('team_alerts', sa.Boolean(), nullable=True))
    with op.batch_alter_table('wf_recommendations', schema=None) as batch_op:
        batch_op.add_column(sa.Column('rerouted_at', sa.DateTime(timezone=True), nullable=True))
    # return_to_advisor (17 characters) does not fit the old String(16). SQLite does not enforce
    # VARCHAR lengths (and rebuilding wf_decisions there would renumber nothing but is needless).
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('wf_decisions', 'action', type_=sa.String(length=32), existing_type=sa.String(length=16),
                        existing_nullable=False)


def downgrade() -> None:
    if op.get_bind().dialect.name == 'postgresql':
        op.alter_column('wf_decisions', 'action', type_=sa.String(length=16), existing_type=sa.String(length=32),
                        existing_nullable=False)
    with op.batch_alter_table('wf_recommendations', schema=None) as batch_op:
        batch_op.drop_column('rerouted_at')
    with op.batch_alter_table('wf_users', schema=None) as batch_op:
        batch_op.drop_column('team_alerts')
        batch_op.drop_column('deactivation_reason')
        batch_op.drop_column('deactivated_by')
        batch_op.drop_column('deactivated_at')
