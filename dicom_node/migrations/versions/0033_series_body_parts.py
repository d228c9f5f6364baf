"""series.body_part: every BodyPartExamined a series' instances name (HEAD\\NECK), not the first's
alone, so 64 characters instead of 16

Revision ID: 0033
Revises: 0032
Create Date: 2026-12-06 14:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0033'
down_revision = '0032'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.alter_column('body_part', existing_type=sa.String(length=16), type_=sa.String(length=64),
                              existing_nullable=False, existing_server_default='')


def downgrade() -> None:
    # the first part named is the one a 16-character column held before
    op.execute("UPDATE series SET body_part = substr(body_part, 1, 16) WHERE length(body_part) > 16")
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.alter_column('body_part', existing_type=sa.String(length=64), type_=sa.String(length=16),
                              existing_nullable=False, existing_server_default='')
