"""Streaming JSONL validation: feed bytes as they arrive, learn format, rows and statistics.

Nothing is buffered beyond one line (capped at `max_line_bytes`), so a file of any size is
validated in constant memory while it streams to the object store.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

from shared.dataset_format import (
    DatasetFormat,
    RowError,
    detect_row_format,
    parse_row,
    row_char_count,
)

MAX_REPORTED_ERRORS = 20


@dataclass
class LineError:
    line: int
    reason: str


@dataclass
class JsonlValidator:
    max_line_bytes: int
    bytes_seen: int = 0
    rows: int = 0
    format: DatasetFormat | None = None
    errors: list[LineError] = field(default_factory=list)
    error_count: int = 0
    _line_no: int = 0
    _buffer: bytearray = field(default_factory=bytearray)
    _skipping_long_line: bool = False
    _format_line: int = 0
    _chars: list[int] = field(default_factory=lambda: [0, 0, 0])  # total, min, max
    _messages: int = 0
    _sha: Any = field(default_factory=hashlib.sha256)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def _error(self, line: int, reason: str) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(LineError(line, reason))

    def feed(self, data: bytes) -> None:
        self.bytes_seen += len(data)
        self._sha.update(data)
        start = 0
        while True:
            nl = data.find(b"\n", start)
            if nl < 0:
                self._append(data[start:])
                return
            self._append(data[start:nl])
            self._end_line()
            start = nl + 1

    def _append(self, piece: bytes) -> None:
        if self._skipping_long_line or not piece:
            return
        if len(self._buffer) + len(piece) > self.max_line_bytes:
            self._error(self._line_no + 1, f"line longer than {self.max_line_bytes} bytes")
            self._skipping_long_line = True
            self._buffer.clear()
            return
        self._buffer += piece

    def _end_line(self) -> None:
        self._line_no += 1
        if self._skipping_long_line:
            self._skipping_long_line = False
            return
        raw = bytes(self._buffer)
        self._buffer.clear()
        self._check_line(self._line_no, raw)

    def _check_line(self, line_no: int, raw: bytes) -> None:
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if b"\x00" in raw:
            self._error(line_no, "binary content (NUL byte)")
            return
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            self._error(line_no, f"not valid UTF-8 at byte {exc.start}")
            return
        if not text.strip():
            return  # blank lines are allowed and ignored
        try:
            row = parse_row(text)
        except RowError as exc:
            self._error(line_no, exc.reason)
            return
        try:
            fmt = detect_row_format(row)
        except RowError as exc:
            self._error(line_no, exc.reason)
            return
        if self.format is None:
            self.format, self._format_line = fmt, line_no
        elif fmt is not self.format:
            self._error(
                line_no,
                f"mixed formats: this row is {fmt.value} but line {self._format_line} "
                f"is {self.format.value}",
            )
            return
        self.rows += 1
        chars = row_char_count(row, fmt)
        total, low, high = self._chars
        self._chars = [
            total + chars,
            chars if self.rows == 1 else min(low, chars),
            max(high, chars),
        ]
        if fmt is DatasetFormat.CHAT:
            self._messages += len(row["messages"])

    def finish(self) -> None:
        if self._buffer or self._skipping_long_line:
            self._end_line()
        if self.bytes_seen == 0:
            self._error(0, "the file is empty")
        elif self.rows == 0 and self.error_count == 0:
            self._error(0, "the file holds no rows")

    @property
    def sha256(self) -> str:
        digest: str = self._sha.hexdigest()
        return digest

    def stats(self) -> dict[str, Any]:
        total, low, high = self._chars
        stats: dict[str, Any] = {
            "chars": total,
            "min_row_chars": low,
            "max_row_chars": high,
            "mean_row_chars": round(total / self.rows, 1) if self.rows else 0.0,
        }
        if self.format is DatasetFormat.CHAT:
            stats["messages"] = self._messages
        return stats
