"""training runs: `mr2ct train` records its state and per-epoch losses as it trains

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 16:20:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('training_runs',
    sa.Column('id', sa.Integer(), nullable=False),
    sa.Column('out_dir', sa.Text(), nullable=False),
    sa.Column('command', sa.Text(), nullable=False),
    sa.Column('config', sa.JSON(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), nullable=True),
    sa.Column('started_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('ended_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('epochs_planned', sa.Integer(), nullable=False),
    sa.Column('epochs_completed', sa.Integer(), nullable=False),
    sa.Column('losses', sa.JSON(), nullable=False),
    sa.Column('model_sha256', sa.String(length=64), nullable=True),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_runs_out_dir'), ['out_dir'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_runs_started_at'), ['started_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_runs_state'), ['state'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('training_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_runs_state'))
        batch_op.drop_index(batch_op.f('ix_training_runs_started_at'))
        batch_op.drop_index(batch_op.f('ix_training_runs_out_dir'))
    op.drop_table('training_runs')
