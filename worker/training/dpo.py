"""Direct Preference Optimization (DPO) on the 4-bit base: pairs, the loss, and the run.

* A preference row (`shared.preference_format`) is rendered through the base model's chat
  template twice: the conversation (`input.messages`) followed by the preferred answer, and by
  the non-preferred one (`chat.answer_sequence`, the chat rows' renderer). Only the answer's
  turn is trained (its content and the end-of-turn tokens the template adds).
* A micro-batch of `batch_size` pairs holds their `2 * batch_size` sequences, chosen ones
  first, then rejected ones, packed or padded as the spec says.
* The policy's log-probability of an answer is the sum over its target tokens. The
  reference's is the same sum computed by the same model under `model.disable_adapter()` and
  `torch.no_grad()`: the 4-bit base with the LoRA switched off. No second model is loaded.
* loss = -log sigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))), the mean over the pairs of an
  optimizer step (Rafailov et al. 2023, eq. 7, the "sigmoid" loss of TRL's DPOTrainer).
* Reported per step and per evaluation: the loss, the rewards `beta * (pi - ref)` of the chosen
  and the rejected answers, their margin, and the preference accuracy (chosen reward above the
  rejected one; a tie, as at step 0, is not a win).

`DpoRun` is the loop's `_Run` with these data, step and evaluation; checkpoints, resume,
preemption and cancellation are the loop's own, so they behave as for supervised runs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from peft import PeftModel
from torch.nn import functional as F

from shared.dataset_format import DatasetFormat, detect_row_format
from shared.preference_format import NON_PREFERRED, PREFERRED, output_message, prompt_messages
from shared.train_spec import TrainSpec
from worker.training.chat import RenderError, answer_sequence
from worker.training.data import (
    IGNORE_INDEX,
    Batch,
    DataError,
    Example,
    Row,
    TokenizedSplit,
    Tokenizer,
    collate,
    read_rows,
    split_rows,
)
from worker.training.data import _unrenderable as unrenderable_rows  # one message style
from worker.training.hooks import PreferenceMetrics, StepMetrics, StopRequest, TrainHooks
from worker.training.loop import PreparedData, _Run
from worker.training.losses import chunked_target_logprobs
from worker.training.model import autocast, target_states

REFERENCE_POLICY = "the base model with the adapter disabled"


# -- data -------------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class PreferencePair(Example):
    """A preference row's two sequences. As an `Example` it is both end to end: its length and
    target count are what batching, data order and token counters use."""

    chosen: Example
    rejected: Example


def make_pair(chosen: Example, rejected: Example) -> PreferencePair:
    return PreferencePair(
        input_ids=chosen.input_ids + rejected.input_ids,
        trained=chosen.trained + rejected.trained,
        chosen=chosen,
        rejected=rejected,
    )


def tokenize_preference_row(row: dict[str, Any], tokenizer: Tokenizer) -> PreferencePair:
    """Both sequences of a valid preference row, each the conversation and one answer rendered
    and tokenized at once (`chat.answer_sequence`); only the answer's turn is trained."""
    messages, tools = prompt_messages(row), row["input"].get("tools")
    sides = [
        Example(*answer_sequence(tokenizer, [*messages, output_message(row, key)], tools))
        for key in (PREFERRED, NON_PREFERRED)
    ]
    return make_pair(*sides)


def _cut(example: Example, length: int) -> Example:
    return Example(example.input_ids[:length], example.trained[:length])


