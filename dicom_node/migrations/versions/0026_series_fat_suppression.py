"""series: whether the first instance's header says fat was suppressed (Spectrally Selected Suppression, or FS in ScanOptions) and what told it, so that a fat-saturated series is told at completion and left unsynthesized by select_fat_suppression when the model learned images with fat bright

Revision ID: 0026
Revises: 0025
Create Date: 2026-12-05 22:45:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0026'
down_revision = '0025'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('fat_suppression', sa.String(length=8), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('fat_suppression_source', sa.String(length=160), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('fat_suppression_source')
        batch_op.drop_column('fat_suppression')
