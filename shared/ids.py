"""Public ids: a type prefix and 24 random base-32 characters (120 bits). Never user input."""

from __future__ import annotations

import hashlib
import re
import secrets

_ALPHABET = "abcdefghijklmnopqrstuvwxyz234567"
_PREFIXES = {
    "tenant": "org",
    "api_key": "key",
    "file": "file",
    "base_model": "model",
    "job": "ftjob",
    "checkpoint": "ftckpt",
    "adapter": "ftadapter",
    "webhook": "wh",
    "webhook_delivery": "msg",
    "merge": "merge",
}
ID_PATTERN = re.compile(r"^[a-z]+-[a-z2-7]{24}$")


def new_id(kind: str) -> str:
    return f"{_PREFIXES[kind]}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def is_valid_id(value: str, kind: str) -> bool:
    return bool(ID_PATTERN.match(value)) and value.startswith(_PREFIXES[kind] + "-")


def derived_id(kind: str, *parts: str) -> str:
    """A well-formed id of `kind` computed from `parts` (the same parts, the same id): for
    objects a retried step must find again, like the adapter an attempt uploads."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    bits = int.from_bytes(digest[:15], "big")  # 120 bits, 24 base-32 characters
    chars = [_ALPHABET[(bits >> (5 * i)) & 31] for i in range(24)]
    return f"{_PREFIXES[kind]}-" + "".join(reversed(chars))
