"""series: the code of the reason an ignored series was not synthesized (dicom_node.ingest.REASON_CODES), so that an administrator can ask which series a rule kept out (GET /series?reason_code=) and the QA's interlocks match a code, not the reason's words

Revision ID: 0029
Revises: 0028
Create Date: 2026-12-06 01:35:00
"""

from alembic import op
import sqlalchemy as sa


revision = '0029'
down_revision = '0028'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.add_column(sa.Column('reason_code', sa.String(length=24), nullable=False, server_default=''))
        batch_op.create_index(batch_op.f('ix_series_reason_code'), ['reason_code'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_reason_code'))
        batch_op.drop_column('reason_code')