def tokenize_preference_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_seq_length: int
) -> TokenizedSplit:
    """Pairs, each side cut to `max_seq_length`; a pair with a side left without any answer
    token is dropped (and counted)."""
    pairs: list[Example] = []
    truncated = dropped = 0
    problems: dict[str, list[tuple[str, int]]] = {}
    for index, row in enumerate(rows):
        try:
            pair = tokenize_preference_row(row, tokenizer)
        except RenderError as exc:  # reported all at once, by line, as for chat rows
            place = (row.source, row.line) if isinstance(row, Row) else ("", index + 1)
            problems.setdefault(exc.reason, []).append(place)
            continue
        chosen, rejected = pair.chosen, pair.rejected
        if max(len(chosen), len(rejected)) > max_seq_length:
            truncated += 1
            chosen, rejected = _cut(chosen, max_seq_length), _cut(rejected, max_seq_length)
        if chosen.target_count() == 0 or rejected.target_count() == 0:
            dropped += 1
            continue
        pairs.append(make_pair(chosen, rejected))
    if problems:
        raise unrenderable_rows(problems)
    return TokenizedSplit(pairs, truncated, dropped)


@dataclass(frozen=True, kw_only=True)
class PairBatch(Batch):
    """A micro-batch of `pairs` preference pairs: sequences 0..pairs-1 are the chosen answers,
    pairs..2*pairs-1 the rejected ones; `owner[b, t]` is the sequence position t belongs to."""

    owner: torch.Tensor
    pairs: int

    def to(self, device: torch.device) -> PairBatch:
        moved = Batch.to(self, device)
        return _pair_batch(moved, self.owner.to(device), self.pairs)


def _pair_batch(batch: Batch, owner: torch.Tensor, pairs: int) -> PairBatch:
    values = {f.name: getattr(batch, f.name) for f in dataclasses.fields(Batch)}
    return PairBatch(**values, owner=owner, pairs=pairs)


def collate_pairs(pairs: Sequence[Example], *, packing: bool, pad_id: int) -> PairBatch:
    """The chosen then the rejected sequences of `pairs`, through the engine's `collate`."""
    typed = [cast(PreferencePair, p) for p in pairs]
    sequences = [p.chosen for p in typed] + [p.rejected for p in typed]
    batch = collate(sequences, packing=packing, pad_id=pad_id)
    if packing:
        owner = torch.tensor([[i for i, e in enumerate(sequences) for _ in range(len(e))]])
    else:
        owner = torch.arange(len(sequences)).unsqueeze(1).expand_as(batch.targets).contiguous()
    if owner.shape != batch.targets.shape:
        raise AssertionError("collate changed its layout; the pair owners no longer line up")
    return _pair_batch(batch, owner, len(typed))


def _preference_rows(path: Path) -> list[dict[str, Any]]:
    rows = read_rows(path)
    fmt = detect_row_format(rows[0])
    if fmt is not DatasetFormat.PREFERENCE:
        raise DataError(
            f"{path}: method dpo trains on preference rows (input, preferred_output, "
            f"non_preferred_output); this file holds {fmt.value} rows"
        )
    return rows


def prepare_pairs(
    spec: TrainSpec, tokenizer: Tokenizer, dataset_path: Path, validation_path: Path | None
) -> PreparedData:
    """Tokenized pairs of the training rows and of the validation rows (a file, or a seeded
    split), and the evaluation's micro-batches."""
    rows = _preference_rows(dataset_path)
    if validation_path is not None:
        val_rows = _preference_rows(validation_path)
    else:
        rows, val_rows = split_rows(rows, spec.validation_fraction, spec.seed)
    train = tokenize_preference_rows(rows, tokenizer, spec.max_seq_length)
    validation = tokenize_preference_rows(val_rows, tokenizer, spec.max_seq_length)
    if not train.examples:
        raise DataError(
            f"{dataset_path}: no preference row has answer tokens within max_seq_length"
        )
    pad_id = cast(int, tokenizer.pad_token_id)
    held = validation.examples
    batches: list[Batch] = [
        collate_pairs(held[i : i + spec.batch_size], packing=spec.packing, pad_id=pad_id)
        for i in range(0, len(held), spec.batch_size)
    ]
    return PreparedData(train, validation, batches)


