"""portal sign-in: sessions and single-use sign-in links

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03 11:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('wf_portal_sessions',
    sa.Column('session_sha256', sa.String(length=64), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('csrf_token', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('last_seen_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('session_sha256')
    )
    op.create_index('ix_wf_portal_sessions_user', 'wf_portal_sessions', ['user_id'])
    op.create_table('wf_sign_in_links',
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('link_id', sa.String(length=32), nullable=False),
    sa.Column('user_id', sa.String(length=64), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('used_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('token_sha256'),
    sa.UniqueConstraint('link_id')
    )
    op.create_index('ix_wf_sign_in_links_user_created', 'wf_sign_in_links', ['user_id', 'created_at'])


def downgrade() -> None:
    op.drop_index('ix_wf_sign_in_links_user_created', table_name='wf_sign_in_links')
    op.drop_table('wf_sign_in_links')
    op.drop_index('ix_wf_portal_sessions_user', table_name='wf_portal_sessions')
    op.drop_table('wf_portal_sessions')
