"""The engine's contract with its callers: hooks in, a result out."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class StopRequest(enum.StrEnum):
    """What `TrainHooks.should_stop` may ask for."""

    CANCEL = "cancel"  # stop now, keep nothing
    PREEMPT = "preempt"  # finish the step, write a checkpoint, then stop


@dataclass(frozen=True)
class PreferenceMetrics:
    """DPO figures of a step or an evaluation, means over its preference pairs. A reward is
    `beta * (log pi(y|x) - log ref(y|x))` of a completion's summed log-probs."""

    loss: float
    reward_margin: float  # chosen reward minus rejected reward
    chosen_reward: float
    rejected_reward: float
    accuracy: float  # share of pairs whose chosen reward exceeds the rejected one
    pairs: int


@dataclass(frozen=True)
class StepMetrics:
    """What one optimizer step reports to `TrainHooks.on_progress`."""

    step: int
    total_steps: int
    loss: float  # the step's token-mean training loss
    lr: float
    grad_norm: float  # before clipping
    tokens_per_second: float  # non-padding tokens since this session started
    eta_seconds: float
    preference: PreferenceMetrics | None = None  # DPO runs only
    # share of the step's target tokens whose argmax logit is the label (OpenAI's
    # train_mean_token_accuracy); computed from the loss's own logits
    mean_token_accuracy: float | None = None
    compute_dtype: str | None = None  # the resolved autocast dtype, e.g. "bfloat16"


@dataclass(frozen=True)
class EvalMetrics:
    """What one evaluation on the validation split reports to `TrainHooks.on_evaluation`."""

    step: int
    eval_loss: float  # token-mean cross-entropy
    perplexity: float
    mean_token_accuracy: float  # OpenAI's valid_mean_token_accuracy


class SpecError(ValueError):
    """The spec asks for something this base model does not have (names the field)."""


class TrainHooks:
    """No-op callbacks; subclass and override what you need. All run on the training thread."""

    def on_progress(self, metrics: StepMetrics) -> None:
        """After every optimizer step."""

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        """After every evaluation on the validation split (including before step 1)."""

    def on_evaluation(self, metrics: EvalMetrics) -> None:
        """After every evaluation, with all its figures; by default calls `on_eval`."""
        self.on_eval(metrics.step, metrics.eval_loss, metrics.perplexity)

    def on_preference_eval(self, step: int, metrics: PreferenceMetrics) -> None:
        """After every evaluation of a DPO run; by default reported as `on_eval` of the DPO
        loss (whose exponential is no perplexity, but keeps a plain hook's series whole)."""
        self.on_eval(step, metrics.loss, math.exp(min(metrics.loss, 50.0)))

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
