"""Chat rows as OpenAI's fine-tuning API accepts them: messages, tools, tool calls, weights.

Pure functions, no I/O, shared by the upload validator (`shared.dataset_format`) and the
engine (`worker.training.chat`), so a chat row that uploads is a chat row the engine reads the
same way. What is accepted, per line:

* row keys `messages` (required), `tools` (a list of function specs), `parallel_tool_calls`
  (a boolean; `false` allows at most one tool call per assistant message);
* roles `system`, `user`, `assistant`, `tool`;
* `content` a string or a list of text parts (`{"type": "text", "text": ...}`); image, audio
  and file parts are refused (the service tunes text-only models); an assistant message may
  omit `content` (or set it to null) when it has `tool_calls`;
* assistant `tool_calls`: `[{id, type: "function", function: {name, arguments}}]` where
  `arguments` is a string holding a JSON object;
* a `tool` message answers one call (`tool_call_id`) of the assistant message whose calls it
  follows (only other tool results in between);
* assistant `weight`: 0 (context only, not trained) or 1; at least one assistant message
  must be trained.

Every refusal is a `RowError` whose reason names the field (`messages[3].tool_calls[0]...`).
"""

from __future__ import annotations

import json
import re
from typing import Any

from shared.row_errors import RowError

CHAT_ROLES = frozenset({"system", "user", "assistant", "tool"})
CHAT_ROW_KEYS = frozenset({"messages", "tools", "parallel_tool_calls"})
_MESSAGE_KEYS: dict[str, frozenset[str]] = {
    "system": frozenset({"role", "content", "name"}),
    "user": frozenset({"role", "content", "name"}),
    "assistant": frozenset({"role", "content", "name", "weight", "tool_calls"}),
    "tool": frozenset({"role", "content", "tool_call_id"}),
}
# OpenAI's rule for function names.
_FUNCTION_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
_UNSUPPORTED_PARTS = {
    "image_url": "image",
    "input_image": "image",
    "image": "image",
    "input_audio": "audio",
    "audio": "audio",
    "file": "file",
    "input_file": "file",
}
_LEGACY_ROW_KEYS = {
    "functions": "the legacy 'functions' field is not supported; describe them in 'tools'",
    "function_call": "the legacy 'function_call' field is not supported",
}


def _unknown(where: str, found: Any, allowed: frozenset[str]) -> None:
    unknown = set(found) - allowed
    if unknown:
        raise RowError(f"{where} has unknown field(s): {', '.join(sorted(unknown))}")


