"""Run one job on this worker: claim, fetch inputs, train with hooks, store, transition.

A thin adapter between the engine (`worker.training`, no I/O of its own), the job verbs in
`shared.jobs.runs` (every database read and write, fenced by the lease) and the object store.
A `LeaseKeeper` thread holds the lease from the claim to the final transition. Transient
faults are retried inside the attempt (`shared.jobs.faults.retry_transient`); permanent ones
fail the job with a stable code. The Celery task is a one-line call into `run_job`.
"""

from __future__ import annotations

import gc
import io
import logging
import math
import shutil
import tarfile
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.orm import Session, sessionmaker

from shared.adapters import ARCHIVE_NAME
from shared.config import Settings, get_settings
from shared.db import session_factory
from shared.events import configure_publisher
from shared.ids import new_id
from shared.jobs import results, retention, runs
from shared.jobs.faults import JobFault, classify, retry_transient
from shared.jobs.sources import ADAPTER_WEIGHTS
from shared.models import Adapter
from shared.storage import ObjectStore, adapter_prefix, make_store, results_key
from shared.tenancy import service as tenancy
from shared.train_spec import TrainSpec
from worker.celery_app import worker_identity
from worker.fleet import set_current_job
from worker.lease_keeper import LeaseKeeper
from worker.tracking import RunTracking, TrackedRun
from worker.training import CheckpointError, DataError, SpecError, StepMetrics
from worker.training.hooks import (
    EvalMetrics,
    PreferenceMetrics,
    StopRequest,
    TrainHooks,
    TrainResult,
)

log = logging.getLogger("worker.runner")
T = TypeVar("T")


def shutdown_requested() -> bool:
    """True once Celery's worker got SIGTERM/SIGINT (warm shutdown) in this process."""
    from celery.worker import state

    return state.should_stop is not None or state.should_terminate is not None


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def _preference_data(metrics: PreferenceMetrics, prefix: str = "") -> dict[str, float | None]:
    """A DPO step's or evaluation's figures as event / checkpoint fields."""
    return {
        f"{prefix}reward_margin": _finite(metrics.reward_margin),
        f"{prefix}chosen_reward": _finite(metrics.chosen_reward),
        f"{prefix}rejected_reward": _finite(metrics.rejected_reward),
        f"{prefix}preference_accuracy": _finite(metrics.accuracy),
    }


def _preference_message(metrics: PreferenceMetrics) -> str:
    return (
        f", reward margin={metrics.reward_margin:.4f} (chosen {metrics.chosen_reward:.4f}, "
        f"rejected {metrics.rejected_reward:.4f}), preference accuracy={metrics.accuracy:.2f}"
    )


class JobContext:
    """What a run shares: settings, the database, the store, and retries of both."""

    def __init__(self, settings: Settings, sessions: sessionmaker[Session], store: ObjectStore):
        self.settings = settings
        self.sessions = sessions
        self.store = store

    def retry(
        self,
        fn: Callable[[], T],
        what: str,
        give_up: Callable[[], bool] | None = None,
        progress: Callable[[], int] | None = None,
    ) -> T:
        return retry_transient(
            fn,
            what=what,
            budget_s=self.settings.transient_retry_seconds,
            should_give_up=give_up or (lambda: False),
            progress=progress,
        )

    def db(self, fn: Callable[[Session], T], what: str) -> T:
        """Run `fn` in its own transaction, retrying transient database faults."""

        def attempt() -> T:
            with self.sessions.begin() as session:
                return fn(session)

        return self.retry(attempt, what)


