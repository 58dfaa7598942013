"""`train()`: the training loop, with evaluation, hooks, checkpoints and exact resume."""

from __future__ import annotations

import gc
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from shared.train_spec import TrainSpec
from worker.training import checkpoint as ckpt
from worker.training.data import (
    Batch,
    TokenizedSplit,
    collate,
    epoch_batches,
    read_rows,
    split_rows,
    steps_per_epoch,
    tokenize_rows,
)
from worker.training.hooks import StopRequest, TrainHooks, TrainResult
from worker.training.model import (
    attach_lora,
    build_optimizer,
    build_scheduler,
    evaluate,
    load_base_model,
    load_tokenizer,
    parameter_counts,
    summed_loss,
    training_device,
)
from worker.training.output import peak_rss_bytes, write_outputs

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
    if validation_path is not None:
        val_rows = read_rows(validation_path)
    else:
        rows, val_rows = split_rows(rows, spec.validation_fraction, spec.seed)
    train_split = tokenize_rows(rows, tokenizer, spec.max_seq_length)
    val_split = tokenize_rows(val_rows, tokenizer, spec.max_seq_length)
    if not train_split.examples:
        raise ValueError(f"{dataset_path}: no row has a trainable token within max_seq_length")
    examples = val_split.examples
    eval_batches = [
        collate(
            examples[i : i + spec.batch_size], packing=spec.packing, pad_id=tokenizer.pad_token_id
        )
        for i in range(0, len(examples), spec.batch_size)
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
    ) -> None:
        self.spec, self.hooks, self.output_dir = spec, hooks, output_dir
        self.device = training_device()
        self.tokenizer = load_tokenizer(model_path)
        self.pad_id: int = self.tokenizer.pad_token_id
        self.data = prepare_data(spec, self.tokenizer, dataset_path, validation_path)
        self.fingerprint = dataset_fingerprint(dataset_path, validation_path)
        self.model: PeftModel = attach_lora(load_base_model(spec, model_path, self.device), spec)
        self.trainable_params, self.total_params = parameter_counts(self.model)
        log.info(
            "trainable params: %d of %d (%.4f%%)",
            self.trainable_params,
            self.total_params,
            100 * self.trainable_params / self.total_params,
        )
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(self.params, spec)
        n_train = len(self.data.train.examples)
        self.steps_per_epoch = steps_per_epoch(
            n_train, spec.batch_size, spec.gradient_accumulation_steps
        )
        self.total_steps = spec.max_steps or self.steps_per_epoch * spec.num_epochs
        self.scheduler = build_scheduler(self.optimizer, spec, self.total_steps)
        self.lengths = [len(e) for e in self.data.train.examples]
        self.state = RunState()
        self._epoch_cache: tuple[int, list[list[int]]] | None = None
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
        state.pop("dataset_sha256", None)
        self.state = RunState(**state)
        ckpt.restore_rng(checkpoint.rng)

    # -- data ---------------------------------------------------------------------------
    def _epoch(self, epoch: int) -> list[list[int]]:
        if self._epoch_cache is None or self._epoch_cache[0] != epoch:
            batches = epoch_batches(
                self.lengths,
                self.spec.batch_size,
                self.spec.seed,
                epoch,
                packing=self.spec.packing,
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
        return [
            collate(
                [examples[i] for i in ids],
                packing=self.spec.packing,
                pad_id=self.pad_id,
            )
            for ids in window
        ]

    # -- steps --------------------------------------------------------------------------
    def optimizer_step(self) -> tuple[float, float, float]:
        """One optimizer update; returns (token-mean loss, grad norm before clipping, lr)."""
        window = self._next_window()
        n_targets = sum(b.target_tokens for b in window)
        self.model.train()
        loss_value = 0.0
        for batch in window:
            loss = summed_loss(self.model, batch.to(self.device)) / n_targets
            loss.backward()
            loss_value += float(loss.detach())
            self.state.real_tokens += batch.real_tokens
            self.state.processed_tokens += batch.processed_tokens
            self.state.target_tokens += batch.target_tokens
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, self.spec.max_grad_norm))
        lr = float(self.scheduler.get_last_lr()[0])
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.history.append({"step": self.state.step, "loss": loss_value, "lr": lr})
        return loss_value, grad_norm, lr

    def evaluate(self) -> float | None:
        loss = evaluate(self.model, self.data.eval_batches, self.device)
        if loss is not None:
            self.state.evals.append({"step": self.state.step, "eval_loss": loss})
            self.hooks.on_eval(self.state.step, loss, _perplexity(loss))
        return loss

    def save_checkpoint(self, session_start: float) -> Path:
        state = asdict(self.state)
        state["wall_seconds"] += time.monotonic() - session_start
        state["scheduler"] = self.scheduler.state_dict()
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
            "history": s.history,
            "evals": s.evals,
        }
        if self.device.type == "cuda":
            metrics["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
        return metrics

    def close(self) -> None:
        for name in ("model", "optimizer", "scheduler", "params", "data"):
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
) -> TrainResult:
    """Fine-tune `spec.base_model` (or `base_model_path`) with QLoRA on a JSONL file.

    Writes the PEFT adapter, `metrics.json`, `train_spec.json` and a model card to
    `output_dir`; checkpoints go to `output_dir/checkpoints/step-{n}/` and are removed when
    the run finishes. `resume_from` is such a checkpoint folder; it is verified before
    anything is loaded and must match the spec and dataset (CheckpointError otherwise).
    """
    session_start = time.monotonic()
    hooks = hooks or TrainHooks()
    output_dir = Path(output_dir)
    checkpoint = ckpt.read_checkpoint(Path(resume_from)) if resume_from is not None else None
    if checkpoint is not None:
        ckpt.check_resumable(
            checkpoint, spec, dataset_fingerprint(Path(dataset_path), validation_path)
        )
    model_path = Path(base_model_path) if base_model_path is not None else Path(spec.base_model)
    run = _Run(spec, model_path, Path(dataset_path), validation_path, output_dir, hooks)
    try:
        if checkpoint is not None:
            run.restore(checkpoint)
        else:
            run.state.eval_loss_before = run.evaluate()
        return _loop(run, session_start)
    finally:
        run.close()


def _loop(run: _Run, session_start: float) -> TrainResult:
    spec, hooks, state = run.spec, run.hooks, run.state
    first_step, loop_start = state.step, time.monotonic()
    tokens_at_start = state.real_tokens
    while state.step < run.total_steps:
        loss, grad_norm, lr = run.optimizer_step()
        elapsed = time.monotonic() - loop_start
        done = state.step - first_step
        hooks.on_progress(
            state.step,
            run.total_steps,
            loss,
            lr,
            grad_norm,
            (state.real_tokens - tokens_at_start) / max(elapsed, 1e-9),
            elapsed / done * (run.total_steps - state.step),
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
        if request is StopRequest.PREEMPT:
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
