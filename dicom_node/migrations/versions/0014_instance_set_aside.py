"""instances: set aside (with the reason) when a series is asked for as Orthanc holds it and Orthanc no longer holds them

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05 06:50:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0014'
down_revision = '0013'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('set_aside', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_column('set_aside')
