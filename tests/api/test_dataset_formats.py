"""Upload corpus for OpenAI's chat extensions: function calling, content parts, weights.

Through the API on both stacks: a file of good function-calling rows is accepted as `chat`;
a file of broken rows is refused with one entry per bad line naming the field.
"""

from __future__ import annotations

import json

from tests.api.test_files import stored_objects, upload
from tests.conftest import Stack
from tests.unit.test_chat_format import BAD_ROWS, GOOD_ROWS, tool_row


def test_function_calling_rows_upload_as_chat(stack: Stack) -> None:
    _, headers, _ = stack.new_tenant()
    body = b"".join(json.dumps(r).encode() + b"\n" for r in GOOD_ROWS)
    resp = upload(stack, headers, body)
    assert resp.status_code == 200, resp.text
    obj = resp.json()
    assert obj["format"] == "chat" and obj["rows"] == len(GOOD_ROWS)
    assert obj["stats"]["messages"] == sum(len(r["messages"]) for r in GOOD_ROWS)


def test_broken_tool_rows_and_weights_are_refused_line_by_line(stack: Stack) -> None:
    """Line 1 is good; every other line is broken in one way, reported with its reason."""
    tenant, headers, _ = stack.new_tenant()
    cases = BAD_ROWS[:19]  # the API reports at most 20 lines
    body = b"".join(json.dumps(r).encode() + b"\n" for r in [tool_row(), *(r for r, _ in cases)])
    resp = upload(stack, headers, body)
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert error["code"] == "invalid_file" and error["param"] == "file"
    assert [(e["line"], e["reason"]) for e in error["lines"]] == [
        (i + 2, reason) for i, (_, reason) in enumerate(cases)
    ]
    assert stored_objects(stack, tenant) == []
