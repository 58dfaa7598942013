"""Chat rows as OpenAI accepts them: tools, tool calls, tool results, content parts, weights."""

from __future__ import annotations

import json
from typing import Any

import pytest

from shared.dataset_format import DatasetFormat, RowError, detect_row_format, row_char_count
from shared.files.validation import JsonlValidator

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
    },
}


def call(call_id: str = "call_1", arguments: str = '{"city": "Paris"}') -> dict[str, Any]:
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": "get_weather", "arguments": arguments},
    }


def tool_row(**changes: Any) -> dict[str, Any]:
    """A good function-calling row: ask, call, result, answer."""
    row: dict[str, Any] = {
        "messages": [
            {"role": "system", "content": "You check the weather."},
            {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call()]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp": 21}'},
            {"role": "assistant", "content": "It is 21 degrees.", "weight": 1},
        ],
        "tools": [WEATHER],
    }
    row.update(changes)
    return row


def with_message(index: int, message: dict[str, Any], **changes: Any) -> dict[str, Any]:
    row = tool_row(**changes)
    row["messages"][index] = message
    return row


GOOD_ROWS = [
    tool_row(),
    tool_row(parallel_tool_calls=False),
    # two calls answered in any order, then an answer; a weight-0 turn before
    {
        "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "bad answer", "weight": 0},
            {"role": "user", "content": "Paris and Rome?"},
            {"role": "assistant", "tool_calls": [call("a"), call("b", '{"city": "Rome"}')]},
            {"role": "tool", "tool_call_id": "b", "content": "19"},
            {"role": "tool", "tool_call_id": "a", "content": [{"type": "text", "text": "21"}]},
            {"role": "assistant", "content": "21 and 19."},
        ],
        "tools": [WEATHER],
    },
    # a row that ends on a tool call (teaches the call itself), no tools list
    {
        "messages": [
            {"role": "user", "content": "Paris?"},
            {"role": "assistant", "content": "Let me check.", "tool_calls": [call()]},
        ]
    },
]

BAD_ROWS: list[tuple[dict[str, Any], str]] = [
    (
        with_message(2, {"role": "assistant", "tool_calls": [call(arguments="{city: Paris")]}),
        "messages[2].tool_calls[0].function.arguments is not valid JSON",
    ),
    (
        with_message(2, {"role": "assistant", "tool_calls": [call(arguments='"Paris"')]}),
        "messages[2].tool_calls[0].function.arguments must be a JSON object",
    ),
    (
        with_message(2, {"role": "assistant", "tool_calls": [{**call(), "type": "code"}]}),
        "messages[2].tool_calls[0].type must be 'function'",
    ),
    (
        with_message(2, {"role": "assistant", "tool_calls": []}),
        "messages[2].tool_calls must be a non-empty list",
    ),
    (
        with_message(2, {"role": "user", "content": "no call here"}),
        "messages[3] is a tool result but no assistant tool call precedes it",
    ),
    (
        with_message(3, {"role": "tool", "tool_call_id": "call_9", "content": "x"}),
        "messages[3].tool_call_id 'call_9' matches no tool call of messages[2]",
    ),
    (
        with_message(4, {"role": "tool", "tool_call_id": "call_1", "content": "x"}),
        "messages[4].tool_call_id 'call_1' answers a tool call a second time",
    ),
    (
        with_message(3, {"role": "tool", "content": "x"}),
        "messages[3].tool_call_id must be a non-empty string",
    ),
    (tool_row(tools={"get_weather": {}}), "field 'tools' must be a list of function specs"),
    (tool_row(tools=["get_weather"]), "tools[0] must be an object"),
    (tool_row(tools=[{"type": "function"}]), "tools[0].function must be an object"),
    (
        tool_row(tools=[{"type": "function", "function": {"name": "get weather"}}]),
        "tools[0].function.name must be 1-64 letters, digits, '_' or '-'",
    ),
    (tool_row(tools=[WEATHER, WEATHER]), "tools[1].function.name 'get_weather' is declared twice"),
    (
        with_message(
            2,
            {"role": "assistant", "tool_calls": [call("a"), call("b")]},
            parallel_tool_calls=False,
        ),
        "messages[2] has 2 tool calls but parallel_tool_calls is false",
    ),
    (tool_row(parallel_tool_calls="no"), "field 'parallel_tool_calls' must be a boolean"),
    (
        with_message(
            1, {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}
        ),
        "messages[1].content[0]: image content parts are not supported (the service "
        "fine-tunes text-only models); use text parts",
    ),
    (
        with_message(1, {"role": "user", "content": [{"type": "text"}]}),
        "messages[1].content[0].text must be a string",
    ),
    (
        with_message(4, {"role": "assistant", "content": "x", "weight": 0.5}),
        "messages[4].weight must be 0 or 1",
    ),
    (
        with_message(4, {"role": "assistant", "content": "x", "weight": 2}),
        "messages[4].weight must be 0 or 1",
    ),
    (
        with_message(4, {"role": "assistant", "content": "x", "weight": True}),
        "messages[4].weight must be 0 or 1",
    ),
    (
        with_message(1, {"role": "user", "content": "x", "weight": 1}),
        "messages[1].weight is only allowed on assistant messages",
    ),
    (
        {
            "messages": [
                {"role": "user", "content": "x"},
                {"role": "assistant", "content": "y", "weight": 0},
            ]
        },
        "every assistant message has weight 0, so the row trains nothing",
    ),
    (
        with_message(4, {"role": "assistant", "content": None}),
        "messages[4].content must be a string or a list of text parts",
    ),
    (
        tool_row(functions=[]),
        "the legacy 'functions' field is not supported; describe them in 'tools'",
    ),
    (
        with_message(3, {"role": "function", "name": "get_weather", "content": "x"}),
        "messages[3].role 'function' (legacy) is not supported; use role 'tool'",
    ),
]


@pytest.mark.parametrize("row", GOOD_ROWS)
def test_function_calling_rows_are_chat(row: dict[str, Any]) -> None:
    assert detect_row_format(row) is DatasetFormat.CHAT


@pytest.mark.parametrize(("row", "reason"), BAD_ROWS, ids=[r for _, r in BAD_ROWS])
def test_broken_rows_name_the_field(row: dict[str, Any], reason: str) -> None:
    with pytest.raises(RowError) as info:
        detect_row_format(row)
    assert info.value.reason == reason


def test_char_count_covers_parts_and_tool_calls() -> None:
    row = tool_row()
    expected = (
        len("You check the weather.")
        + len("Weather in Paris?")
        + len("get_weather")
        + len('{"city": "Paris"}')
        + len('{"temp": 21}')
        + len("It is 21 degrees.")
    )
    assert row_char_count(row, DatasetFormat.CHAT) == expected


def test_validator_reports_every_broken_line() -> None:
    """The upload check: good and broken tool-calling rows in one file, one error per bad line."""
    rows = [*GOOD_ROWS, *(row for row, _ in BAD_ROWS[:10])]
    v = JsonlValidator(max_line_bytes=10_000)
    v.feed("".join(json.dumps(r) + "\n" for r in rows).encode())
    v.finish()
    assert [(e.line, e.reason) for e in v.errors] == [
        (len(GOOD_ROWS) + 1 + i, reason) for i, (_, reason) in enumerate(BAD_ROWS[:10])
    ]
    assert v.rows == len(GOOD_ROWS) and v.format is DatasetFormat.CHAT
