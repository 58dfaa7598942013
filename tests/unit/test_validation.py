from __future__ import annotations

import json

import pytest

from shared.dataset_format import DatasetFormat, RowError, detect_row_format
from shared.files.validation import JsonlValidator


def run(data: bytes, chunk: int, max_line: int = 1000) -> JsonlValidator:
    v = JsonlValidator(max_line_bytes=max_line)
    for i in range(0, len(data), chunk):
        v.feed(data[i : i + chunk])
    v.finish()
    return v


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 10_000])
def test_results_do_not_depend_on_chunk_boundaries(chunk: int) -> None:
    rows = [{"prompt": "é" * i, "completion": "x" * (i + 1)} for i in range(20)]
    data = "\n".join(json.dumps(r, ensure_ascii=False) for r in rows).encode()  # no final newline
    v = run(data, chunk)
    assert v.ok and v.rows == 20 and v.format is DatasetFormat.COMPLETION
    assert v.stats()["chars"] == sum(2 * i + 1 for i in range(20))
    assert v.stats()["min_row_chars"] == 1 and v.stats()["max_row_chars"] == 39


def test_long_line_is_reported_once_and_following_lines_still_checked() -> None:
    data = b'{"text": "' + b"a" * 100 + b'"}\n{"text": "ok"}\n[]\n'
    v = run(data, 16, max_line=50)
    assert [(e.line, e.reason) for e in v.errors] == [
        (1, "line longer than 50 bytes"),
        (3, "each line must be a JSON object, got list"),
    ]


def test_crlf_and_blank_lines_are_accepted() -> None:
    v = run(b'{"text": "a"}\r\n\r\n{"text": "b"}\r\n', 5)
    assert v.ok and v.rows == 2


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"prompt": "a"}, "missing field 'completion'"),
        ({"prompt": "a", "completion": 3}, "field 'completion' must be a string"),
        ({"instruction": "a", "output": ""}, "field 'output' must not be empty"),
        ({"messages": []}, "field 'messages' must be a non-empty list"),
        (
            {"messages": [{"role": "assistant", "content": 1}]},
            "messages[0].content must be a string or a non-empty list of text parts",
        ),
        (
            {"messages": [{"role": "assistant", "content": "x", "tool": 1}]},
            "messages[0] has unknown field(s): tool",
        ),
        ({"text": "a", "extra": 1}, "unexpected field(s) for text rows: extra"),
        ("a string", "each line must be a JSON object, got str"),
    ],
)
def test_row_errors_name_the_field(row: object, reason: str) -> None:
    with pytest.raises(RowError) as info:
        detect_row_format(row)
    assert info.value.reason == reason


def test_deeply_nested_json_is_an_error_not_a_crash() -> None:
    v = run(b"[" * 100_000 + b"]" * 100_000 + b"\n", 65536, max_line=1_000_000)
    assert not v.ok and v.errors[0].line == 1
