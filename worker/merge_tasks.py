"""The merge task: claim a merge, fetch adapter and base, merge, upload, record.

The merging itself is `worker.training.merge`; the database verbs are `shared.merges`. A
heartbeat thread keeps the claim fresh while the merge runs (the sweeper re-sends a merge whose
heartbeat went stale). Transient faults of the store or the database are retried inside the
attempt (`retry_transient`), then the merge is queued again; permanent ones fail it with a
stable code and a tenant-safe message.
"""

from __future__ import annotations

import logging
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from shared import merges
from shared.broker import MERGE_TASK
from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.jobs.faults import JobFault, is_out_of_memory, is_transient, retry_transient
from shared.storage import ObjectStore, make_store
from worker.tasks import house_task

log = logging.getLogger("worker.merge_tasks")
T = TypeVar("T")


class MergeFault(Exception):
    """A permanent failure with a code of `shared.merges.PUBLIC_MESSAGES`."""

    def __init__(self, code: str, detail: str = "") -> None:
        super().__init__(code)
        self.code, self.detail = code, detail


class MergeContext:
    def __init__(self, settings: Settings, sessions: sessionmaker[Session], store: ObjectStore):
        self.settings, self.sessions, self.store = settings, sessions, store

    def retry(self, fn: Callable[[], T], what: str, progress: Callable[[], int] | None = None) -> T:
        return retry_transient(
            fn, what=what, budget_s=self.settings.transient_retry_seconds, progress=progress
        )

    def db(self, fn: Callable[[Session], T], what: str) -> T:
        def attempt() -> T:
            with self.sessions.begin() as session:
                return fn(session)

        return self.retry(attempt, what)


class Heartbeat(threading.Thread):
    """Touches the claim every `interval` seconds; `held` turns False once it is refused."""

    def __init__(self, ctx: MergeContext, claim: merges.MergeClaim, interval: float) -> None:
        super().__init__(name=f"merge-heartbeat-{claim.merge_id}", daemon=True)
        self.ctx, self.claim, self.interval = ctx, claim, interval
        self.held = True
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                with self.ctx.sessions.begin() as session:
                    self.held = merges.heartbeat(session, self.claim)
            except Exception as exc:  # the database blinked: the next beat tries again
                log.warning("merge %s: heartbeat failed (%s)", self.claim.merge_id, type(exc))
            if not self.held:
                return


def archive(folder: Path, target: Path) -> Path:
    """`model.tar.gz`: the folder's files under `model/`. Level 1: 16-bit weights barely
    compress, so higher levels only cost CPU time."""
    with tarfile.open(target, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=f"model/{path.name}")
    return target


def _fetch(ctx: MergeContext, key: str, path: Path) -> bool:
    try:
        ctx.retry(lambda: ctx.store.download_file(key, path), "download rows")
    except Exception as exc:  # deleted since: the parity report uses other rows
        log.warning("parity rows %s unavailable (%s)", path.name, type(exc).__name__)
        return False
    return True


def _parity_rows(ctx: MergeContext, claim: merges.MergeClaim, workdir: Path) -> dict[str, Any]:
    """Rows for the parity report: the job's validation file, else its training file's
    held-out split (or last rows); the built-in rows when neither can be read."""
    from worker.training.merge import parity_rows, read_adapter_spec

    spec = read_adapter_spec(workdir / "adapter")
    validation = workdir / "validation.jsonl"
    training = workdir / "training.jsonl"
    try:
        if claim.validation_key is not None and _fetch(ctx, claim.validation_key, validation):
            rows, source = parity_rows(spec, validation_path=validation)
        elif claim.training_key is not None and _fetch(ctx, claim.training_key, training):
            rows, source = parity_rows(spec, training_path=training)
        else:
            rows, source = parity_rows(spec)
    except ValueError as exc:  # a file the engine cannot read: the built-in rows
        log.warning("merge %s: parity rows unreadable (%s)", claim.merge_id, type(exc).__name__)
        rows, source = parity_rows(spec)
    return {"rows": rows, "rows_source": source}


