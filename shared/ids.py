"""Public ids: a type prefix and 24 random base-32 characters (120 bits). Never user input."""

from __future__ import annotations

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
}
ID_PATTERN = re.compile(r"^[a-z]+-[a-z2-7]{24}$")


def new_id(kind: str) -> str:
    return f"{_PREFIXES[kind]}-" + "".join(secrets.choice(_ALPHABET) for _ in range(24))


def is_valid_id(value: str, kind: str) -> bool:
    return bool(ID_PATTERN.match(value)) and value.startswith(_PREFIXES[kind] + "-")
