"""series: whether where the series stands (ignored and why, its job queued, running, done, failed) is due to be written on the MR series in Orthanc (its Mr2ctOutcome metadata), and the note last written there, so that a user of Orthanc sees why a series has no sCT

Revision ID: 0027
Revises: 0026
Create Date: 2026-12-06 01:10:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0027'
down_revision = '0026'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('outcome_due', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('outcome_note', sa.Text(), nullable=True))
        batch_op.create_index(batch_op.f('ix_series_outcome_due'), ['outcome_due'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_outcome_due'))
        batch_op.drop_column('outcome_note')
        batch_op.drop_column('outcome_due')
