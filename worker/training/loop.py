"""`train()`: the training loop, with evaluation, hooks, checkpoints and exact resume."""

from __future__ import annotations

import gc
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from shared.dataset_format import DatasetFormat, detect_row_format
from shared.train_spec import TrainSpec
from worker.training import checkpoint as ckpt
from worker.training.cpu_threads import CpuThreads
from worker.training.data import (
    Batch,
    DataError,
    Example,
    TokenizedSplit,
    collate,
    epoch_batches,
    read_rows,
    split_rows,
    steps_per_epoch,
    token_budget_batches,
    tokenize_rows,
)
from worker.training.hooks import EvalMetrics, StepMetrics, StopRequest, TrainHooks, TrainResult
from worker.training.model import (
    DTYPE_NAMES,
    attach_lora,
    batch_loss,
    build_optimizer,
    build_scheduler,
    choose_checkpointing,
    evaluate_batches,
    grad_scaler,
    load_base_model,
    load_tokenizer,
    parameter_counts,
    resolve_compute_dtype,
    training_device,
)
from worker.training.output import peak_rss_bytes, reset_peak_memory, write_outputs

log = logging.getLogger(__name__)
CHECKPOINT_DIR = "checkpoints"


@dataclass
class RunState:
    """Everything about progress that a checkpoint must carry besides tensors."""

    step: int = 0
    epoch: int = 0
    batch_index: int = 0  # micro-batches of `epoch` already consumed
    real_tokens: int = 0
    processed_tokens: int = 0
    target_tokens: int = 0
    wall_seconds: float = 0.0  # of earlier sessions of this run
    eval_loss_before: float | None = None
    history: list[dict[str, float]] = field(default_factory=list)
    evals: list[dict[str, float]] = field(default_factory=list)
    skipped_steps: int = 0  # fp16: steps whose gradients overflowed (no update)


@dataclass(frozen=True)
class PreparedData:
    train: TokenizedSplit
    validation: TokenizedSplit
    eval_batches: list[Batch]


def prepare_data(
    spec: TrainSpec, tokenizer: Any, dataset_path: Path, validation_path: Path | None
) -> PreparedData:
    """Tokenize the training rows and the validation rows (a file, or a seeded split)."""
    rows = read_rows(dataset_path)
    if rows and detect_row_format(rows[0]) is DatasetFormat.PREFERENCE:
        raise DataError(f"{dataset_path}: preference rows train with method dpo, not supervised")
    if validation_path is not None:
        val_rows = read_rows(validation_path)
    else:
        rows, val_rows = split_rows(rows, spec.validation_fraction, spec.seed)
    train_split = tokenize_rows(rows, tokenizer, spec.max_seq_length)
    val_split = tokenize_rows(val_rows, tokenizer, spec.max_seq_length)
    if not train_split.examples:
        raise DataError(f"{dataset_path}: no row has a trainable token within max_seq_length")
    examples = val_split.examples
    if spec.max_tokens_per_batch is not None:  # evaluation batches fill the same token budget
        groups = token_budget_batches(
            range(len(examples)), [len(e) for e in examples], spec.max_tokens_per_batch
        )
    else:
        groups = [
            list(range(i, min(i + spec.batch_size, len(examples))))
            for i in range(0, len(examples), spec.batch_size)
        ]
    eval_batches = [
        collate([examples[i] for i in ids], packing=spec.packing, pad_id=tokenizer.pad_token_id)
        for ids in groups
    ]
    return PreparedData(train_split, val_split, eval_batches)


def dataset_fingerprint(dataset_path: Path, validation_path: Path | None) -> str:
    parts = [ckpt.file_sha256(dataset_path)]
    if validation_path is not None:
        parts.append(ckpt.file_sha256(validation_path))
    return ":".join(parts)