def execute(ctx: MergeContext, claim: merges.MergeClaim, workdir: Path) -> dict[str, Any]:
    """Download, merge, archive, upload; returns the parity report."""
    from worker.runner import resolve_base_model
    from worker.training.merge import merge_adapter_folder

    if claim.model_source is None:
        raise JobFault("base_model_unavailable")
    adapter_dir = workdir / "adapter"
    found = ctx.retry(
        lambda: ctx.store.download_prefix(claim.adapter_prefix, adapter_dir), "download adapter"
    )
    if not (adapter_dir / "adapter_model.safetensors").is_file() or not found:
        raise MergeFault("adapter_unavailable")
    base = resolve_base_model(claim.model_source, claim.model_revision)
    result = merge_adapter_folder(
        base,
        adapter_dir,
        workdir / "merged",
        dtype=claim.dtype,
        **_parity_rows(ctx, claim, workdir),
    )
    packed = workdir / "archive"
    packed.mkdir()
    archive(result.output_dir, packed / merges.ARCHIVE_NAME)

    landed: list[str] = []  # the retry budget counts time without a shard landing
    prefix = claim.storage_prefix

    def upload() -> None:  # a retry sends only what the failed try did not
        ctx.store.sync_dir(prefix, result.output_dir, delete_strays=False, on_landed=landed.append)
        ctx.store.sync_dir(prefix, packed, delete_strays=False, on_landed=landed.append)

    ctx.retry(upload, "upload merged model", lambda: len(landed))
    return result.parity.to_json()


def verdict(exc: BaseException) -> tuple[str | None, str]:
    """(code, detail) of a permanent failure; (None, "") for a transient one."""
    from worker.training.merge import MergeError

    if isinstance(exc, MergeFault):
        return exc.code, exc.detail
    if isinstance(exc, JobFault):
        return (exc.code, "") if exc.code in merges.PUBLIC_MESSAGES else ("internal_error", "")
    if isinstance(exc, MergeError):  # the engine's messages carry no paths
        return "merge_unsupported", str(exc)[:300]
    if is_transient(exc):
        return None, ""
    if is_out_of_memory(exc):
        return "out_of_memory", ""
    return "internal_error", ""


def run_merge(merge_id: str, *, settings: Settings | None = None) -> str:
    """Claim `merge_id` and run it to a final write; returns what happened (for the task log)."""
    settings = settings or get_settings()
    ctx = MergeContext(settings, session_factory(settings), make_store(settings))
    stale_after = timedelta(seconds=settings.lease_seconds)
    claim = ctx.db(
        lambda s: merges.claim(s, merge_id=merge_id, stale_after=stale_after), "claim merge"
    )
    if claim is None:
        return "dropped"
    beat = Heartbeat(ctx, claim, settings.lease_seconds * settings.lease_renew_fraction)
    beat.start()
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-{merge_id}-"))
    try:
        try:
            parity = execute(ctx, claim, workdir)
        except Exception as exc:
            return _settle_fault(ctx, claim, exc)
        moved = ctx.db(lambda s: merges.succeed(s, claim, parity=parity), "record merge")
        if moved:
            return "succeeded"
        if not ctx.db(lambda s: merges.exists(s, merge_id), "read merge"):
            # Deleted while merging: the deletion scheduled this prefix before the upload.
            ctx.store.delete_prefix(claim.storage_prefix)
        return "claim_lost"
    finally:
        beat.stopped.set()
        shutil.rmtree(workdir, ignore_errors=True)


def _settle_fault(ctx: MergeContext, claim: merges.MergeClaim, exc: Exception) -> str:
    code, detail = verdict(exc)
    log.error("merge %s attempt %d: %s", claim.merge_id, claim.attempt, code, exc_info=exc)
    if code is None:
        delay = ctx.settings.transient_requeue_delay_seconds
        moved = ctx.db(lambda s: merges.requeue(s, claim, delay_s=delay), "requeue merge")
        return "requeued" if moved else "claim_lost"
    moved = ctx.db(lambda s: merges.fail(s, claim, code=code, detail=detail), "fail merge")
    return "failed" if moved else "claim_lost"


@house_task(MERGE_TASK)
def merge_adapter(merge_id: str) -> str:
    """Merge an adapter into its base and store the 16-bit model."""
    return run_merge(merge_id)
