"""`qlora`: files, jobs, adapters, estimates and models of the fine-tuning service, from a
terminal. Every command talks to the REST API; `--json` prints the API's own JSON."""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from qlora_cli.client import DEFAULT_URL, ApiError, Client, Unreachable
from qlora_cli.exit_codes import ExitCode
from qlora_cli.job_request import METHODS, JobOptions, RequestError
from qlora_cli.output import Output, size, timestamp
from qlora_cli.transfer import TransferError, check_target, multipart_upload, unpack_adapter
from qlora_cli.watch import watch

# Tests swap in an `httpx.MockTransport`; None is the network.
TRANSPORT: httpx.BaseTransport | None = None

app = typer.Typer(
    name="qlora",
    help="Command-line client of the QLoRA fine-tuning service (see docs/cli.md).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_show_locals=False,
)
files_app = typer.Typer(help="Datasets: upload, list, inspect, delete.", no_args_is_help=True)
jobs_app = typer.Typer(help="Fine-tuning jobs.", no_args_is_help=True)
adapters_app = typer.Typer(help="Trained LoRA adapters.", no_args_is_help=True)
models_app = typer.Typer(help="Base and fine-tuned models.", no_args_is_help=True)
app.add_typer(files_app, name="files")
app.add_typer(jobs_app, name="jobs")
app.add_typer(adapters_app, name="adapters")
app.add_typer(models_app, name="models")


@dataclass
class Config:
    api_url: str
    api_key: str | None
    json_mode: bool


JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's raw JSON (for scripts).")]


@app.callback()
def root(
    ctx: typer.Context,
    api_url: Annotated[
        str,
        typer.Option("--api-url", envvar="QLORA_API_URL", help="The service's base URL."),
    ] = DEFAULT_URL,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="QLORA_API_KEY",
            help="Your API key (better in QLORA_API_KEY: flags show up in `ps`).",
            show_default=False,
        ),
    ] = None,
    json_mode: JsonFlag = False,
) -> None:
    ctx.obj = Config(api_url=api_url, api_key=api_key or None, json_mode=json_mode)


def run(
    ctx: typer.Context, json_flag: bool, action: Callable[[Client, Output], ExitCode | None]
) -> None:
    """Run `action` with a client and an output; turn every failure into its line and exit
    code. Nothing below prints a traceback for an API answer."""
    config: Config = ctx.find_root().obj
    output = Output(json_mode=config.json_mode or json_flag, secret=config.api_key)
    code = ExitCode.OK
    try:
        with Client(config.api_url, config.api_key, transport=TRANSPORT) as client:
            code = action(client, output) or ExitCode.OK
    except ApiError as exc:
        output.api_error(exc)
        code = ExitCode.ERROR
    except Unreachable as exc:
        output.unreachable(exc)
        code = ExitCode.UNREACHABLE
    except (TransferError, RequestError) as exc:
        output.failure(str(exc))
        code = ExitCode.ERROR
    except KeyboardInterrupt:
        output.note("[yellow]interrupted[/]")
        code = ExitCode.INTERRUPTED
    raise typer.Exit(int(code))


def _list_params(limit: int, after: str | None) -> dict[str, Any]:
    params: dict[str, Any] = {"limit": limit}
    if after:
        params["after"] = after
    return params


# ------------------------------------------------------------------------------------ files


def _show_file(output: Output, obj: dict[str, Any]) -> None:
    output.fields(
        [
            ("id", obj.get("id")),
            ("filename", obj.get("filename")),
            ("purpose", obj.get("purpose")),
            ("size", size(obj.get("bytes"))),
            ("format", obj.get("format")),
            ("rows", obj.get("rows")),
            ("sha256", obj.get("sha256")),
            ("created", timestamp(obj.get("created_at"))),
            ("stats", obj.get("stats")),
        ]
    )