class _Run:
    """One session of a run: the model, optimizer and data, and the step function."""

    def __init__(
        self,
        spec: TrainSpec,
        model_path: Path,
        dataset_path: Path,
        validation_path: Path | None,
        output_dir: Path,
        hooks: TrainHooks,
        cpu_threads: CpuThreads | None = None,
    ) -> None:
        self.spec, self.hooks, self.output_dir = spec, hooks, output_dir
        self.device = training_device()
        self.cpu_threads = cpu_threads
        self.tokenizer = load_tokenizer(model_path)
        self.pad_id: int = self.tokenizer.pad_token_id
        self.data = self._prepare(dataset_path, validation_path)
        self.fingerprint = dataset_fingerprint(dataset_path, validation_path)
        self.dtype = resolve_compute_dtype(spec.compute_dtype, self.device)
        log.info("compute dtype: %s (spec: %s)", DTYPE_NAMES[self.dtype], spec.compute_dtype)
        self.checkpointing = choose_checkpointing(spec, model_path, self.device, self.dtype)
        log.info(
            "gradient checkpointing %s (%s)",
            "on" if self.checkpointing.enabled else "off",
            self.checkpointing.reason,
        )
        resolved = spec.model_copy(update={"gradient_checkpointing": self.checkpointing.enabled})
        self.model: PeftModel = attach_lora(
            load_base_model(resolved, model_path, self.device, self.dtype), resolved
        )
        self.scaler = grad_scaler(self.device, self.dtype)  # fp16 only; else a no-op
        self.last_step_accuracy: float | None = None
        self.trainable_params, self.total_params = parameter_counts(self.model)
        log.info(
            "trainable params: %d of %d (%.4f%%)",
            self.trainable_params,
            self.total_params,
            100 * self.trainable_params / self.total_params,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, spec)
        self.lengths = [len(e) for e in self.data.train.examples]
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
        self.steps_per_epoch, self.total_steps = self._plan_steps()
        self.scheduler = build_scheduler(self.optimizer, spec, self.total_steps)
        self.state = RunState()
        self.last_checkpoint: Path | None = None

    # -- resume -------------------------------------------------------------------------
    def restore(self, checkpoint: ckpt.Checkpoint) -> None:
        result = set_peft_model_state_dict(self.model, checkpoint.adapter)
        unexpected = getattr(result, "unexpected_keys", [])
        if unexpected:
            raise ckpt.CheckpointError(
                f"checkpoint {checkpoint.path}: adapter has unknown tensors {unexpected[:3]}"
            )
        self.optimizer.load_state_dict(checkpoint.optimizer_state)
        state = dict(checkpoint.state)
        self.scheduler.load_state_dict(state.pop("scheduler"))
        scaler_state = state.pop("scaler", None)
        if scaler_state and self.scaler.is_enabled():
            self.scaler.load_state_dict(scaler_state)
        state.pop("dataset_sha256", None)
        self.state = RunState(**state)
        ckpt.restore_rng(checkpoint.rng)

    # -- data ---------------------------------------------------------------------------
    def _prepare(self, dataset_path: Path, validation_path: Path | None) -> PreparedData:
        return prepare_data(self.spec, self.tokenizer, dataset_path, validation_path)

    def _collate(self, examples: list[Example]) -> Batch:
        return collate(examples, packing=self.spec.packing, pad_id=self.pad_id)

    def _plan_steps(self) -> tuple[int, int]:
        """(steps of the first epoch, steps of the run). With a token budget an epoch's
        micro-batch count depends on its order, so each epoch of the run is planned."""
        spec, accumulation = self.spec, self.spec.gradient_accumulation_steps
        if spec.max_tokens_per_batch is None:
            per_epoch = steps_per_epoch(len(self.lengths), spec.batch_size, accumulation)
            return per_epoch, spec.max_steps or per_epoch * spec.num_epochs
        epochs = 1 if spec.max_steps else spec.num_epochs
        counts = [math.ceil(len(self._epoch(e)) / accumulation) for e in range(epochs)]
        return counts[0], spec.max_steps or sum(counts)

    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(
                self.lengths,
                self.spec.batch_size,
                self.spec.seed,
                epoch,
                packing=self.spec.packing,
                max_tokens=self.spec.max_tokens_per_batch,
            )
            self._epoch_cache = (epoch, batches)
        return self._epoch_cache[1]

    def _next_window(self) -> list[Batch]:
        """The micro-batches of the next optimizer step; advances the data position."""
        batches = self._epoch(self.state.epoch)
        start = self.state.batch_index
        window = batches[start : start + self.spec.gradient_accumulation_steps]
        self.state.batch_index += len(window)
        if self.state.batch_index >= len(batches):
            self.state.epoch += 1
            self.state.batch_index = 0
        examples = self.data.train.examples
        return [self._collate([examples[i] for i in ids]) for ids in window]

    # -- steps --------------------------------------------------------------------------
    def optimizer_step(self) -> tuple[float, float, float]:
        """One optimizer update; returns (token-mean loss, grad norm before clipping, lr).

        The step's token accuracy is left in `last_step_accuracy`. With fp16 the loss is
        scaled; a step whose gradients overflow updates nothing (the scaler backs off, the
        scheduler does not advance), counts in `skipped_steps` and reports an infinite norm.
        """
        window = self._next_window()
        n_targets = sum(b.target_tokens for b in window)
        self.model.train()
        loss_value, correct = 0.0, 0
        for batch in window:
            result = batch_loss(self.model, batch.to(self.device), dtype=self.dtype)
            loss = result.loss / n_targets
            self.scaler.scale(loss).backward()
            loss_value += float(loss.detach())
            correct += int(result.correct)
            self.state.real_tokens += batch.real_tokens
            self.state.processed_tokens += batch.processed_tokens
            self.state.target_tokens += batch.target_tokens
        grad_norm, lr = self.apply_update()
        accuracy = correct / n_targets if n_targets else 0.0
        self.last_step_accuracy = accuracy
        tokens = sum(b.real_tokens for b in window)
        self.state.history.append(
            {
                "step": self.state.step,
                "loss": loss_value,
                "lr": lr,
                "accuracy": accuracy,
                "tokens": tokens,
            }
        )
        return loss_value, grad_norm, lr

    def apply_update(self) -> tuple[float, float]:
        """Clip, step the optimizer through the scaler and the schedule, advance the step
        count; returns (grad norm before clipping, lr used). With fp16 a step whose gradients
        overflow updates nothing (the scaler backs off, the scheduler does not advance) and
        counts in `skipped_steps`."""
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.scaler.is_enabled() and self.scaler.get_scale() < scale:
            self.state.skipped_steps += 1  # overflow: the optimizer skipped this update
        else:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        return grad_norm, lr

    def evaluate(self) -> float | None:
        result = evaluate_batches(self.model, self.data.eval_batches, self.device, dtype=self.dtype)
        if result is None:
            return None
        loss, accuracy = result.loss, result.mean_token_accuracy
        self.state.evals.append(
            {"step": self.state.step, "eval_loss": loss, "eval_accuracy": accuracy}
        )
        self.hooks.on_evaluation(
            EvalMetrics(
                step=self.state.step,
                eval_loss=loss,
                perplexity=_perplexity(loss),
                mean_token_accuracy=accuracy,
            )
        )
        return loss

    def save_checkpoint(self, session_start: float) -> Path:
        state = asdict(self.state)
        state["wall_seconds"] += time.monotonic() - session_start
        state["scheduler"] = self.scheduler.state_dict()
        if self.scaler.is_enabled():
            state["scaler"] = self.scaler.state_dict()
        state["dataset_sha256"] = self.fingerprint
        path = ckpt.write_checkpoint(
            self.output_dir / CHECKPOINT_DIR,
            self.state.step,
            spec=self.spec,
            adapter=get_peft_model_state_dict(self.model),
            optimizer_state=self.optimizer.state_dict(),
            state=state,
        )
        self.last_checkpoint = path
        self.hooks.on_checkpoint(path, self.state.step)
        return path

    def metrics(self, eval_loss_after: float | None, session_start: float) -> dict[str, Any]:
        s = self.state
        before = s.eval_loss_before
        metrics: dict[str, Any] = {
            "eval_loss_before": before,
            "eval_loss_after": eval_loss_after,
            "perplexity_before": None if before is None else _perplexity(before),
            "perplexity_after": None if eval_loss_after is None else _perplexity(eval_loss_after),
            "train_tokens": s.real_tokens,
            "target_tokens": s.target_tokens,
            "processed_tokens": s.processed_tokens,
            "padding_fraction": 1 - s.real_tokens / s.processed_tokens if s.processed_tokens else 0,
            "wall_seconds": s.wall_seconds + time.monotonic() - session_start,
            "peak_rss_bytes": peak_rss_bytes(),
            "steps": s.step,
            "total_steps": self.total_steps,
            "steps_per_epoch": self.steps_per_epoch,
            "train_examples": len(self.data.train.examples),
            "validation_examples": len(self.data.validation.examples),
            "truncated_rows": self.data.train.truncated_rows + self.data.validation.truncated_rows,
            "dropped_rows": self.data.train.dropped_rows + self.data.validation.dropped_rows,
            "trainable_params": self.trainable_params,
            "total_params": self.total_params,
            "device": str(self.device),
            "compute_dtype": DTYPE_NAMES[self.dtype],
            "gradient_checkpointing": self.checkpointing.enabled,
            "gradient_checkpointing_reason": self.checkpointing.reason,
            "skipped_steps": s.skipped_steps,
            "train_mean_token_accuracy": s.history[-1].get("accuracy") if s.history else None,
            "valid_mean_token_accuracy": s.evals[-1].get("eval_accuracy") if s.evals else None,
            "history": s.history,
            "evals": s.evals,
        }
        if self.device.type == "cuda":
            metrics["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        if self.cpu_threads is not None:
            metrics["cpu_threads"] = self.cpu_threads.threads
            metrics["cpu_thread_choices"] = self.cpu_threads.choices
        return metrics

    def close(self) -> None:
        for name in ("model", "optimizer", "scheduler", "scaler", "params", "data"):
            if hasattr(self, name):
                delattr(self, name)
        # On a GPU the next job needs the memory back now: collect cycles, return the cache.
        # On the CPU, reference counting frees the tensors; a caller that runs many jobs in
        # one process (the worker) collects after it has reported the result.
        if self.device.type == "cuda":
            gc.collect()
            torch.cuda.empty_cache()


def _perplexity(loss: float) -> float:
    return float(torch.tensor(loss).exp())


def train(
    spec: TrainSpec,
    dataset_path: Path,
    output_dir: Path,
    hooks: TrainHooks | None = None,
    *,
    validation_path: Path | None = None,
    resume_from: Path | None = None,
    base_model_path: Path | None = None,
    init_adapter: Path | None = None,
) -> TrainResult:
    """Fine-tune `spec.base_model` (or `base_model_path`) with QLoRA on a JSONL file.

    Writes the PEFT adapter, `metrics.json`, `train_spec.json` and a model card to
    `output_dir`; checkpoints go to `output_dir/checkpoints/step-{n}/` and are removed when
    the run finishes. `resume_from` is such a checkpoint folder; it is verified before
    anything is loaded and must match the spec and dataset (CheckpointError otherwise).
    `init_adapter` (an `adapter_model.safetensors`) is the LoRA start of a fresh run that
    continues a trained adapter; a resumed run takes its weights from the checkpoint instead.
    """
    session_start = time.monotonic()
    reset_peak_memory()
    hooks = hooks or TrainHooks()
    output_dir = Path(output_dir)
    checkpoint = ckpt.read_checkpoint(Path(resume_from)) if resume_from is not None else None
    if checkpoint is not None:
        ckpt.check_resumable(
            checkpoint, spec, dataset_fingerprint(Path(dataset_path), validation_path)
        )
    model_path = Path(base_model_path) if base_model_path is not None else Path(spec.base_model)
    cpu_threads = CpuThreads() if training_device().type == "cpu" else None
    if cpu_threads is not None:
        cpu_threads.start()
    try:
        run_type: type[_Run] = _Run
        if spec.method == "dpo":  # preference pairs and the DPO loss (worker/training/dpo.py)
            from worker.training.dpo import DpoRun

            run_type = DpoRun
        run = run_type(
            spec, model_path, Path(dataset_path), validation_path, output_dir, hooks, cpu_threads
        )
        try:
            if checkpoint is not None:
                run.restore(checkpoint)
            else:
                if init_adapter is not None:
                    ckpt.load_adapter_weights(run.model, Path(init_adapter))
                run.state.eval_loss_before = run.evaluate()
            return _loop(run, session_start)
        finally:
            run.close()
    finally:
        if cpu_threads is not None:
            cpu_threads.restore()


def _loop(run: _Run, session_start: float) -> TrainResult:
    spec, hooks, state = run.spec, run.hooks, run.state
    first_step, loop_start = state.step, time.monotonic()
    tokens_at_start = state.real_tokens
    while state.step < run.total_steps:
        if run.cpu_threads is not None:
            run.cpu_threads.between_steps()
        loss, grad_norm, lr = run.optimizer_step()
        elapsed = time.monotonic() - loop_start
        done = state.step - first_step
        hooks.on_progress(
            StepMetrics(
                step=state.step,
                total_steps=run.total_steps,
                loss=loss,
                lr=lr,
                grad_norm=grad_norm,
                tokens_per_second=(state.real_tokens - tokens_at_start) / max(elapsed, 1e-9),
                eta_seconds=elapsed / done * (run.total_steps - state.step),
                mean_token_accuracy=run.last_step_accuracy,
                compute_dtype=DTYPE_NAMES[run.dtype],
            )
        )
        unfinished = state.step < run.total_steps
        if spec.eval_steps and state.step % spec.eval_steps == 0 and unfinished:
            run.evaluate()
        checkpointed = False
        if spec.checkpoint_steps and state.step % spec.checkpoint_steps == 0 and unfinished:
            run.save_checkpoint(session_start)
            checkpointed = True
        request = hooks.should_stop()
        if request is StopRequest.CANCEL:
            return _stopped(run, StopRequest.CANCEL)
        if request is StopRequest.PREEMPT and not unfinished:
            # The last step is done: finishing (final evaluation, adapter) is what a resume
            # would do anyway, so the run finishes and says so instead of checkpointing.
            log.info("preemption requested after the last step: finishing the run")
        elif request is StopRequest.PREEMPT:
            if not checkpointed:
                run.save_checkpoint(session_start)
            return _stopped(run, StopRequest.PREEMPT)
    eval_loss_after = run.evaluate()
    metrics = run.metrics(eval_loss_after, session_start)
    write_outputs(run.model, run.output_dir, spec, metrics)
    return TrainResult(
        stopped=None,
        step=state.step,
        total_steps=run.total_steps,
        output_dir=run.output_dir,
        metrics=metrics,
        trained_tokens=state.real_tokens,
        trainable_params=run.trainable_params,
        total_params=run.total_params,
    )


def _stopped(run: _Run, request: StopRequest) -> TrainResult:
    return TrainResult(
        stopped=request,
        step=run.state.step,
        total_steps=run.total_steps,
        output_dir=None,
        metrics={},
        trained_tokens=run.state.real_tokens,
        trainable_params=run.trainable_params,
        total_params=run.total_params,
        checkpoint=run.last_checkpoint if request is StopRequest.PREEMPT else None,
    )
