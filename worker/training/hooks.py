"""The engine's contract with its callers: hooks in, a result out."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StopRequest(enum.StrEnum):
    """What `TrainHooks.should_stop` may ask for."""

    CANCEL = "cancel"  # stop now, keep nothing
    PREEMPT = "preempt"  # finish the step, write a checkpoint, then stop


class TrainHooks:
    """No-op callbacks; subclass and override what you need. All run on the training thread."""

    def on_progress(
        self,
        step: int,
        total_steps: int,
        loss: float,
        lr: float,
        grad_norm: float,
        tokens_per_s: float,
        eta_s: float,
    ) -> None:
        """After every optimizer step; `loss` is the step's token-mean training loss."""

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        """After every evaluation on the validation split (including before step 1)."""

    def on_checkpoint(self, path: Path, step: int) -> None:
        """After a checkpoint folder is complete (fsynced, manifest written)."""

    def should_stop(self) -> StopRequest | None:
        """Polled after every optimizer step."""
        return None


@dataclass
class TrainResult:
    """What a run produced. `output_dir` holds the PEFT adapter when `stopped` is None."""

    stopped: StopRequest | None
    step: int
    total_steps: int
    output_dir: Path | None
    metrics: dict[str, Any] = field(default_factory=dict)
    trained_tokens: int = 0
    trainable_params: int = 0
    total_params: int = 0
    checkpoint: Path | None = None
