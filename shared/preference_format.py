"""The preference row format (DPO), as OpenAI's fine-tuning API accepts it.

    {"input": {"messages": [...], "tools": [...]},
     "preferred_output": [{"role": "assistant", "content": "..."}],
     "non_preferred_output": [{"role": "assistant", "content": "..."}]}

`input.messages` is the conversation so far (system, user and assistant turns, ending with a
user turn); each output is exactly one assistant message answering it. Pure functions, no I/O:
`shared.dataset_format.detect_row_format` dispatches here, so the upload check and the engine
apply the same rules. Every error names the field it is about (`input.messages[1].role`).
"""

from __future__ import annotations

from typing import Any

from shared.dataset_format import RowError

INPUT = "input"
PREFERRED = "preferred_output"
NON_PREFERRED = "non_preferred_output"
OUTPUTS = (PREFERRED, NON_PREFERRED)
ROW_KEYS = frozenset({INPUT, PREFERRED, NON_PREFERRED})
INPUT_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
INPUT_ROLES = ("system", "user", "assistant")
MESSAGE_KEYS = frozenset({"role", "content", "name"})


def is_preference_row(row: dict[str, Any]) -> bool:
    """Whether a row claims to be a preference row (then it is checked as one): it has an
    output side, or an `input` object (Alpaca's `input` is a string)."""
    return any(key in row for key in OUTPUTS) or isinstance(row.get(INPUT), dict)


def _check_message(where: str, message: Any, roles: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(message, dict):
        raise RowError(f"{where} must be an object")
    role = message.get("role")
    if role not in roles:
        raise RowError(f"{where}.role must be {' or '.join(roles)}")
    if "content" not in message:
        raise RowError(f"{where}.content is missing")
    if not isinstance(message["content"], str):
        raise RowError(f"{where}.content must be a string")
    unknown = set(message) - MESSAGE_KEYS
    if unknown:
        raise RowError(f"{where} has unknown field(s): {', '.join(sorted(unknown))}")
    return message


def _check_input(value: Any) -> None:
    if not isinstance(value, dict):
        raise RowError("field 'input' must be an object with 'messages'")
    unknown = set(value) - INPUT_KEYS
    if unknown:
        raise RowError(f"input has unknown field(s): {', '.join(sorted(unknown))}")
    messages = value.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("input.messages must be a non-empty list")
    for i, message in enumerate(messages):
        _check_message(f"input.messages[{i}]", message, INPUT_ROLES)
    if messages[-1]["role"] != "user":
        raise RowError(
            f"input.messages[{len(messages) - 1}] must be a user message: the outputs answer it"
        )
    tools = value.get("tools")
    if tools is not None and (
        not isinstance(tools, list) or not all(isinstance(t, dict) for t in tools)
    ):
        raise RowError("input.tools must be a list of objects")
    parallel = value.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise RowError("input.parallel_tool_calls must be true or false")


def _check_output(row: dict[str, Any], key: str) -> str:
    if key not in row:
        raise RowError(f"missing field '{key}': a preference row needs both outputs")
    value = row[key]
    if not isinstance(value, list) or len(value) != 1:
        raise RowError(f"field '{key}' must be a list of exactly one assistant message")
    message = _check_message(f"{key}[0]", value[0], ("assistant",))
    content: str = message["content"]
    if not content.strip():
        raise RowError(f"{key}[0].content must not be empty")
    return content


def check_preference_row(row: dict[str, Any]) -> None:
    """Raise `RowError` naming the field unless `row` is a valid preference row."""
    unknown = set(row) - ROW_KEYS - {"id", "metadata"}
    if unknown:
        raise RowError(f"unexpected field(s) for preference rows: {', '.join(sorted(unknown))}")
    if INPUT not in row:
        raise RowError("missing field 'input': a preference row needs the conversation")
    _check_input(row[INPUT])
    preferred = _check_output(row, PREFERRED)
    non_preferred = _check_output(row, NON_PREFERRED)
    if preferred == non_preferred:
        raise RowError("preferred_output and non_preferred_output are the same answer")


def preference_char_count(row: dict[str, Any]) -> int:
    """Characters of text in a valid preference row: the conversation and both answers."""
    prompt = sum(len(m["content"]) for m in row[INPUT]["messages"])
    return prompt + sum(len(row[key][0]["content"]) for key in OUTPUTS)


def prompt_messages(row: dict[str, Any]) -> list[dict[str, Any]]:
    """The conversation of a valid preference row, as chat-template messages."""
    return [{"role": m["role"], "content": m["content"]} for m in row[INPUT]["messages"]]


def output_message(row: dict[str, Any], key: str) -> dict[str, Any]:
    """One side's answer of a valid preference row (`key` is one of `OUTPUTS`)."""
    message = row[key][0]
    return {"role": "assistant", "content": message["content"]}
