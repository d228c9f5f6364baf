"""audit_events is append-only in the database itself: triggers refuse UPDATE and DELETE of its rows
(the code had no such path; now a defect, a script or a hand at the SQL prompt cannot take one either
without first dropping the trigger, a deliberate act a DBA's own log shows)

Revision ID: 0035
Revises: 0034
Create Date: 2026-12-07 22:00:00
"""

from alembic import op


revision = '0035'
down_revision = '0034'
branch_labels = None
depends_on = None

MESSAGE = "audit_events is append-only: its rows are never changed or deleted"


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute(f"""
            CREATE FUNCTION mr2ct_audit_events_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN
                RAISE EXCEPTION '{MESSAGE} (% refused)', TG_OP USING ERRCODE = 'insufficient_privilege';
            END
            $$""")
        op.execute("CREATE TRIGGER audit_events_append_only BEFORE UPDATE OR DELETE ON audit_events "
                   "FOR EACH ROW EXECUTE FUNCTION mr2ct_audit_events_append_only()")
        return
    for verb in ("UPDATE", "DELETE"):
        op.execute(f"CREATE TRIGGER audit_events_no_{verb.lower()} BEFORE {verb} ON audit_events "
                   f"BEGIN SELECT RAISE(ABORT, '{MESSAGE} ({verb} refused)'); END")


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP TRIGGER audit_events_append_only ON audit_events")
        op.execute("DROP FUNCTION mr2ct_audit_events_append_only()")
        return
    for verb in ("update", "delete"):
        op.execute(f"DROP TRIGGER audit_events_no_{verb}")
