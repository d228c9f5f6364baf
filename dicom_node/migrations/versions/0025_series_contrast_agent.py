"""series: whether the first instance's header says a contrast agent was given (Contrast/Bolus Usage, Contrast/Bolus Agent) and what told it, so that a post-contrast series is told at completion and left unsynthesized by select_contrast_agent when the model learned unenhanced images

Revision ID: 0025
Revises: 0024
Create Date: 2026-12-05 22:30:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0025'
down_revision = '0024'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('contrast_agent', sa.String(length=8), nullable=False, server_default=''))
        batch_op.add_column(sa.Column('contrast_agent_source', sa.String(length=160), nullable=False, server_default=''))


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_column('contrast_agent_source')
        batch_op.drop_column('contrast_agent')
