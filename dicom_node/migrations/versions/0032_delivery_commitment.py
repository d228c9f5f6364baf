"""deliveries: the storage commitment transaction Orthanc opened with the modality for the last sending,
and when the modality committed every instance (deliver_commitment)

Revision ID: 0032
Revises: 0031
Create Date: 2026-12-06 07:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0032'
down_revision = '0031'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.add_column(sa.Column('commitment_uid', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('committed_at', sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_column('committed_at')
        batch_op.drop_column('commitment_uid')