@files_app.command("upload")
def files_upload(
    ctx: typer.Context,
    file: Annotated[Path, typer.Argument(help="A JSONL dataset.", show_default=False)],
    purpose: Annotated[str, typer.Option(help="The file's purpose.")] = "fine-tune",
    json_flag: JsonFlag = False,
) -> None:
    """Upload a JSONL dataset (streamed, with a progress bar). The service validates every
    line; a refused file's bad lines are listed one per line."""

    def action(client: Client, output: Output) -> None:
        progress = Progress(
            TextColumn("uploading {task.description}"),
            BarColumn(bar_width=30),
            DownloadColumn(),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=output.err,
            disable=output.json_mode or not output.err.is_terminal,
            transient=True,
        )
        with progress:
            task = progress.add_task(output.clean(file.name), total=None)
            upload = multipart_upload(
                file,
                fields={"purpose": purpose},
                on_bytes=lambda n: progress.advance(task, n),
            )
            progress.update(task, total=upload.length)
            with client.stream(
                "POST",
                "/v1/files",
                content=upload.body,
                headers={"Content-Type": upload.content_type, "Content-Length": str(upload.length)},
                timeout=httpx.Timeout(300.0, connect=10.0),
            ) as resp:
                resp.read()
                obj = resp.json()
        if output.json_mode:
            output.emit_json(obj)
            return
        output.print(f"[green]uploaded[/] {output.clean(obj.get('id'))}")
        _show_file(output, obj)

    run(ctx, json_flag, action)


@files_app.command("list")
def files_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1)] = 100,
    after: Annotated[str | None, typer.Option(help="Start after this file id.")] = None,
    purpose: Annotated[str | None, typer.Option(help="Only files of this purpose.")] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Your organization's files, newest first."""

    def action(client: Client, output: Output) -> None:
        params = _list_params(limit, after)
        if purpose:
            params["purpose"] = purpose
        page = client.request("GET", "/v1/files", params=params)
        if output.json_mode:
            output.emit_json(page)
            return
        output.table(
            None,
            ["id", "filename", "format", "rows", "size", "created"],
            [
                [
                    f["id"],
                    f.get("filename"),
                    f.get("format"),
                    f.get("rows"),
                    size(f.get("bytes")),
                    timestamp(f.get("created_at")),
                ]
                for f in page.get("data", [])
            ],
        )
        if page.get("has_more"):
            output.note(f"[dim]more: --after {output.clean(page.get('last_id'))}[/]")

    run(ctx, json_flag, action)


@files_app.command("get")
def files_get(
    ctx: typer.Context,
    file_id: Annotated[str, typer.Argument(metavar="ID", help="A file id.")],
    json_flag: JsonFlag = False,
) -> None:
    """One file's record and dataset statistics."""

    def action(client: Client, output: Output) -> None:
        obj = client.request("GET", f"/v1/files/{file_id}")
        if output.json_mode:
            output.emit_json(obj)
        else:
            _show_file(output, obj)

    run(ctx, json_flag, action)


@files_app.command("delete")
def files_delete(
    ctx: typer.Context,
    file_id: Annotated[str, typer.Argument(metavar="ID", help="A file id.")],
    json_flag: JsonFlag = False,
) -> None:
    """Delete a file."""
    delete(ctx, json_flag, f"/v1/files/{file_id}")


def delete(ctx: typer.Context, json_flag: bool, path: str) -> None:
    """DELETE `path` and say what went."""

    def action(client: Client, output: Output) -> None:
        obj = client.request("DELETE", path)
        if output.json_mode:
            output.emit_json(obj)
        else:
            output.print(f"deleted {output.clean(obj.get('id'))}")

    run(ctx, json_flag, action)


# ------------------------------------------------------------------------------------- jobs


def _progress_text(job: dict[str, Any]) -> str:
    progress = job.get("progress") or {}
    step, total = progress.get("step") or 0, progress.get("total_steps")
    return f"{step}/{total}" if total else str(step) if step else "-"


def _show_job(output: Output, job: dict[str, Any]) -> None:
    progress = job.get("progress") or {}
    error = job.get("error") or {}
    estimate = job.get("estimate") or {}
    output.fields(
        [
            ("id", job.get("id")),
            ("status", job.get("status")),
            ("model", job.get("model")),
            ("training_file", job.get("training_file")),
            ("validation_file", job.get("validation_file")),
            ("method", (job.get("method") or {}).get("type")),
            ("hyperparameters", job.get("hyperparameters")),
            ("progress", _progress_text(job)),
            ("loss", progress.get("loss")),
            ("eval_loss", progress.get("eval_loss")),
            ("tokens/s", progress.get("tokens_per_second")),
            ("trained_tokens", job.get("trained_tokens")),
            ("gpu_class", job.get("gpu_class")),
            ("memory_estimate", size(estimate.get("total_bytes")) if estimate else None),
            ("attempt", f"{job.get('attempt')}/{job.get('max_attempts')}"),
            ("fine_tuned_model", job.get("fine_tuned_model")),
            ("adapter_id", job.get("adapter_id")),
            ("error", f"{error.get('code')}: {error.get('message')}" if error else None),
            ("created", timestamp(job.get("created_at"))),
            ("finished", timestamp(job.get("finished_at")) if job.get("finished_at") else None),
            ("qlora", job.get("qlora")),
        ]
    )


