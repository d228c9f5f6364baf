"""API tokens: bearer tokens with roles. Only SHA-256 digests are stored; a token is shown once, at
creation. The token store without the web framework, so that `mr2ct tokens` does not import FastAPI
(dicom_node.api.auth checks them on requests)."""

from __future__ import annotations

import hashlib
import logging
import secrets
from datetime import timedelta

from sqlalchemy import select, update
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.models import ApiToken, as_utc, utcnow

log = logging.getLogger(__name__)

# admin acts, auditor reads; requester may only ask for a series to be synthesized (POST /synthesize):
# the token Orthanc's "Synthesize CT" button holds, which a leak lets read nothing
ROLES = ("admin", "auditor", "requester")
READERS = ("admin", "auditor")  # the roles that read: the API's GET routes and the dashboard
PREFIX = "mr2ct_"
LAST_USED_RESOLUTION = timedelta(minutes=1)  # a token's last use is written at most this often (one write, not one per request)
TOKEN_CREATED = "security-alert/token-created"  # audit actions (IHE ATNA: Security Alert, User Security Attributes Changed)
TOKEN_REVOKED = "security-alert/token-revoked"


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(sessions: sessionmaker[Session], role: str, name: str, actor: str = "mr2ct tokens") -> str:
    """A new token of ``role``; the audit row names ``actor`` (the CLI: the user who ran it)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    token = PREFIX + secrets.token_urlsafe(32)
    with sessions.begin() as session:
        session.add(ApiToken(name=name, role=role, token_sha256=digest(token)))
        session.add(audit.event(TOKEN_CREATED, "success", actor, role=role, token_name=name))
    return token


def active_token(sessions: sessionmaker[Session], token: str) -> ApiToken | None:
    """The stored row of a token that is known and not revoked (the API's bearer token, the
    dashboard's cookie or login); None otherwise."""
    if not token:
        return None
    with sessions() as session:
        row = session.scalars(select(ApiToken).where(ApiToken.token_sha256 == digest(token))).first()
    return row if row is not None and row.revoked_at is None else None


def note_use(sessions: sessionmaker[Session], row: ApiToken) -> None:
    """Record that a token was used (the API or the dashboard), at most once a LAST_USED_RESOLUTION."""
    now = utcnow()
    if row.last_used_at is None or now - as_utc(row.last_used_at) >= LAST_USED_RESOLUTION:
        try:
            with sessions.begin() as session:
                session.execute(update(ApiToken).where(ApiToken.id == row.id).values(last_used_at=now))
        except SQLAlchemyError as exc:  # bookkeeping: a busy database must not refuse the request
            log.warning("could not record the use of token id=%d: %s", row.id, exc)


def list_tokens(sessions: sessionmaker[Session]) -> list[dict[str, object]]:
    """Every token, oldest first: its name, role and when it was created, last used and revoked
    (never the token, which is not stored)."""
    with sessions() as session:
        rows = session.scalars(select(ApiToken).order_by(ApiToken.id)).all()
        return [{"id": r.id, "name": r.name, "role": r.role, "created_at": as_utc(r.created_at),
                 "last_used_at": as_utc(r.last_used_at) if r.last_used_at else None,
                 "revoked_at": as_utc(r.revoked_at) if r.revoked_at else None} for r in rows]


def revoke(sessions: sessionmaker[Session], name: str, actor: str = "mr2ct tokens") -> int:
    """Revoke the active tokens named ``name``; how many. Each revocation is an audit row naming
    ``actor`` (until 2026-12-07 none was: the trail showed a token made, never that it was withdrawn)."""
    with sessions.begin() as session:
        rows = session.scalars(select(ApiToken).where(ApiToken.name == name, ApiToken.revoked_at.is_(None))).all()
        for row in rows:
            row.revoked_at = utcnow()
            session.add(audit.event(TOKEN_REVOKED, "success", actor, role=row.role, token_name=name))
    return len(rows)
