"""series.headers_stale: an instance was sent again (or moved to another series) since the series'
contrast, contrast agent, fat suppression and body part were folded from its instances' headers;
they are read again from the spool when it completes

Revision ID: 0034
Revises: 0033
Create Date: 2026-12-06 15:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0034'
down_revision = '0033'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('headers_stale', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('headers_stale')