def _job_options(
    model: str,
    training_file: str,
    validation_file: str | None,
    method: str,
    epochs: int | None,
    batch_size: int | None,
    learning_rate_multiplier: float | None,
    beta: float | None,
    rank: int | None,
    alpha: float | None,
    dropout: float | None,
    max_seq_length: int | None,
    max_steps: int | None,
    target_modules: str | None,
    suffix: str | None,
    seed: int | None,
    qlora: list[str] | None,
    metadata: list[str] | None,
) -> JobOptions:
    return JobOptions(
        model=model,
        training_file=training_file,
        validation_file=validation_file,
        method=method,
        epochs=epochs,
        batch_size=batch_size,
        learning_rate_multiplier=learning_rate_multiplier,
        beta=beta,
        rank=rank,
        alpha=alpha,
        dropout=dropout,
        max_seq_length=max_seq_length,
        max_steps=max_steps,
        target_modules=target_modules,
        suffix=suffix,
        seed=seed,
        qlora=list(qlora or []),
        metadata=list(metadata or []),
    )


# The knobs `jobs create` and `estimate` share.
Model = Annotated[str, typer.Option("--model", help="Base model name (see `qlora models list`).")]
TrainingFile = Annotated[str, typer.Option("--training-file", help="Training file id.")]
ValidationFile = Annotated[
    str | None, typer.Option("--validation-file", help="Validation file id.")
]
MethodOpt = Annotated[
    str,
    typer.Option(
        "--method", help=f"Training method: {' or '.join(METHODS)}.", case_sensitive=False
    ),
]
Epochs = Annotated[int | None, typer.Option("--epochs", help="Passes over the data (n_epochs).")]
BatchSize = Annotated[int | None, typer.Option("--batch-size", help="Examples per micro-batch.")]
LrMultiplier = Annotated[
    float | None,
    typer.Option("--learning-rate-multiplier", help="Multiplies the base learning rate 2e-4."),
]
Beta = Annotated[float | None, typer.Option("--beta", help="DPO's beta (with --method dpo).")]
Rank = Annotated[int | None, typer.Option("--rank", help="LoRA rank r.")]
Alpha = Annotated[float | None, typer.Option("--alpha", help="LoRA alpha (scale alpha/r).")]
Dropout = Annotated[float | None, typer.Option("--dropout", help="LoRA dropout.")]
MaxSeqLength = Annotated[
    int | None, typer.Option("--max-seq-length", help="Tokens per example (longer: truncated).")
]
MaxSteps = Annotated[
    int | None, typer.Option("--max-steps", help="Optimizer steps; overrides --epochs.")
]
TargetModules = Annotated[
    str | None,
    typer.Option("--target-modules", help="Comma-separated module names, or all-linear."),
]
Suffix = Annotated[str | None, typer.Option("--suffix", help="Part of the fine-tuned name.")]
Seed = Annotated[int | None, typer.Option("--seed", help="Random seed.")]
QloraPairs = Annotated[
    list[str] | None,
    typer.Option(
        "--qlora",
        metavar="KEY=VALUE",
        help="Any other qlora field (JSON value), e.g. packing=false. Repeatable.",
    ),
]
MetadataPairs = Annotated[
    list[str] | None,
    typer.Option("--metadata", metavar="KEY=VALUE", help="A metadata pair. Repeatable."),
]