class JobHooks(TrainHooks):
    """Engine hooks: progress and checkpoints become fenced writes; the lease keeper's verdict
    and Celery's warm shutdown become stop requests."""

    def __init__(self, ctx: JobContext, lease: runs.Lease, keeper: LeaseKeeper) -> None:
        self.ctx = ctx
        self.lease = lease
        self.keeper = keeper
        self.tracking = RunTracking([], ctx.settings)  # the job's integrations, once loaded
        self.last_write = -math.inf
        self.last_loss: float | None = None
        self.last_eval: float | None = None
        self.last_accuracy: float | None = None  # train / valid mean token accuracy
        self.last_eval_accuracy: float | None = None
        self.last_preference: dict[str, float | None] = {}  # DPO: train_* / valid_* figures

    def _fenced(self, fn: Callable[[Session], bool], what: str) -> None:
        if self.keeper.held and not self.ctx.db(fn, what):
            self.keeper.mark_lost()

    def on_progress(self, metrics: StepMetrics) -> None:
        self.last_loss = _finite(metrics.loss)
        if metrics.preference is not None:
            self.last_preference.update(_preference_data(metrics.preference, "train_"))
        self.last_accuracy = _finite(metrics.mean_token_accuracy)
        if self.tracking:  # every step, not throttled like the database writes
            self.tracking.log_step(asdict(metrics))
        due = time.monotonic() - self.last_write >= self.ctx.settings.progress_interval_seconds
        if not (metrics.step == 1 or metrics.step == metrics.total_steps or due):
            return
        data = {k: (_finite(v) if isinstance(v, float) else v) for k, v in asdict(metrics).items()}
        progress = {
            "step": metrics.step,
            "total_steps": metrics.total_steps,
            "loss": data["loss"],
            "tokens_per_second": data["tokens_per_second"],
            "eta_seconds": data["eta_seconds"],
        }
        message = f"Step {metrics.step}/{metrics.total_steps}: training loss={metrics.loss:.4f}"
        data.pop("preference", None)
        if metrics.preference is not None:  # DPO: flat fields, and the margin in the message
            data.update(_preference_data(metrics.preference))
            message += _preference_message(metrics.preference)
        self._fenced(
            lambda s: runs.record_progress(
                s, self.lease, progress=progress, message=message, data=data
            ),
            "record progress",
        )
        self.last_write = time.monotonic()

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        self.on_eval(
            metrics.step, metrics.eval_loss, metrics.perplexity, metrics.mean_token_accuracy
        )

    def on_eval(
        self, step: int, eval_loss: float, perplexity: float, accuracy: float | None = None
    ) -> None:
        self.last_eval = _finite(eval_loss)
        self.last_eval_accuracy = _finite(accuracy)
        if self.tracking:
            self.tracking.log_eval(step, eval_loss, perplexity, accuracy)
        message = f"Step {step}: validation loss={eval_loss:.4f} (perplexity {perplexity:.2f})"
        data = {"step": step, "eval_loss": _finite(eval_loss), "perplexity": _finite(perplexity)}
        data["mean_token_accuracy"] = self.last_eval_accuracy
        self._fenced(
            lambda s: runs.record_progress(
                s, self.lease, progress={"eval_loss": data["eval_loss"]}, message=message, data=data
            ),
            "record evaluation",
        )

    def on_preference_eval(self, step: int, metrics: PreferenceMetrics) -> None:
        self.last_eval = _finite(metrics.loss)
        self.last_preference.update(_preference_data(metrics, "valid_"))
        if self.tracking:
            self.tracking.log(
                step, {"valid_loss": metrics.loss, **_preference_data(metrics, "valid_")}
            )
        message = f"Step {step}: validation DPO loss={metrics.loss:.4f}"
        message += _preference_message(metrics)
        data = {"step": step, "eval_loss": self.last_eval, **_preference_data(metrics, "eval_")}
        self._fenced(
            lambda s: runs.record_progress(
                s, self.lease, progress={"eval_loss": data["eval_loss"]}, message=message, data=data
            ),
            "record evaluation",
        )

    def on_checkpoint(self, path: Path, step: int) -> None:
        """Upload under this attempt's own prefix, then record (fenced); never the reverse."""
        if not self.keeper.held:
            return
        lease, store = self.lease, self.ctx.store
        prefix = runs.checkpoint_prefix(lease.tenant_id, lease.job_id, lease.attempt, step)

        landed: list[str] = []  # the retry budget counts time without an object landing

        def upload() -> None:  # a retry sends only what the failed try did not
            store.sync_dir(prefix, path, on_landed=landed.append)

        self.ctx.retry(
            upload,
            f"upload checkpoint step {step}",
            lambda: not self.keeper.held,
            progress=lambda: len(landed),
        )
        metrics = {"step": step, "train_loss": self.last_loss, "valid_loss": self.last_eval}
        metrics["train_mean_token_accuracy"] = self.last_accuracy
        metrics["valid_mean_token_accuracy"] = self.last_eval_accuracy
        metrics.update(self.last_preference)
        self._fenced(
            lambda s: runs.record_checkpoint(
                s,
                lease,
                step=step,
                prefix=prefix,
                metrics=metrics,
                keep_last=self.ctx.settings.checkpoint_keep_last,
            ),
            f"record checkpoint step {step}",
        )
        if not self.keeper.held:  # refused: our upload is an orphan nobody will read
            return
        try:  # retention's deletions; the sweeper retries whatever fails here
            retention.drain_deletions(self.ctx.sessions, store)
        except Exception as exc:
            log.warning(
                "job %s: deferred checkpoint cleanup (%s)", lease.job_id, type(exc).__name__
            )

    def should_stop(self) -> StopRequest | None:
        if not self.keeper.held or self.keeper.cancel_requested:
            return StopRequest.CANCEL
        if shutdown_requested() or self.keeper.pause_requested:
            return StopRequest.PREEMPT  # the engine checkpoints, then stops
        return None


