"""Row formats of fine-tuning JSONL files, shared by the upload validator and the engine.

Pure functions, no I/O: the API validates each uploaded line with `detect_row_format`, the
training engine reads rows with the same rules, so a file that uploads is a file that trains.
"""

from __future__ import annotations

import enum
from typing import Any


class DatasetFormat(enum.StrEnum):
    """The four row shapes the service accepts. A file holds exactly one of them."""

    CHAT = "chat"  # {"messages": [{"role": ..., "content": ...}, ...]}
    COMPLETION = "prompt_completion"  # {"prompt": ..., "completion": ...}
    ALPACA = "alpaca"  # {"instruction": ..., "input": ..., "output": ...}
    TEXT = "text"  # {"text": ...}


CHAT_ROLES = frozenset({"system", "user", "assistant"})

_ALLOWED_KEYS: dict[DatasetFormat, frozenset[str]] = {
    DatasetFormat.CHAT: frozenset({"messages"}),
    DatasetFormat.COMPLETION: frozenset({"prompt", "completion"}),
    DatasetFormat.ALPACA: frozenset({"instruction", "input", "output"}),
    DatasetFormat.TEXT: frozenset({"text"}),
}
# Keys that tools commonly add to a row and that do not change its meaning.
_IGNORED_KEYS = frozenset({"id", "metadata", "weight"})


class RowError(ValueError):
    """A row that is not one of the accepted formats; `reason` is shown to the user."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _require_str(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{key}' must not be empty")
    return value


def _check_messages(messages: Any) -> None:
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list")
    has_assistant = False
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RowError(f"messages[{i}] must be an object")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise RowError(f"messages[{i}].role must be one of system, user, assistant")
        content = message.get("content")
        if not isinstance(content, str):
            raise RowError(f"messages[{i}].content must be a string")
        unknown = set(message) - {"role", "content", "name", "weight"}
        if unknown:
            raise RowError(f"messages[{i}] has unknown field(s): {', '.join(sorted(unknown))}")
        if role == "assistant":
            has_assistant = True
    if not has_assistant:
        raise RowError("a chat must contain at least one assistant message")


def detect_row_format(row: Any) -> DatasetFormat:
    """Return the format of one decoded JSONL row, or raise `RowError` saying what is wrong."""
    if not isinstance(row, dict):
        raise RowError(f"each line must be a JSON object, got {type(row).__name__}")
    keys = set(row) - _IGNORED_KEYS
    if "messages" in keys:
        fmt = DatasetFormat.CHAT
    elif "prompt" in keys or "completion" in keys:
        fmt = DatasetFormat.COMPLETION
    elif "instruction" in keys or "output" in keys:
        fmt = DatasetFormat.ALPACA
    elif "text" in keys:
        fmt = DatasetFormat.TEXT
    else:
        raise RowError(
            "unrecognised row: expected 'messages', 'prompt'/'completion', "
            "'instruction'/'input'/'output' or 'text'"
        )
    unknown = keys - _ALLOWED_KEYS[fmt]
    if unknown:
        raise RowError(f"unexpected field(s) for {fmt.value} rows: {', '.join(sorted(unknown))}")
    if fmt is DatasetFormat.CHAT:
        _check_messages(row["messages"])
    elif fmt is DatasetFormat.COMPLETION:
        _require_str(row, "prompt", allow_empty=True)
        _require_str(row, "completion")
    elif fmt is DatasetFormat.ALPACA:
        _require_str(row, "instruction")
        if "input" in row:
            _require_str(row, "input", allow_empty=True)
        _require_str(row, "output")
    else:
        _require_str(row, "text")
    return fmt


def row_char_count(row: dict[str, Any], fmt: DatasetFormat) -> int:
    """Characters of user-visible text in a valid row (for file statistics)."""
    if fmt is DatasetFormat.CHAT:
        return sum(len(m["content"]) for m in row["messages"])
    return sum(len(v) for k, v in row.items() if k in _ALLOWED_KEYS[fmt] and isinstance(v, str))
