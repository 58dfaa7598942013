"""Tenants, API keys and the base-model registry. Services flush; callers commit."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import secrets
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from shared.errors import Conflict, NotFound, Unauthorized
from shared.ids import new_id
from shared.models import ApiKey, RegisteredModel, Tenant, utcnow

KEY_SCHEME = "qlsk-"
KEY_ENTROPY_BYTES = 32
PREFIX_LEN = len(KEY_SCHEME) + 8
# last_used_at is written at most this often per key, so auth does not write on every request.
LAST_USED_RESOLUTION = timedelta(minutes=1)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass(frozen=True)
class IssuedKey:
    id: str
    key: str  # the secret: returned once, never stored
    prefix: str


def create_tenant(session: Session, *, name: str) -> Tenant:
    tenant = Tenant(id=new_id("tenant"), name=name)
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, *, tenant_id: str) -> Tenant:
    tenant = session.get(Tenant, tenant_id)
    if tenant is None:
        raise NotFound(f"no tenant {tenant_id!r}", param="tenant_id")
    return tenant


def create_key(session: Session, *, tenant_id: str) -> IssuedKey:
    get_tenant(session, tenant_id=tenant_id)
    secret = KEY_SCHEME + secrets.token_urlsafe(KEY_ENTROPY_BYTES)
    row = ApiKey(
        id=new_id("api_key"),
        tenant_id=tenant_id,
        prefix=secret[:PREFIX_LEN],
        key_hash=hash_key(secret),
    )
    session.add(row)
    session.flush()
    return IssuedKey(id=row.id, key=secret, prefix=row.prefix)


def revoke_key(session: Session, *, key_id: str) -> ApiKey:
    row = session.get(ApiKey, key_id)
    if row is None:
        raise NotFound(f"no API key {key_id!r}", param="key_id")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        session.flush()
    return row


def authenticate(session: Session, *, key: str) -> Tenant:
    """Return the tenant owning `key`; every failure looks the same to the caller."""
    if not key.startswith(KEY_SCHEME) or len(key) < PREFIX_LEN + 16:
        raise Unauthorized("invalid API key")
    digest = hash_key(key)
    candidates = session.scalars(select(ApiKey).where(ApiKey.prefix == key[:PREFIX_LEN])).all()
    for row in candidates:
        if hmac.compare_digest(row.key_hash, digest) and row.revoked_at is None:
            now = utcnow()
            last = row.last_used_at
            if last is not None and last.tzinfo is None:  # SQLite drops the zone
                last = last.replace(tzinfo=now.tzinfo)
            if last is None or now - last > LAST_USED_RESOLUTION:
                row.last_used_at = now
                session.flush()
            return row.tenant
    raise Unauthorized("invalid API key")


CHAT_TEMPLATE_FLAG = "qlora_chat_template"


def read_local_config(source: str) -> dict[str, Any] | None:
    """config.json of a local model folder, plus whether its tokenizer has a chat template
    (the estimator and the admission checks read it); None for hub ids."""
    folder = Path(source)
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict):
        return None
    try:
        tok = json.loads((folder / "tokenizer_config.json").read_text())
        has_template = bool(tok.get("chat_template")) or (folder / "chat_template.jinja").is_file()
    except (OSError, ValueError, AttributeError):
        has_template = (folder / "chat_template.jinja").is_file()
    config[CHAT_TEMPLATE_FLAG] = has_template
    return config


def register_model(
    session: Session,
    *,
    name: str,
    source: str,
    revision: str | None = None,
    config: dict[str, Any] | None = None,
) -> RegisteredModel:
    """Register a base model; without `config`, a local folder's own is read."""
    if config is None:
        config = read_local_config(source)
    if session.scalar(select(RegisteredModel).where(RegisteredModel.name == name)) is not None:
        raise Conflict(f"a base model named {name!r} is already registered", param="name")
    row = RegisteredModel(
        id=new_id("base_model"), name=name, source=source, revision=revision, config=config
    )
    session.add(row)
    session.flush()
    return row


def list_models(session: Session) -> list[RegisteredModel]:
    return list(session.scalars(select(RegisteredModel).order_by(RegisteredModel.name)))


def get_model_by_name(session: Session, *, name: str) -> RegisteredModel:
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    if row is None:
        raise NotFound(f"no base model named {name!r}", param="model", code="model_not_found")
    return row


def ensure_model(session: Session, *, name: str, source: str) -> RegisteredModel:
    """The model registered as `name`, registering `source` under that name when absent."""
    row = session.scalar(select(RegisteredModel).where(RegisteredModel.name == name))
    return row if row is not None else register_model(session, name=name, source=source)


def tenant_slug(tenant: Tenant) -> str:
    """The organization segment of fine-tuned model names (`ft:{base}:{slug}:{suffix}:{id}`):
    the tenant's name in lower case, runs of other characters as one '-', at most 32."""
    slug = re.sub(r"[^a-z0-9]+", "-", tenant.name.lower()).strip("-")[:32].strip("-")
    return slug or tenant.id


def fine_tuned_name(*, base: str, slug: str, suffix: str | None, adapter_id: str) -> str:
    """OpenAI's shape: `ft:{base}:{organization}:{suffix}:{id}`, the suffix empty if none."""
    return f"ft:{base}:{slug}:{suffix or ''}:{adapter_id}"
