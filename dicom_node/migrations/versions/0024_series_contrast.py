"""series: the first instance's MR contrast (Acquisition Contrast, or the textbook reading of TR, TE and TI) and what told it, and its BodyPartExamined, so that a T2, FLAIR or proton-density series, or one of another body part than a head, is told at completion and left unsynthesized by select_acquisition_contrasts and select_body_parts

Revision ID: 0024
Revises: 0023
Create Date: 2026-12-05 16:00:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0024'
down_revision = '0023'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contrast', sa.String(length=24), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('contrast_source', sa.String(length=160), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('body_part', sa.String(length=16), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('body_part')
        batch_op.drop_column('contrast_source')
        batch_op.drop_column('contrast')
