"""Bearer tokens with roles on the API's requests (dicom_node.tokens keeps them)."""

from __future__ import annotations

from dataclasses import dataclass

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from dicom_node import audit
from dicom_node.tokens import active_token, note_use


@dataclass(frozen=True)
class Caller:
    name: str
    role: str

    @property
    def actor(self) -> str:
        return f"api:{self.name}"


bearer = HTTPBearer(auto_error=False)


def current_caller(request: Request, credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
    sessions: sessionmaker[Session] = request.app.state.sessions
    if credentials is None or credentials.scheme.lower() != "bearer":
        raise HTTPException(401, "missing bearer token: send 'Authorization: Bearer <token>' (mr2ct tokens create)",
                            headers={"WWW-Authenticate": "Bearer"})
    row = active_token(sessions, credentials.credentials)
    if row is None:
        client = request.client.host if request.client else "?"
        audit.record(sessions, audit.SECURITY_ALERT, "failure", f"api@{client}", reason="invalid or revoked token", path=request.url.path)
        raise HTTPException(401, "invalid or revoked token", headers={"WWW-Authenticate": "Bearer"})
    note_use(sessions, row)
    return Caller(name=row.name, role=row.role)


def require(*roles: str):  # type: ignore[no-untyped-def]
    def dependency(caller: Caller = Depends(current_caller)) -> Caller:
        if caller.role not in roles:
            raise HTTPException(403, f"role {caller.role!r} may not do this; needs one of {list(roles)}")
        return caller

    return dependency
