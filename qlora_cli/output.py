"""What `qlora` prints: rich tables for people, raw JSON for scripts (`--json`), and one line
per error. Text that came from the service is cleaned of control characters before it reaches
the terminal, and the API key is never printed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from qlora_cli.client import ApiError, Unreachable

PIPE_WIDTH = 240
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

# What each status means to the person at the terminal, and what they can do about it.
STATUS_LABELS: dict[int, tuple[str, str]] = {
    400: ("invalid request", ""),
    401: ("not authenticated", "check the API key (QLORA_API_KEY or --api-key)"),
    403: ("not allowed", "this key may not do that"),
    404: ("not found", "no such object for this API key's organization"),
    409: ("conflict", "the object's current state does not allow this"),
    413: ("too large", "over one of the service's size limits (docs/limits.md)"),
    429: ("rate limited", "too many requests or open streams for this organization"),
}


def status_label(status: int) -> tuple[str, str]:
    if status in STATUS_LABELS:
        return STATUS_LABELS[status]
    if status >= 500:
        return "service error", "the service could not do it now; retry later"
    return f"HTTP {status}", ""


def timestamp(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    return datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def size(value: Any) -> str:
    if not isinstance(value, int | float):
        return "-"
    amount = float(value)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if amount < 1024 or unit == "GiB":
            return f"{amount:.0f} {unit}" if unit == "B" else f"{amount:.1f} {unit}"
        amount /= 1024
    return f"{amount:.1f} GiB"  # pragma: no cover


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def _width(stream: Any) -> int | None:
    """A terminal's own width; into a pipe or file, COLUMNS or a width no table is cut at
    (rich would otherwise assume 80 and fold ids)."""
    with contextlib.suppress(AttributeError, ValueError):  # no isatty, or a closed stream
        if stream.isatty():
            return None
    columns = os.environ.get("COLUMNS", "")
    return int(columns) if columns.isdigit() and int(columns) > 0 else PIPE_WIDTH


class Output:
    """One per command. `secret` (the API key) is blanked out of anything printed."""

    def __init__(self, *, json_mode: bool = False, secret: str | None = None) -> None:
        self.json_mode = json_mode
        self.secret = secret or None
        self.out = Console(highlight=False, width=_width(sys.stdout))
        self.err = Console(stderr=True, highlight=False, width=_width(sys.stderr))

    # ------------------------------------------------------------------ text

    def clean(self, value: Any) -> str:
        """Service text made safe to print: no control characters, no rich markup, no key."""
        text = "" if value is None else str(value)
        if self.secret:
            text = text.replace(self.secret, "[redacted]")
        return escape(_CONTROL.sub("?", text))

    def print(self, markup: str = "") -> None:
        """`markup` is ours; put service text through `clean` first."""
        self.out.print(markup)

    def note(self, markup: str) -> None:
        """A remark for the person (stderr, so that stdout stays the command's answer)."""
        self.err.print(markup)

    def emit_json(self, value: Any) -> None:
        text = json.dumps(value, indent=2, ensure_ascii=False)
        if self.secret:
            text = text.replace(self.secret, "[redacted]")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def emit_json_line(self, value: Any) -> None:
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"))
        if self.secret:
            text = text.replace(self.secret, "[redacted]")
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def table(
        self, title: str | None, columns: Sequence[str], rows: Iterable[Sequence[Any]]
    ) -> None:
        table = Table(title=title, title_justify="left", header_style="bold")
        for i, name in enumerate(columns):
            # The first column is the id: never broken, so that it can be copied or grepped.
            table.add_column(name, overflow="fold", no_wrap=i == 0)
        for row in rows:
            table.add_row(*(self.clean(cell) for cell in row))
        self.out.print(table)

    def fields(self, pairs: Iterable[tuple[str, Any]]) -> None:
        """`name  value` lines, names aligned."""
        items = [(name, value) for name, value in pairs if value not in (None, "", [], {})]
        width = max((len(name) for name, _ in items), default=0)
        for name, value in items:
            shown = json.dumps(value) if isinstance(value, dict | list) else value
            self.out.print(f"[bold]{name.ljust(width)}[/]  {self.clean(shown)}")

    # ---------------------------------------------------------------- errors

    def api_error(self, error: ApiError) -> None:
        """One line: what kind of failure, the API's code and message, and a hint; then, for an
        upload the API refused, the offending lines one per line."""
        if self.json_mode:
            self.emit_json(error.body())
        label, hint = status_label(error.status)
        code = f" {error.code}" if error.code else ""
        where = f", param {error.param}" if error.param else ""
        line = f"[bold red]error:[/] {label} ({error.status}{self.clean(code)}{self.clean(where)})"
        line += f": {self.clean(error.message)}"
        if error.status == 429 and error.retry_after:
            hint = f"{hint}; retry after {self.clean(error.retry_after)} s"
        if hint:
            line += f" [dim]- {hint}[/]"
        self.err.print(line, soft_wrap=True)
        lines = error.detail.get("lines")
        if isinstance(lines, list) and lines:
            for item in lines:
                if not isinstance(item, dict):
                    continue
                number, reason = item.get("line"), self.clean(item.get("reason"))
                where_text = f"line {number}" if number else "file"
                self.err.print(f"  [yellow]{where_text}[/]: {reason}", soft_wrap=True)
            shown = len(lines)
            total = _problem_count(error.message)
            if total is not None and total > shown:
                self.err.print(f"  [dim]... and {total - shown} more[/]")

    def unreachable(self, error: Unreachable) -> None:
        if self.json_mode:
            self.emit_json({"error": {"code": "unreachable", "message": str(error)}})
        self.err.print(
            f"[bold red]error:[/] {self.clean(error)} "
            "[dim]- is the service running? Set QLORA_API_URL or --api-url[/]",
            soft_wrap=True,
        )

    def failure(self, message: str) -> None:
        """A problem on this side (a file that cannot be read, a folder in the way)."""
        if self.json_mode:
            self.emit_json({"error": {"code": "client_error", "message": message}})
        self.err.print(f"[bold red]error:[/] {self.clean(message)}", soft_wrap=True)


_COUNT = re.compile(r"\((\d+) problem")


def _problem_count(message: str) -> int | None:
    match = _COUNT.search(message)
    return int(match.group(1)) if match else None
