"""series: an index on ``outcome_after``, so that each notes round finds the series a writer took and
never let go of (it died between taking and writing; they are taken again once the lease is over)
without reading every series

Revision ID: 0031
Revises: 0030
Create Date: 2026-12-06 06:35:00
"""

from alembic import op


revision = '0031'
down_revision = '0030'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_series_outcome_after'), ['outcome_after'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_outcome_after'))
