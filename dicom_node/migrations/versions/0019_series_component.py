"""series: the first instance's complex component (Complex Image Component, or GE's private image type) and what said it, so that a GE phase, real or imaginary series is told at completion

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05 11:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0019'
down_revision = '0018'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('component', sa.String(length=16), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('component_source', sa.String(length=80), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('component_source')
        batch_op.drop_column('component')
