"""`qlora jobs watch`: a live progress bar (step/total, loss, tokens/s, ETA) fed by the job's
event stream, event messages printed above it, and an exit code that is the job's outcome."""

from __future__ import annotations

import math
from typing import Any

from rich.progress import BarColumn, Progress, TaskID, TextColumn

from qlora_cli.client import Client
from qlora_cli.events import EventFollower, SseMessage
from qlora_cli.exit_codes import ExitCode, for_job_status
from qlora_cli.output import Output, duration, timestamp

STATUS_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "cancelled": "yellow",
    "paused": "yellow",
    "running": "cyan",
}


def _number(value: Any) -> float | None:
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


class WatchState:
    """What the bar shows, updated from the job object and from events."""

    def __init__(self, job: dict[str, Any]) -> None:
        progress = job.get("progress") or {}
        self.status: str = str(job.get("status") or "?")
        self.step: int = int(progress.get("step") or 0)
        self.total: int | None = progress.get("total_steps") or None
        self.loss = _number(progress.get("loss"))
        self.eval_loss = _number(progress.get("eval_loss"))
        self.tokens_per_second = _number(progress.get("tokens_per_second"))
        self.eta_seconds = _number(progress.get("eta_seconds"))

    def apply(self, event: dict[str, Any]) -> None:
        data = event.get("data") or {}
        if not isinstance(data, dict):
            return
        if "status" in data and "from" in data:
            self.status = str(data["status"])
            if self.status != "running":
                self.eta_seconds = None
        if event.get("type") != "metrics":
            return
        if isinstance(data.get("step"), int) and "loss" in data:
            self.step = data["step"]
            self.total = data.get("total_steps") or self.total
            self.loss = _number(data.get("loss"))
            self.tokens_per_second = _number(data.get("tokens_per_second"))
            self.eta_seconds = _number(data.get("eta_seconds"))
        if "eval_loss" in data:
            self.eval_loss = _number(data.get("eval_loss"))

    def fields(self) -> dict[str, Any]:
        style = STATUS_STYLE.get(self.status, "white")
        loss = f"{self.loss:.4f}" if self.loss is not None else "-"
        if self.eval_loss is not None:
            loss += f" (eval {self.eval_loss:.4f})"
        tps = f"{self.tokens_per_second:,.0f}" if self.tokens_per_second is not None else "-"
        return {
            "status": f"[{style}]{self.status}[/]",
            "steps": f"step {self.step}/{self.total if self.total else '?'}",
            "loss": f"loss {loss}",
            "tps": f"{tps} tok/s",
            "eta": f"ETA {duration(self.eta_seconds)}",
        }


def make_progress(output: Output) -> Progress:
    return Progress(
        TextColumn("{task.description}"),
        TextColumn("{task.fields[status]}"),
        BarColumn(bar_width=30),
        TextColumn("{task.fields[steps]}"),
        TextColumn("{task.fields[loss]}"),
        TextColumn("{task.fields[tps]}"),
        TextColumn("{task.fields[eta]}"),
        console=output.err,
        refresh_per_second=8,
        transient=False,
    )


def _event_line(output: Output, event: dict[str, Any]) -> str | None:
    """The line printed above the bar for an event; None for per-step metrics (the bar
    shows those)."""
    data = event.get("data") or {}
    if event.get("type") == "metrics" and isinstance(data, dict) and "loss" in data:
        return None
    level = str(event.get("level") or "info")
    style = {"error": "red", "warn": "yellow", "warning": "yellow"}.get(level, "dim")
    when = timestamp(event.get("created_at"))
    return f"[{style}]{when}[/] {output.clean(event.get('message'))}"


def watch(client: Client, output: Output, job_id: str) -> ExitCode:
    """Follow `job_id` to its end; return the exit code of its final status."""
    job = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
    if output.json_mode:
        return _watch_json(client, output, job_id)
    state = WatchState(job)
    progress = make_progress(output)
    final: str | None = None
    with progress:
        task = progress.add_task(output.clean(job_id), total=state.total, **state.fields())

        def reconnecting(reason: str) -> None:
            progress.console.print(
                f"[yellow]connection lost ({output.clean(reason)}); reconnecting...[/]"
            )

        follower = EventFollower(client, job_id, on_reconnect=reconnecting)
        for message in follower:
            if message.event == "done":
                final = _done_status(message)
                if final is not None:
                    state.status = final
                _refresh(progress, task, state)
                break
            event = _event(message)
            if event is None:
                continue
            state.apply(event)
            line = _event_line(output, event)
            if line is not None:
                progress.console.print(line, soft_wrap=True)  # the terminal wraps, not rich
            _refresh(progress, task, state)
    job = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
    final = final or job.get("status")
    _summary(output, job, final)
    return for_job_status(final)


def _refresh(progress: Progress, task: TaskID, state: WatchState) -> None:
    progress.update(task, total=state.total, completed=state.step, **state.fields())


def _event(message: SseMessage) -> dict[str, Any] | None:
    try:
        event = message.json()
    except ValueError:
        return None
    return event if isinstance(event, dict) else None


def _done_status(message: SseMessage) -> str | None:
    try:
        status = message.json().get("status")
    except (ValueError, AttributeError):
        return None
    return str(status) if status is not None else None


def _summary(output: Output, job: dict[str, Any], status: str | None) -> None:
    clean = output.clean
    if status == "succeeded":
        output.print(
            f"[green]succeeded[/]: {clean(job.get('fine_tuned_model'))} "
            f"(adapter {clean(job.get('adapter_id'))}, "
            f"{clean(job.get('trained_tokens'))} trained tokens)"
        )
        output.print(
            f"download it with: qlora adapters download {clean(job.get('adapter_id'))} --out DIR"
        )
    elif status == "failed":
        error = job.get("error") or {}
        output.print(f"[red]failed[/]: {clean(error.get('code'))}: {clean(error.get('message'))}")
    else:
        output.print(f"[yellow]{clean(status)}[/]: job {clean(job.get('id'))}")


def _watch_json(client: Client, output: Output, job_id: str) -> ExitCode:
    """One JSON object per line: each event as the API sends it, then the final job."""
    final: str | None = None
    for message in EventFollower(client, job_id):
        if message.event == "done":
            final = _done_status(message)
            break
        event = _event(message)
        if event is not None:
            output.emit_json_line(event)
    job = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
    output.emit_json_line(job)
    return for_job_status(final or job.get("status"))
