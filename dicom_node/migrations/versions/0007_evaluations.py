"""evaluations: a model scored on a hospital's own MR/CT pairs (`mr2ct evaluate --pairs --registry`)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 19:40:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('evaluations',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=False),
    sa.Column('against_sha256', sa.String(length=64), nullable=True),
    sa.Column('dataset_digest', sa.String(length=64), nullable=False),
    sa.Column('label', sa.String(length=128), nullable=False),
    sa.Column('pairs', sa.Integer(), nullable=False),
    sa.Column('test_time_augmentation', sa.String(length=16), nullable=False),
    sa.Column('mae_hu', sa.Float(), nullable=False),
    sa.Column('psnr_db', sa.Float(), nullable=False),
    sa.Column('ssim', sa.Float(), nullable=False),
    sa.Column('mae_linear_hu', sa.Float(), nullable=False),
    sa.Column('report', sa.JSON(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_evaluations_at'), ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_dataset_digest'), ['dataset_digest'], unique=False)
        batch_op.create_index(batch_op.f('ix_evaluations_model_sha256'), ['model_sha256'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('evaluations', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_evaluations_model_sha256'))
        batch_op.drop_index(batch_op.f('ix_evaluations_dataset_digest'))
        batch_op.drop_index(batch_op.f('ix_evaluations_at'))
    op.drop_table('evaluations')
