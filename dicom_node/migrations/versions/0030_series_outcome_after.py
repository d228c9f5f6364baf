"""series: no writer takes a series' note in Orthanc before ``outcome_after`` (a writer holds it, or Orthanc did not hold the series yet), so that two worker processes never write one series' notes out of order and a series Orthanc receives after the node judged it still gets its note

Revision ID: 0030
Revises: 0029
Create Date: 2026-12-06 04:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0030'
down_revision = '0029'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('outcome_after', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('outcome_after')
