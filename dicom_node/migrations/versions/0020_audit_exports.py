"""audit exports: where sending the audit trail to an audit record repository (audit_syslog) stands

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05 11:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0020'
down_revision = '0019'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'audit_exports',
        sa.Column('destination', sa.String(length=255), nullable=False),
        sa.Column('last_id', sa.Integer(), nullable=False),
        sa.Column('sent', sa.Integer(), nullable=False),
        sa.Column('skipped', sa.Integer(), nullable=False),
        sa.Column('holder', sa.String(length=128), nullable=True),
        sa.Column('lease_until', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_sent_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('destination'),
    )


def downgrade() -> None:
    op.drop_table('audit_exports')