# -- log-probabilities and the loss -----------------------------------------------------------
def sequence_logps(
    model: PeftModel, batch: PairBatch, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Summed log-probability of each sequence's targets: `2 * batch.pairs` values, the chosen
    answers first. The decoder runs under autocast to `dtype`; the output head only at target
    positions, in chunks of tokens (`chunked_target_logprobs`, as the supervised loss does), so
    no `[targets, vocab]` logits are held at once."""
    base, hidden, targets = target_states(model, batch, dtype)
    device = batch.input_ids.device
    with autocast(device, dtype):
        token_logps = chunked_target_logprobs(
            hidden,
            targets,
            base.get_output_embeddings(),
            softcap=getattr(base.config, "final_logit_softcapping", None),
        )
    sums = torch.zeros(2 * batch.pairs, dtype=torch.float32, device=device)
    return sums.index_add(0, batch.owner[batch.targets != IGNORE_INDEX], token_logps)


def reference_logps(
    model: PeftModel, batch: PairBatch, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """`sequence_logps` of the reference policy: the same model with its adapter disabled, in
    eval mode, without autograd. Nothing is copied: the base's weights are the reference."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), model.disable_adapter():
            return sequence_logps(model, batch, dtype)
    finally:
        model.train(was_training)


@dataclass(frozen=True)
class DpoLoss:
    """Per-pair DPO losses (differentiable) and the pairs' rewards (detached)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> DpoLoss:
    """The sigmoid DPO loss of pairs, from summed answer log-probabilities (shape [pairs])."""
    chosen_logratios = policy_chosen - reference_chosen
    rejected_logratios = policy_rejected - reference_rejected
    losses = -F.logsigmoid(beta * (chosen_logratios - rejected_logratios))
    return DpoLoss(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )


def pair_loss(policy: torch.Tensor, reference: torch.Tensor, beta: float) -> DpoLoss:
    """`dpo_loss` of a `PairBatch`'s log-probs (chosen answers first, then rejected ones)."""
    policy_chosen, policy_rejected = policy.chunk(2)
    reference_chosen, reference_rejected = reference.chunk(2)
    return dpo_loss(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta)


@dataclass
class PreferenceTotals:
    """Sums over pairs, turned into means by `metrics()`."""

    pairs: int = 0
    loss: float = 0.0
    chosen: float = 0.0
    rejected: float = 0.0
    wins: int = 0

    def add(self, result: DpoLoss) -> None:
        self.pairs += int(result.losses.numel())
        self.loss += float(result.losses.detach().sum())
        self.chosen += float(result.chosen_rewards.sum())
        self.rejected += float(result.rejected_rewards.sum())
        self.wins += int((result.chosen_rewards > result.rejected_rewards).sum())

    def metrics(self) -> PreferenceMetrics:
        n = max(self.pairs, 1)
        return PreferenceMetrics(
            loss=self.loss / n,
            reward_margin=(self.chosen - self.rejected) / n,
            chosen_reward=self.chosen / n,
            rejected_reward=self.rejected / n,
            accuracy=self.wins / n,
            pairs=self.pairs,
        )


def preference_fields(metrics: PreferenceMetrics) -> dict[str, float]:
    """The figures of `metrics` as flat, JSON-able history and event fields."""
    return {
        "reward_margin": metrics.reward_margin,
        "chosen_reward": metrics.chosen_reward,
        "rejected_reward": metrics.rejected_reward,
        "preference_accuracy": metrics.accuracy,
    }


@torch.no_grad()
def evaluate_preferences(
    model: PeftModel,
    batches: Sequence[Batch],
    device: torch.device,
    beta: float,
    dtype: torch.dtype = torch.float32,
) -> PreferenceMetrics | None:
    """The DPO loss, rewards and accuracy over held-out pairs (None without any)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    totals = PreferenceTotals()
    try:
        for raw in batches:
            batch = cast(PairBatch, raw).to(device)
            reference = reference_logps(model, batch, dtype)
            model.eval()  # reference_logps restores the mode it found
            policy = sequence_logps(model, batch, dtype)
            totals.add(pair_loss(policy, reference, beta))
    finally:
        model.train(was_training)
    return totals.metrics()


# -- the run ----------------------------------------------------------------------------------
class _ReportPreference(TrainHooks):
    """Passes every hook through, adding the step's DPO figures to `on_progress`."""

    def __init__(self, inner: TrainHooks, run: DpoRun) -> None:
        self.inner, self.run = inner, run

    def on_progress(self, metrics: StepMetrics) -> None:
        self.inner.on_progress(dataclasses.replace(metrics, preference=self.run.last_preference))

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        self.inner.on_eval(step, eval_loss, perplexity)

    def on_preference_eval(self, step: int, metrics: PreferenceMetrics) -> None:
        self.inner.on_preference_eval(step, metrics)

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.inner.on_checkpoint(path, step)

    def should_stop(self) -> StopRequest | None:
        return self.inner.should_stop()


class DpoRun(_Run):
    """A `_Run` whose examples are preference pairs and whose step minimizes the DPO loss."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.last_preference: PreferenceMetrics | None = None
        super().__init__(*args, **kwargs)
        self.hooks = _ReportPreference(self.hooks, self)

    def _prepare(self, dataset_path: Path, validation_path: Path | None) -> PreparedData:
        return prepare_pairs(self.spec, self.tokenizer, dataset_path, validation_path)

    def _collate(self, examples: list[Example]) -> Batch:
        return collate_pairs(examples, packing=self.spec.packing, pad_id=self.pad_id)

    def optimizer_step(self) -> tuple[float, float, float]:
        """One optimizer update on the DPO loss, the mean over the step's pairs; returns
        (loss, grad norm before clipping, lr) and leaves the DPO figures in `last_preference`."""
        window = [cast(PairBatch, b) for b in self._next_window()]
        n_pairs = sum(b.pairs for b in window)
        beta = self.spec.dpo_beta
        self.model.train()
        totals = PreferenceTotals()
        for raw in window:
            batch = raw.to(self.device)
            reference = reference_logps(self.model, batch, self.dtype)
            policy = sequence_logps(self.model, batch, self.dtype)
            result = pair_loss(policy, reference, beta)
            self.scaler.scale(result.losses.sum() / n_pairs).backward()
            totals.add(result)
            self.state.real_tokens += batch.real_tokens
            self.state.processed_tokens += batch.processed_tokens
            self.state.target_tokens += batch.target_tokens
        grad_norm, lr = self.apply_update()
        metrics = totals.metrics()
        self.last_preference = metrics
        self.state.history.append(
            {"step": self.state.step, "loss": metrics.loss, "lr": lr, **preference_fields(metrics)}
        )
        return metrics.loss, grad_norm, lr

    def evaluate(self) -> float | None:
        metrics = evaluate_preferences(
            self.model, self.data.eval_batches, self.device, self.spec.dpo_beta, self.dtype
        )
        if metrics is None:
            return None
        step = self.state.step
        self.state.evals.append(
            {"step": step, "eval_loss": metrics.loss, **preference_fields(metrics)}
        )
        self.hooks.on_preference_eval(step, metrics)
        return metrics.loss

    def metrics(self, eval_loss_after: float | None, session_start: float) -> dict[str, Any]:
        metrics = super().metrics(eval_loss_after, session_start)
        evals = self.state.evals
        before = evals[0] if evals and evals[0]["step"] == 0 else None
        metrics.update(
            {
                "method": "dpo",
                "dpo_beta": self.spec.dpo_beta,
                "reference_policy": REFERENCE_POLICY,
                "perplexity_before": None,  # a DPO loss has no perplexity
                "perplexity_after": None,
                "train_mean_token_accuracy": None,
                "valid_mean_token_accuracy": None,
                "eval_preference_before": before,
                "eval_preference_after": evals[-1] if eval_loss_after is not None else None,
                "train_preference": self.state.history[-1] if self.state.history else None,
            }
        )
        return metrics


__all__ = [
    "DpoLoss",
    "DpoRun",
    "PairBatch",
    "PreferencePair",
    "collate_pairs",
    "dpo_loss",
    "evaluate_preferences",
    "prepare_pairs",
    "reference_logps",
    "sequence_logps",
    "tokenize_preference_rows",
]