@jobs_app.command("create")
def jobs_create(
    ctx: typer.Context,
    model: Model,
    training_file: TrainingFile,
    validation_file: ValidationFile = None,
    method: MethodOpt = "supervised",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate_multiplier: LrMultiplier = None,
    beta: Beta = None,
    rank: Rank = None,
    alpha: Alpha = None,
    dropout: Dropout = None,
    max_seq_length: MaxSeqLength = None,
    max_steps: MaxSteps = None,
    target_modules: TargetModules = None,
    suffix: Suffix = None,
    seed: Seed = None,
    qlora: QloraPairs = None,
    metadata: MetadataPairs = None,
    idempotency_key: Annotated[
        str | None,
        typer.Option("--idempotency-key", help="Retrying with the same key creates one job."),
    ] = None,
    follow: Annotated[
        bool, typer.Option("--watch", help="Then watch it (exit code as `jobs watch`).")
    ] = False,
    json_flag: JsonFlag = False,
) -> None:
    """Create a fine-tuning job."""
    options = _job_options(
        model, training_file, validation_file, method.lower(), epochs, batch_size,
        learning_rate_multiplier, beta, rank, alpha, dropout, max_seq_length, max_steps,
        target_modules, suffix, seed, qlora, metadata,
    )  # fmt: skip

    def action(client: Client, output: Output) -> ExitCode | None:
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else None
        job = client.request("POST", "/v1/fine_tuning/jobs", json=options.body(), headers=headers)
        if output.json_mode and not follow:
            output.emit_json(job)
            return None
        if not output.json_mode:
            output.print(
                f"[green]created[/] {output.clean(job.get('id'))} "
                f"({output.clean(job.get('status'))}, "
                f"gpu class {output.clean(job.get('gpu_class'))})"
            )
        if follow:
            return watch(client, output, str(job["id"]))
        return None

    run(ctx, json_flag, action)


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    status: Annotated[
        list[str] | None,
        typer.Option("--status", help="Only jobs in this status. Repeatable."),
    ] = None,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=1000)] = 20,
    after: Annotated[str | None, typer.Option(help="Start after this job id.")] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Your jobs, newest first. `--status` filters on this side: pages are read until
    `--limit` jobs match or none are left."""
    wanted = {s.lower() for s in status or []}

    def action(client: Client, output: Output) -> None:
        jobs: list[dict[str, Any]] = []
        cursor = after
        has_more = True
        while has_more and len(jobs) < limit:
            page_size = min(100, limit - len(jobs)) if not wanted else 100
            page = client.request(
                "GET", "/v1/fine_tuning/jobs", params=_list_params(page_size, cursor)
            )
            data = page.get("data", [])
            has_more = bool(page.get("has_more")) and bool(data)
            cursor = data[-1]["id"] if data else cursor
            jobs += [j for j in data if not wanted or j.get("status") in wanted]
        jobs = jobs[:limit]
        if output.json_mode:
            output.emit_json({"object": "list", "data": jobs, "has_more": has_more})
            return
        output.table(
            None,
            ["id", "status", "model", "progress", "loss", "fine_tuned_model", "created"],
            [
                [
                    j["id"],
                    j.get("status"),
                    j.get("model"),
                    _progress_text(j),
                    _fmt_loss((j.get("progress") or {}).get("loss")),
                    j.get("fine_tuned_model") or "-",
                    timestamp(j.get("created_at")),
                ]
                for j in jobs
            ],
        )

    run(ctx, json_flag, action)


def _fmt_loss(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else "-"


@jobs_app.command("get")
def jobs_get(
    ctx: typer.Context,
    job_id: Annotated[str, typer.Argument(metavar="ID", help="A job id.")],
    json_flag: JsonFlag = False,
) -> None:
    """One job: status, progress, hyperparameters, estimate, result."""

    def action(client: Client, output: Output) -> None:
        job = client.request("GET", f"/v1/fine_tuning/jobs/{job_id}")
        if output.json_mode:
            output.emit_json(job)
        else:
            _show_job(output, job)

    run(ctx, json_flag, action)


def _job_action(ctx: typer.Context, job_id: str, verb: str, json_flag: bool) -> None:
    def action(client: Client, output: Output) -> None:
        job = client.request("POST", f"/v1/fine_tuning/jobs/{job_id}/{verb}")
        if output.json_mode:
            output.emit_json(job)
        else:
            output.print(f"{output.clean(job.get('id'))}: {output.clean(job.get('status'))}")

    run(ctx, json_flag, action)


JobId = Annotated[str, typer.Argument(metavar="ID", help="A job id.")]


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: JobId, json_flag: JsonFlag = False) -> None:
    """Cancel a queued, running or paused job."""
    _job_action(ctx, job_id, "cancel", json_flag)


@jobs_app.command("pause")
def jobs_pause(ctx: typer.Context, job_id: JobId, json_flag: JsonFlag = False) -> None:
    """Pause a job: it checkpoints and gives its GPU back until resumed."""
    _job_action(ctx, job_id, "pause", json_flag)


@jobs_app.command("resume")
def jobs_resume(ctx: typer.Context, job_id: JobId, json_flag: JsonFlag = False) -> None:
    """Resume a paused job from its last checkpoint."""
    _job_action(ctx, job_id, "resume", json_flag)


@jobs_app.command("events")
def jobs_events(
    ctx: typer.Context,
    job_id: JobId,
    limit: Annotated[int, typer.Option(help="The newest this many.", min=1, max=1000)] = 20,
    json_flag: JsonFlag = False,
) -> None:
    """A job's newest events, printed oldest first."""

    def action(client: Client, output: Output) -> None:
        page = client.request(
            "GET", f"/v1/fine_tuning/jobs/{job_id}/events", params={"limit": limit}
        )
        if output.json_mode:
            output.emit_json(page)
            return
        output.table(
            None,
            ["time", "level", "message"],
            [
                [timestamp(e.get("created_at")), e.get("level"), e.get("message")]
                for e in reversed(page.get("data", []))
            ],
        )

    run(ctx, json_flag, action)


