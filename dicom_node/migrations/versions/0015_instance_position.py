"""instances: each single-frame one's position, so that a series with several images at one position (diffusion b-values, echoes) is told at completion

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05 06:45:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0015'
down_revision = '0014'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('position', sa.String(length=48), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('position')
