"""jobs: what a done job's sCT was made from (a digest of its originals and of what else decides the pixels), how many CT instances it stored, the earlier job whose sCT it kept, and whether an administrator asked for it to be made again (a retry, never kept), so that a series sent again unchanged keeps its sCT instead of having it made again

Revision ID: 0028
Revises: 0027
Create Date: 2026-12-06 01:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0028'
down_revision = '0027'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('input_digest', sa.String(length=64), nullable=True))
        batch_op.add_column(sa.Column('ct_instances', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('reused_job_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('remake', sa.Boolean(), nullable=False, server_default=sa.false()))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('remake')
        batch_op.drop_column('reused_job_id')
        batch_op.drop_column('ct_instances')
        batch_op.drop_column('input_digest')