@jobs_app.command("checkpoints")
def jobs_checkpoints(
    ctx: typer.Context,
    job_id: JobId,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=100)] = 10,
    json_flag: JsonFlag = False,
) -> None:
    """A job's kept checkpoints with their step metrics."""

    def action(client: Client, output: Output) -> None:
        page = client.request(
            "GET", f"/v1/fine_tuning/jobs/{job_id}/checkpoints", params={"limit": limit}
        )
        if output.json_mode:
            output.emit_json(page)
            return
        rows = []
        for c in page.get("data", []):
            metrics = c.get("metrics") or {}
            shown = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                for k, v in sorted(metrics.items())
            )
            rows.append([c["id"], c.get("step_number"), shown, timestamp(c.get("created_at"))])
        output.table(None, ["id", "step", "metrics", "created"], rows)

    run(ctx, json_flag, action)


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: JobId, json_flag: JsonFlag = False) -> None:
    """Follow a job live to its end: a progress bar with step/total, loss, tokens/s and ETA.
    Exits 0 if it succeeds, 10 if it fails, 11 if it is cancelled (docs/cli.md)."""

    def action(client: Client, output: Output) -> ExitCode:
        return watch(client, output, job_id)

    run(ctx, json_flag, action)


# --------------------------------------------------------------------------------- adapters


@adapters_app.command("list")
def adapters_list(
    ctx: typer.Context,
    limit: Annotated[int, typer.Option(help="At most this many.", min=1, max=100)] = 20,
    after: Annotated[str | None, typer.Option(help="Start after this adapter id.")] = None,
    json_flag: JsonFlag = False,
) -> None:
    """Your trained adapters."""

    def action(client: Client, output: Output) -> None:
        page = client.request("GET", "/v1/adapters", params=_list_params(limit, after))
        if output.json_mode:
            output.emit_json(page)
            return
        output.table(
            None,
            ["id", "name", "base_model", "job", "created"],
            [
                [
                    a["id"],
                    a.get("name"),
                    a.get("base_model"),
                    a.get("fine_tuning_job_id"),
                    timestamp(a.get("created_at")),
                ]
                for a in page.get("data", [])
            ],
        )

    run(ctx, json_flag, action)