def resolve_base_model(source: str, revision: str | None) -> Path:
    """The base model's local folder. Hub ids are fetched (safetensors only) into HF_HOME."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.is_absolute():
        raise JobFault("base_model_unavailable")
    from huggingface_hub import snapshot_download

    return Path(
        snapshot_download(
            repo_id=source,
            revision=revision,
            allow_patterns=["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt"],
        )
    )


def _archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    # Level 1: LoRA weights barely compress, so higher levels only cost CPU time.
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            tar.add(path, arcname=f"adapter/{path.name}")
    return buf.getvalue()


def _bind(fn: Callable[..., T], *args: Any) -> Callable[[], T]:
    return lambda: fn(*args)


def _public_detail(exc: Exception, names: dict[Path, str]) -> str:
    """The engine's own message with local paths replaced by what the tenant knows them as."""
    text = str(exc)
    for path, name in names.items():
        text = text.replace(str(path), name)
    return text[:500]


class JobRun:
    """One attempt at one job, from a held lease to its final write."""

    def __init__(self, ctx: JobContext, lease: runs.Lease, keeper: LeaseKeeper, workdir: Path):
        self.ctx = ctx
        self.lease = lease
        self.keeper = keeper
        self.workdir = workdir
        self.hooks = JobHooks(ctx, lease, keeper)

    def execute(self) -> str:
        outcome = "failed"
        try:
            try:
                result = self._train()
            except Exception as exc:
                outcome = self._fault(exc)
                return outcome
            outcome = self._settle(result)
            return outcome
        finally:
            if self.hooks.tracking:
                self.hooks.tracking.finish(outcome)

    # -- the attempt --------------------------------------------------------------------
    def _train(self) -> TrainResult:
        from worker.training import train

        ctx, lease = self.ctx, self.lease
        inputs = ctx.db(lambda s: runs.load_inputs(s, lease), "load job")
        base_path = resolve_base_model(inputs.model_source, inputs.model_revision)
        train_path = self.workdir / "train.jsonl"
        ctx.retry(
            lambda: ctx.store.download_file(inputs.training_key, train_path), "download training"
        )
        val_path = None
        if inputs.validation_key is not None:
            val_path = self.workdir / "validation.jsonl"
            key = inputs.validation_key
            ctx.retry(lambda: ctx.store.download_file(key, val_path), "download validation")
        names = {train_path: "training file", self.workdir: "job"}
        if val_path is not None:
            names = {val_path: "validation file", **names}
        init_adapter = self._fetch_init_weights(inputs.init_weights_key)
        resume = self._fetch_checkpoint()
        spec = TrainSpec(**inputs.spec)
        if inputs.integrations:
            self.hooks.tracking = RunTracking(
                inputs.integrations,
                ctx.settings,
                on_failure=lambda message: self._event(message, level="warn"),
            )
            self.hooks.tracking.start(
                TrackedRun(job_id=lease.job_id, model=spec.base_model, config=dict(inputs.spec))
            )

        def attempt(out: str, resume_from: Path | None) -> TrainResult:
            return train(
                spec,
                train_path,
                self.workdir / out,
                self.hooks,
                validation_path=val_path,
                resume_from=resume_from,
                base_model_path=base_path,
                init_adapter=init_adapter,
            )

        try:
            try:
                return attempt("out", resume)
            except CheckpointError:
                if resume is None:
                    raise
                # An unusable checkpoint costs the steps since the start, not the job.
                self._event(
                    f"Checkpoint {resume.name} is unusable; starting over from step 0",
                    level="warn",
                )
                return attempt("out2", None)
        except DataError as exc:
            raise JobFault("invalid_training_data", _public_detail(exc, names)) from exc
        except SpecError as exc:
            raise JobFault("invalid_spec", _public_detail(exc, names)) from exc

    def _fetch_init_weights(self, key: str | None) -> Path | None:
        """The adapter weights a job continuing from a fine-tuned model or checkpoint starts
        from; gone from the store (deleted meanwhile) is a permanent fault."""
        if key is None:
            return None
        ctx, target = self.ctx, self.workdir / "init" / ADAPTER_WEIGHTS

        def download() -> bool:
            if not ctx.store.exists(key):
                return False
            ctx.store.download_file(key, target)
            return True

        if not ctx.retry(download, "download initial adapter"):
            raise JobFault("source_model_unavailable")
        return target

    def _fetch_checkpoint(self) -> Path | None:
        """Download the newest recorded checkpoint; older ones are fallbacks if it is
        incomplete in the store."""
        ctx = self.ctx
        candidates = ctx.db(
            lambda s: runs.resume_candidates(s, job_id=self.lease.job_id), "list checkpoints"
        )
        for step, prefix in candidates:
            target = self.workdir / "resume" / f"step-{step}"
            found = ctx.retry(
                _bind(ctx.store.download_prefix, prefix, target), f"download checkpoint {step}"
            )
            if found:
                self._event(f"Resuming from checkpoint {target.name}")
                return target
        return None

    def _event(self, message: str, *, level: str = "info") -> None:
        if self.keeper.held and not self.ctx.db(
            lambda s: runs.record_run_event(s, self.lease, message, level=level), "record event"
        ):
            self.keeper.mark_lost()

    # -- endings ------------------------------------------------------------------------
    def _fault(self, exc: Exception) -> str:
        job_id = self.lease.job_id
        if not self.keeper.held:
            log.warning("job %s: lease lost (%s); writing nothing more", job_id, type(exc).__name__)
            return "lease_lost"
        verdict = classify(exc)
        log.error("job %s attempt %d: %s", job_id, self.lease.attempt, verdict.code, exc_info=exc)
        settings = self.ctx.settings
        if verdict.transient:
            moved = self.ctx.db(
                lambda s: runs.release(
                    s,
                    self.lease,
                    message="A dependency stayed unavailable past the retry budget; job "
                    f"requeued, retrying in {settings.transient_requeue_delay_seconds:.0f}s",
                    give_back_attempt=False,
                    delay_s=settings.transient_requeue_delay_seconds,
                ),
                "requeue job",
            )
            return "requeued" if moved else "lease_lost"
        moved = self.ctx.db(
            lambda s: runs.fail(s, self.lease, code=verdict.code, message=verdict.message),
            "fail job",
        )
        return "failed" if moved else "lease_lost"

    def _settle(self, result: TrainResult) -> str:
        lease = self.lease
        if not self.keeper.held:
            return "lease_lost"
        if result.stopped is StopRequest.PREEMPT and self.keeper.pause_requested:
            moved = self.ctx.db(lambda s: runs.pause(s, lease, step=result.step), "pause job")
            return "paused" if moved else "lease_lost"
        if result.stopped is StopRequest.PREEMPT:
            moved = self.ctx.db(
                lambda s: runs.release(
                    s,
                    lease,
                    message=f"Worker shutting down at step {result.step}; checkpoint saved, "
                    "job requeued",
                    give_back_attempt=True,
                ),
                "release job",
            )
            return "preempted" if moved else "lease_lost"
        if result.stopped is StopRequest.CANCEL:
            moved = self.ctx.db(lambda s: runs.cancel(s, lease, step=result.step), "cancel job")
            return "cancelled" if moved else "lease_lost"
        try:
            return self._store_adapter(result)
        except Exception as exc:
            return self._fault(exc)

    def _store_adapter(self, result: TrainResult) -> str:
        assert result.output_dir is not None
        ctx, lease, folder = self.ctx, self.lease, result.output_dir
        job = ctx.db(lambda s: runs.job_summary(s, lease), "read job")
        adapter_id = runs.attempt_adapter_id(lease.job_id, lease.attempt)
        prefix = adapter_prefix(lease.tenant_id, adapter_id)
        packed = self.workdir / "archive"
        packed.mkdir(exist_ok=True)
        (packed / ARCHIVE_NAME).write_bytes(_archive(folder))

        history = list(result.metrics.get("history") or [])
        events = ctx.db(lambda s: results.metric_events(s, lease.job_id), "read metrics")
        rows = results.build_rows(history, events)
        csv_body = results.render_csv(rows)
        results_id = new_id("file")
        csv_key = results_key(lease.tenant_id, results_id)

        landed: list[str] = []  # the retry budget counts time without an object landing

        def upload() -> None:  # a retry sends only what the failed try did not
            ctx.store.sync_dir(prefix, folder, delete_strays=False, on_landed=landed.append)
            ctx.store.sync_dir(prefix, packed, delete_strays=False, on_landed=landed.append)
            ctx.store.put_bytes(csv_key, csv_body)

        ctx.retry(upload, "upload adapter", lambda: not self.keeper.held, lambda: len(landed))
        result_file = results.results_file(
            tenant_id=lease.tenant_id,
            job_id=lease.job_id,
            file_id=results_id,
            key=csv_key,
            body=csv_body,
            rows=len(rows),
        )
        metrics = {k: v for k, v in result.metrics.items() if k != "history"}
        # The registry base, also for a job that continued from a fine-tuned model (`job.model`).
        base = str(job.spec.get("base_model", job.model))
        adapter = Adapter(
            id=adapter_id,
            tenant_id=lease.tenant_id,
            job_id=lease.job_id,
            base_model=base,
            name=tenancy.fine_tuned_name(
                base=base, slug=job.tenant_slug, suffix=job.suffix, adapter_id=adapter_id
            ),
            storage_prefix=prefix,
            metrics=metrics,
            spec=job.spec,
        )
        moved = self.keeper.held and ctx.db(
            lambda s: runs.complete(
                s,
                lease,
                adapter=adapter,
                result_file=result_file,
                trained_tokens=result.trained_tokens,
                eval_loss=_finite(metrics.get("eval_loss_after")),
                step=result.step,
                eta_seconds=0.0,
            ),
            "complete job",
        )
        if not moved:  # lost the lease at the last moment: the upload is ours to take back
            self.keeper.mark_lost()
            ctx.store.delete_prefix(prefix)
            ctx.store.delete(csv_key)
            return "lease_lost"
        return "succeeded"


