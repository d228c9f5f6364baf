"""instances: a multi-frame one's frames and the positions they lie at, so that an enhanced series with several frames at one position (diffusion b-values, echoes) is told at completion

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05 07:25:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0016'
down_revision = '0015'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('frames', sa.Integer(), nullable=False, server_default='1'))
        batch_op.add_column(sa.Column('frame_positions', sa.Integer(), nullable=False, server_default='1'))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('frame_positions')
        batch_op.drop_column('frames')
