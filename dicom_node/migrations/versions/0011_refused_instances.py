"""refused instances: kept until stored, their series held meanwhile

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05 00:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0011'
down_revision = '0010'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'refused_instances',
        sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
        sa.Column('status', sa.String(length=6), nullable=False),
        sa.Column('reason', sa.Text(), nullable=False),
        sa.Column('refused_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('sop_instance_uid'),
    )
    with op.batch_alter_table('refused_instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_refused_instances_series_instance_uid'), ['series_instance_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('refused_instances', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_refused_instances_series_instance_uid'))
    op.drop_table('refused_instances')
