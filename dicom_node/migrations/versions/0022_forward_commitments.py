"""forward_commitments: storage commitment asked of the routing destination (forward_commitment)

Revision ID: 0022
Revises: 0021
Create Date: 2026-12-05 13:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0022'
down_revision = '0021'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'forward_commitments',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('transaction_uid', sa.String(length=64), nullable=False),
        sa.Column('destination', sa.String(length=200), nullable=False),
        sa.Column('instances', sa.Integer(), nullable=False),
        sa.Column('requested_at', sa.DateTime(timezone=True), nullable=False),
        sa.Column('state', sa.String(length=16), nullable=False),
        sa.Column('reported_at', sa.DateTime(timezone=True), nullable=True),
        sa.Column('committed', sa.Integer(), nullable=True),
        sa.Column('failed', sa.Integer(), nullable=True),
        sa.Column('last_error', sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint('id'),
        sa.UniqueConstraint('transaction_uid'),
    )
    with op.batch_alter_table('forward_commitments', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_forward_commitments_state'), ['state'], unique=False)
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.add_column(sa.Column('forward_commitment_id', sa.Integer(), nullable=True))
        batch_op.add_column(sa.Column('forward_committed_at', sa.DateTime(timezone=True), nullable=True))
        batch_op.create_index(batch_op.f('ix_instances_forward_commitment_id'), ['forward_commitment_id'], unique=False)
        batch_op.create_index('ix_instances_committed_purged', ['forward_committed_at', 'purged_at'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_committed_purged')
        batch_op.drop_index(batch_op.f('ix_instances_forward_commitment_id'))
        batch_op.drop_column('forward_committed_at')
        batch_op.drop_column('forward_commitment_id')
    with op.batch_alter_table('forward_commitments', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_forward_commitments_state'))
    op.drop_table('forward_commitments')