def run_job(job_id: str, *, settings: Settings | None = None) -> str:
    """Claim `job_id` and run it to a final write; returns what happened (for the task log)."""
    settings = settings or get_settings()
    configure_publisher(settings.redis_url)
    ctx = JobContext(settings, session_factory(settings), make_store(settings))
    owner = worker_identity()
    claim = ctx.db(
        lambda s: runs.claim(s, job_id=job_id, owner=owner, lease_seconds=settings.lease_seconds),
        "claim job",
    )
    if claim.outcome is runs.ClaimOutcome.WAITING_TURN:
        ctx.db(lambda s: runs.defer(s, job_id=job_id, delay_s=settings.defer_seconds), "defer")
        return "deferred"
    if claim.lease is None:
        return "dropped"
    keeper = LeaseKeeper(
        ctx.sessions,
        claim.lease,
        lease_seconds=settings.lease_seconds,
        renew_fraction=settings.lease_renew_fraction,
    ).start()
    set_current_job(job_id)
    workdir = Path(tempfile.mkdtemp(prefix=f"qlora-{job_id}-"))
    try:
        return JobRun(ctx, claim.lease, keeper, workdir).execute()
    finally:
        keeper.stop()
        set_current_job(None)
        shutil.rmtree(workdir, ignore_errors=True)
        gc.collect()  # after the result is recorded: the job does not wait for it