def content_text(content: Any) -> str:
    """The text of a valid `content`: the string, or its text parts joined by newlines (as
    vLLM joins them for text-only templates); '' when absent."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part["text"] for part in content)


def _check_content(where: str, content: Any, *, optional: bool) -> None:
    if content is None:
        if optional:
            return
        raise RowError(f"{where} must be a string or a list of text parts")
    if isinstance(content, str):
        return
    if not isinstance(content, list) or not content:
        raise RowError(f"{where} must be a string or a non-empty list of text parts")
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RowError(f"{at} must be an object")
        kind = part.get("type")
        if kind in _UNSUPPORTED_PARTS:
            raise RowError(
                f"{at}: {_UNSUPPORTED_PARTS[kind]} content parts are not supported "
                "(the service fine-tunes text-only models); use text parts"
            )
        if kind != "text":
            raise RowError(f"{at}.type must be 'text'")
        _unknown(at, part, frozenset({"type", "text"}))
        if not isinstance(part.get("text"), str):
            raise RowError(f"{at}.text must be a string")


def _check_tools(tools: Any) -> None:
    if not isinstance(tools, list):
        raise RowError("field 'tools' must be a list of function specs")
    names: set[str] = set()
    for k, tool in enumerate(tools):
        at = f"tools[{k}]"
        if not isinstance(tool, dict):
            raise RowError(f"{at} must be an object")
        if tool.get("type") != "function":
            raise RowError(f"{at}.type must be 'function'")
        _unknown(at, tool, frozenset({"type", "function"}))
        function = tool.get("function")
        if not isinstance(function, dict):
            raise RowError(f"{at}.function must be an object")
        _unknown(
            f"{at}.function", function, frozenset({"name", "description", "parameters", "strict"})
        )
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise RowError(f"{at}.function.name must be 1-64 letters, digits, '_' or '-'")
        if name in names:
            raise RowError(f"{at}.function.name '{name}' is declared twice")
        names.add(name)
        if "description" in function and not isinstance(function["description"], str):
            raise RowError(f"{at}.function.description must be a string")
        if "parameters" in function and not isinstance(function["parameters"], dict):
            raise RowError(f"{at}.function.parameters must be a JSON schema object")
        if "strict" in function and not isinstance(function["strict"], bool | None):
            raise RowError(f"{at}.function.strict must be a boolean")


def _check_tool_calls(where: str, calls: Any, seen_ids: set[str]) -> list[str]:
    if not isinstance(calls, list) or not calls:
        raise RowError(f"{where} must be a non-empty list")
    ids: list[str] = []
    for k, call in enumerate(calls):
        at = f"{where}[{k}]"
        if not isinstance(call, dict):
            raise RowError(f"{at} must be an object")
        _unknown(at, call, frozenset({"id", "type", "function"}))
        call_id = call.get("id")
        if not isinstance(call_id, str) or not call_id:
            raise RowError(f"{at}.id must be a non-empty string")
        if call_id in seen_ids:
            raise RowError(f"{at}.id '{call_id[:64]}' is used twice in this row")
        seen_ids.add(call_id)
        ids.append(call_id)
        if call.get("type") != "function":
            raise RowError(f"{at}.type must be 'function'")
        function = call.get("function")
        if not isinstance(function, dict):
            raise RowError(f"{at}.function must be an object")
        _unknown(f"{at}.function", function, frozenset({"name", "arguments"}))
        name = function.get("name")
        if not isinstance(name, str) or not _FUNCTION_NAME.match(name):
            raise RowError(f"{at}.function.name must be 1-64 letters, digits, '_' or '-'")
        arguments = function.get("arguments")
        if not isinstance(arguments, str):
            raise RowError(f"{at}.function.arguments must be a string holding a JSON object")
        try:
            decoded = json.loads(arguments)
        except (ValueError, RecursionError):
            raise RowError(f"{at}.function.arguments is not valid JSON") from None
        if not isinstance(decoded, dict):
            raise RowError(f"{at}.function.arguments must be a JSON object")
    return ids


def _check_weight(where: str, message: dict[str, Any]) -> bool:
    """True when the message is trained."""
    if "weight" not in message:
        return True
    weight = message["weight"]
    if isinstance(weight, bool) or not isinstance(weight, int | float) or weight not in (0, 1):
        raise RowError(f"{where}.weight must be 0 or 1")
    return weight == 1


def check_chat_row(row: dict[str, Any]) -> None:
    """Raise `RowError` unless `row` (a chat row's object) is one OpenAI's format allows."""
    for key, reason in _LEGACY_ROW_KEYS.items():
        if key in row:
            raise RowError(reason)
    if "tools" in row:
        _check_tools(row["tools"])
    parallel = row.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise RowError("field 'parallel_tool_calls' must be a boolean")
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RowError("field 'messages' must be a non-empty list")
    has_assistant = trained = False
    seen_ids: set[str] = set()
    calls_of: int | None = None  # the assistant message whose calls tool results answer
    open_calls: set[str] = set()  # its calls not answered yet
    for i, message in enumerate(messages):
        at = f"messages[{i}]"
        if not isinstance(message, dict):
            raise RowError(f"{at} must be an object")
        role = message.get("role")
        if role == "function":
            raise RowError(f"{at}.role 'function' (legacy) is not supported; use role 'tool'")
        if role not in CHAT_ROLES:
            raise RowError(f"{at}.role must be one of system, user, assistant, tool")
        if "function_call" in message:
            raise RowError(f"{at}.function_call (legacy) is not supported; use tool_calls")
        if "weight" in message and role != "assistant":
            raise RowError(f"{at}.weight is only allowed on assistant messages")
        _unknown(at, message, _MESSAGE_KEYS[role])
        if "name" in message and not isinstance(message["name"], str):
            raise RowError(f"{at}.name must be a string")
        if role == "tool":
            _check_tool_result(at, message, calls_of, open_calls, seen_ids)
            continue
        calls_of, open_calls = None, set()
        if role != "assistant":
            _check_content(f"{at}.content", message.get("content"), optional=False)
            continue
        has_assistant = True
        trained = _check_weight(at, message) or trained
        calls = message.get("tool_calls")
        _check_content(f"{at}.content", message.get("content"), optional=calls is not None)
        if calls is not None:
            ids = _check_tool_calls(f"{at}.tool_calls", calls, seen_ids)
            if not parallel and len(ids) > 1:
                raise RowError(f"{at} has {len(ids)} tool calls but parallel_tool_calls is false")
            calls_of, open_calls = i, set(ids)
    if not has_assistant:
        raise RowError("a chat must contain at least one assistant message")
    if not trained:
        raise RowError("every assistant message has weight 0, so the row trains nothing")


def _check_tool_result(
    at: str, message: dict[str, Any], calls_of: int | None, open_calls: set[str], ids: set[str]
) -> None:
    """A tool message answers one still open call of the assistant message it follows."""
    _check_content(f"{at}.content", message.get("content"), optional=False)
    call_id = message.get("tool_call_id")
    if not isinstance(call_id, str) or not call_id:
        raise RowError(f"{at}.tool_call_id must be a non-empty string")
    if calls_of is None:
        raise RowError(f"{at} is a tool result but no assistant tool call precedes it")
    if call_id not in open_calls:
        shown = call_id[:64]
        if call_id in ids:
            raise RowError(f"{at}.tool_call_id '{shown}' answers a tool call a second time")
        raise RowError(f"{at}.tool_call_id '{shown}' matches no tool call of messages[{calls_of}]")
    open_calls.discard(call_id)


def chat_char_count(row: dict[str, Any]) -> int:
    """Characters of a valid chat row's text: contents and tool calls' names and arguments."""
    total = 0
    for message in row["messages"]:
        total += len(content_text(message.get("content")))
        for call in message.get("tool_calls") or []:
            total += len(call["function"]["name"]) + len(call["function"]["arguments"])
    return total
