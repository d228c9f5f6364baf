"""instances: a digest of the positions a multi-frame instance's frames lie at, so that a series of several multi-frame instances at the same positions (one echo or b-value per instance) is told at completion

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05 09:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0018'
down_revision = '0017'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('frame_set', sa.String(length=16), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('frame_set')
