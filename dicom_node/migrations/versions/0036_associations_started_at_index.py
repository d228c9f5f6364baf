"""associations.started_at indexed: `GET /associations` lists the newest first (and filters by
since/until), and the journal finds an association's row, written late, by its start

Revision ID: 0036
Revises: 0035
Create Date: 2026-12-07 22:30:00
"""

from alembic import op


revision = '0036'
down_revision = '0035'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_associations_started_at'), ['started_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('associations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_associations_started_at'))
