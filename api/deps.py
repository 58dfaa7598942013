"""FastAPI dependencies: the request's session (committed by the dependency), the caller."""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session, sessionmaker

from shared.config import Settings
from shared.db import unit_of_work
from shared.errors import Unauthorized
from shared.models import Tenant
from shared.storage import ObjectStore
from shared.tenancy import service as tenancy


def get_settings_dep(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


def get_store(request: Request) -> ObjectStore:
    store: ObjectStore = request.app.state.store
    return store


def get_session(request: Request) -> Iterator[Session]:
    """One transaction per request: committed when the handler returns, else rolled back."""
    factory: sessionmaker[Session] = request.app.state.sessions
    with unit_of_work(factory) as session:
        yield session


def _bearer(request: Request) -> str:
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise Unauthorized("missing bearer API key: send 'Authorization: Bearer <key>'")
    return token.strip()


SettingsDep = Annotated[Settings, Depends(get_settings_dep)]
# scope="function": commit before the response is sent, so a 2xx means the change is durable.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
StoreDep = Annotated[ObjectStore, Depends(get_store)]


def get_current_tenant(request: Request) -> Tenant:
    # Authentication uses its own short transaction so that last_used_at is recorded even
    # when the request itself fails.
    token = _bearer(request)
    factory: sessionmaker[Session] = request.app.state.sessions
    with factory() as session:
        tenant = tenancy.authenticate(session, key=token)
        session.commit()
        session.expunge(tenant)
    return tenant


def require_admin(request: Request) -> None:
    token = _bearer(request)
    expected = request.app.state.settings.admin_api_key
    if not expected or not hmac.compare_digest(token.encode(), expected.encode()):
        raise Unauthorized("invalid admin key")


CurrentTenant = Annotated[Tenant, Depends(get_current_tenant)]
AdminDep = Depends(require_admin)