@adapters_app.command("download")
def adapters_download(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="An adapter id.")],
    out: Annotated[Path, typer.Option("--out", help="Folder to unpack the PEFT adapter into.")],
    force: Annotated[
        bool, typer.Option("--force", help="Overwrite files in a non-empty --out.")
    ] = False,
    json_flag: JsonFlag = False,
) -> None:
    """Download an adapter and unpack it into --out, ready for
    `PeftModel.from_pretrained(base, OUT)`."""

    def action(client: Client, output: Output) -> None:
        check_target(out, force=force)
        with tempfile.TemporaryDirectory(prefix="qlora-download-") as tmp:
            archive = Path(tmp) / "adapter.tar.gz"
            progress = Progress(
                TextColumn("downloading {task.description}"),
                BarColumn(bar_width=30),
                DownloadColumn(),
                TransferSpeedColumn(),
                console=output.err,
                disable=output.json_mode or not output.err.is_terminal,
                transient=True,
            )
            with (
                progress,
                client.stream("GET", f"/v1/adapters/{adapter_id}/download") as resp,
                archive.open("wb") as fh,
            ):
                length = resp.headers.get("content-length")
                task = progress.add_task(
                    output.clean(adapter_id), total=int(length) if length else None
                )
                for chunk in resp.iter_bytes():
                    fh.write(chunk)
                    progress.advance(task, len(chunk))
            written = unpack_adapter(archive, out)
        names = sorted(str(p.relative_to(out)) for p in written)
        if output.json_mode:
            output.emit_json({"id": adapter_id, "path": str(out.resolve()), "files": names})
            return
        output.print(f"[green]unpacked[/] {output.clean(adapter_id)} into {output.clean(out)}")
        for name in names:
            output.print(f"  {output.clean(name)}")

    run(ctx, json_flag, action)


@adapters_app.command("delete")
def adapters_delete(
    ctx: typer.Context,
    adapter_id: Annotated[str, typer.Argument(metavar="ID", help="An adapter id.")],
    json_flag: JsonFlag = False,
) -> None:
    """Delete an adapter (and its job's checkpoints)."""
    delete(ctx, json_flag, f"/v1/adapters/{adapter_id}")


# ------------------------------------------------------------------------ estimate, models


@app.command("estimate")
def estimate(
    ctx: typer.Context,
    model: Model,
    training_file: TrainingFile,
    validation_file: ValidationFile = None,
    method: MethodOpt = "supervised",
    epochs: Epochs = None,
    batch_size: BatchSize = None,
    learning_rate_multiplier: LrMultiplier = None,
    beta: Beta = None,
    rank: Rank = None,
    alpha: Alpha = None,
    dropout: Dropout = None,
    max_seq_length: MaxSeqLength = None,
    max_steps: MaxSteps = None,
    target_modules: TargetModules = None,
    qlora: QloraPairs = None,
    json_flag: JsonFlag = False,
) -> None:
    """Memory a job would need and the GPU class that can run it (nothing is created)."""
    options = _job_options(
        model, training_file, validation_file, method.lower(), epochs, batch_size,
        learning_rate_multiplier, beta, rank, alpha, dropout, max_seq_length, max_steps,
        target_modules, None, None, qlora, None,
    )  # fmt: skip

    def action(client: Client, output: Output) -> None:
        result = client.request("POST", "/v1/estimates", json=options.body())
        if output.json_mode:
            output.emit_json(result)
            return
        fits = result.get("fits")
        verdict = (
            f"[green]fits[/] on {output.clean(result.get('gpu_class'))} "
            f"(queue {output.clean(result.get('queue'))})"
            if fits
            else "[red]does not fit[/] on any GPU class of this service"
        )
        output.print(f"{output.clean(result.get('model'))}: {verdict}")
        output.fields(
            [
                ("total memory", size(result.get("total_bytes"))),
                *((name, size(value)) for name, value in (result.get("parts") or {}).items()),
                ("trainable params", f"{result.get('trainable_params'):,}"),
            ]
        )

    run(ctx, json_flag, action)


@models_app.command("list")
def models_list(ctx: typer.Context, json_flag: JsonFlag = False) -> None:
    """Base models you can tune, and your fine-tuned models."""

    def action(client: Client, output: Output) -> None:
        page = client.request("GET", "/v1/models")
        if output.json_mode:
            output.emit_json(page)
            return
        output.table(
            None,
            ["id", "owned_by", "base", "created"],
            [
                [m["id"], m.get("owned_by"), m.get("root") or "-", timestamp(m.get("created"))]
                for m in page.get("data", [])
            ],
        )

    run(ctx, json_flag, action)


if __name__ == "__main__":  # pragma: no cover
    app()
