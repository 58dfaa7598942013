"""Row formats of fine-tuning JSONL files, shared by the upload validator and the engine.

Pure functions, no I/O: the API validates each uploaded line with `detect_row_format`, the
training engine reads rows with the same rules, so a file that uploads is a file that trains.
"""

from __future__ import annotations

import enum
import json
import math
from typing import Any, NoReturn

from shared.chat_format import CHAT_ROLES, CHAT_ROW_KEYS, chat_char_count, check_chat_row
from shared.row_errors import RowError

__all__ = [
    "CHAT_ROLES",
    "DatasetFormat",
    "RowError",
    "detect_row_format",
    "parse_row",
    "row_char_count",
]


class DatasetFormat(enum.StrEnum):
    """The four row shapes the service accepts. A file holds exactly one of them."""

    CHAT = "chat"  # {"messages": [...], "tools"?: [...]}: see shared.chat_format
    COMPLETION = "prompt_completion"  # {"prompt": ..., "completion": ...}
    ALPACA = "alpaca"  # {"instruction": ..., "input": ..., "output": ...}
    TEXT = "text"  # {"text": ...}
    PREFERENCE = "preference"  # {"input": ..., "preferred_output": ..., ...} (DPO)


_ALLOWED_KEYS: dict[DatasetFormat, frozenset[str]] = {
    DatasetFormat.CHAT: CHAT_ROW_KEYS,
    DatasetFormat.COMPLETION: frozenset({"prompt", "completion"}),
    DatasetFormat.ALPACA: frozenset({"instruction", "input", "output"}),
    DatasetFormat.TEXT: frozenset({"text"}),
}
# Keys that tools commonly add to a row and that do not change its meaning.
_IGNORED_KEYS = frozenset({"id", "metadata", "weight"})


def _refuse_constant(name: str) -> NoReturn:
    raise RowError(f"not valid JSON: {name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RowError(f"not valid JSON: the number {text[:20]} is out of range")
    return value


def parse_row(text: str) -> Any:
    """Decode one JSONL line as strict JSON, or raise `RowError` saying why not.

    Stricter than `json.loads`: NaN and Infinity, numbers that overflow a float, integers past
    Python's digit limit, nesting past the recursion limit and a leading byte order mark are
    all refused with a reason, never an exception of another type.
    """
    if text.startswith("\ufeff"):
        raise RowError("the line starts with a byte order mark; save the file as UTF-8 without BOM")
    try:
        return json.loads(text, parse_constant=_refuse_constant, parse_float=_finite_float)
    except RowError:
        raise
    except json.JSONDecodeError as exc:
        raise RowError(f"not valid JSON: {exc.msg}") from None
    except RecursionError:
        raise RowError("not valid JSON: nested too deeply") from None
    except ValueError:  # int(): "Exceeds the limit (4300 digits) for integer string conversion"
        raise RowError("not valid JSON: a number has too many digits") from None


def _require_str(row: dict[str, Any], key: str, *, allow_empty: bool = False) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}'")
    value = row[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string")
    if not allow_empty and not value.strip():
        raise RowError(f"field '{key}' must not be empty")
    return value


def detect_row_format(row: Any) -> DatasetFormat:
    """Return the format of one decoded JSONL row, or raise `RowError` saying what is wrong."""
    if not isinstance(row, dict):
        raise RowError(f"each line must be a JSON object, got {type(row).__name__}")
    from shared import preference_format  # imports RowError from here

    if preference_format.is_preference_row(row):
        preference_format.check_preference_row(row)
        return DatasetFormat.PREFERENCE
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
            "'instruction'/'input'/'output', 'text', or 'input'/'preferred_output'/"
            "'non_preferred_output' (preference rows)"
        )
    if fmt is DatasetFormat.CHAT:
        check_chat_row(row)  # first: it explains OpenAI's legacy fields
    unknown = keys - _ALLOWED_KEYS[fmt]
    if unknown:
        raise RowError(f"unexpected field(s) for {fmt.value} rows: {', '.join(sorted(unknown))}")
    if fmt is DatasetFormat.COMPLETION:
        _require_str(row, "prompt", allow_empty=True)
        _require_str(row, "completion")
    elif fmt is DatasetFormat.ALPACA:
        _require_str(row, "instruction")
        if "input" in row:
            _require_str(row, "input", allow_empty=True)
        _require_str(row, "output")
    elif fmt is DatasetFormat.TEXT:
        _require_str(row, "text")
    return fmt


def row_char_count(row: dict[str, Any], fmt: DatasetFormat) -> int:
    """Characters of user-visible text in a valid row (for file statistics)."""
    if fmt is DatasetFormat.PREFERENCE:
        from shared.preference_format import preference_char_count

        return preference_char_count(row)
    if fmt is DatasetFormat.CHAT:
        return chat_char_count(row)
    return sum(len(v) for k, v in row.items() if k in _ALLOWED_KEYS[fmt] and isinstance(v, str))
