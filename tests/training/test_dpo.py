"""DPO in the engine: the loss against the published formula and TRL's, the reference policy is
the base with the adapter off (and no second model is loaded), a tiny preference task learns,
and a preempted DPO run resumes to the uninterrupted run's adapter."""

from __future__ import annotations

import math
import random
import shutil
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file

from tests.training.helpers import ANSWER, small_spec, template_prompt, write_jsonl
from worker.training import StepMetrics, StopRequest, TrainHooks, TrainResult, train
from worker.training.data import IGNORE_INDEX
from worker.training.dpo import (
    PairBatch,
    collate_pairs,
    dpo_loss,
    reference_logps,
    sequence_logps,
    tokenize_preference_rows,
)
from worker.training.hooks import PreferenceMetrics
from worker.training.model import load_base_model, load_tokenizer, training_device

REJECTED = ["Go away now.", "I will not.", "Who are you?", "No thanks!", "Leave me alone."]
BETA = 0.1
STEPS, K = 8, 4  # the learning run's steps; the resume test preempts after step K


def preference_rows(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Greetings where ANSWER is preferred to a curt refusal, whatever the name."""
    rng = random.Random(seed)
    return [
        {
            "input": {"messages": [{"role": "user", "content": template_prompt(rng)}]},
            "preferred_output": [{"role": "assistant", "content": ANSWER}],
            "non_preferred_output": [{"role": "assistant", "content": rng.choice(REJECTED)}],
        }
        for _ in range(n)
    ]


# -- (a) the loss ---------------------------------------------------------------------------------
def fixed_logps() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Summed answer log-probs of 6 pairs: (policy chosen, policy rejected, ref chosen, ref
    rejected), with wins, losses, a tie and large ratios."""
    policy_chosen = torch.tensor([-12.5, -30.0, -8.25, -40.0, -5.0, -17.0])
    policy_rejected = torch.tensor([-15.0, -22.0, -8.25, -90.0, -6.5, -16.0])
    reference_chosen = torch.tensor([-13.0, -29.0, -9.0, -55.0, -5.0, -20.0])
    reference_rejected = torch.tensor([-14.0, -25.0, -9.0, -60.0, -4.0, -15.5])
    return policy_chosen, policy_rejected, reference_chosen, reference_rejected


def published_loss(pc: float, pr: float, rc: float, rr: float, beta: float) -> float:
    """Rafailov et al. 2023, eq. 7, one pair, in plain floats: -log sigma(beta * h)."""
    h = (pc - rc) - (pr - rr)
    return math.log1p(math.exp(-beta * h))


def trl_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float, tmp: Path
) -> tuple[float, dict[str, list[float]]]:
    """TRL's DPOTrainer loss (and its logged rewards) on the same summed log-probs: its
    `_compute_loss` with precomputed reference log-probs and a stand-in model whose per-token
    log-probs sum to ours."""
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp), beta=beta, report_to=[], use_cpu=True, bf16=False)
    n, width = pc.numel(), 4
    per_token = torch.zeros(2 * n, width - 1)
    per_token[:, 0] = torch.cat([pc, pr])  # the trainer sums over the sequence
    outputs = SimpleNamespace(
        log_probs=per_token,
        entropy=torch.zeros(2 * n, width - 1),
        mean_logits=torch.zeros(2 * n, width - 1),
        is_top1=torch.zeros(2 * n, width - 1, dtype=torch.bool),
    )
    completion = torch.zeros(2 * n, width, dtype=torch.long)
    completion[:, 1] = 1
    trainer = SimpleNamespace(
        model=SimpleNamespace(training=True),
        accelerator=SimpleNamespace(
            device=torch.device("cpu"), gather=lambda x: x, gather_for_metrics=lambda x: x
        ),
        aux_loss_enabled=False,
        ld_alpha=args.ld_alpha,
        precompute_ref_logps=True,
        f_divergence_type=args.f_divergence_type,
        loss_types=args.loss_type,
        loss_weights=args.loss_weights or [1.0] * len(args.loss_type),
        beta=args.beta,
        label_smoothing=args.label_smoothing,
        use_weighting=args.use_weighting,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0,
        _tp_size=1,
    )
    inputs = {
        "input_ids": torch.ones(2 * n, width, dtype=torch.long),
        "attention_mask": torch.ones(2 * n, width, dtype=torch.long),
        "completion_mask": completion,
        "ref_chosen_logps": rc,
        "ref_rejected_logps": rr,
    }
    loss = DPOTrainer._compute_loss(trainer, lambda **_: outputs, inputs, False)  # type: ignore[arg-type,no-untyped-call]
    return float(loss), dict(trainer._metrics["train"])


def test_loss_matches_the_published_formula_and_trl(tmp_path: Path) -> None:
    pc, pr, rc, rr = fixed_logps()
    result = dpo_loss(pc, pr, rc, rr, BETA)
    expected = [
        published_loss(float(a), float(b), float(c), float(d), BETA)
        for a, b, c, d in zip(pc, pr, rc, rr, strict=True)
    ]
    for ours, theirs in zip(result.losses.tolist(), expected, strict=True):
        assert abs(ours - theirs) <= 1e-5
    assert abs(expected[2] - math.log(2)) <= 1e-9  # the tie: sigma(0) = 1/2
    rewards = [BETA * (float(a) - float(b)) for a, b in zip(pc, rc, strict=True)]
    assert torch.allclose(result.chosen_rewards, torch.tensor(rewards), atol=1e-5)

    trl_value, logged = trl_loss(pc, pr, rc, rr, BETA, tmp_path)
    assert abs(float(result.losses.mean()) - trl_value) <= 1e-5
    margins = result.chosen_rewards - result.rejected_rewards
    assert abs(logged["rewards/chosen"][0] - float(result.chosen_rewards.mean())) <= 1e-5
    assert abs(logged["rewards/rejected"][0] - float(result.rejected_rewards.mean())) <= 1e-5
    assert abs(logged["rewards/margins"][0] - float(margins.mean())) <= 1e-5
    assert logged["rewards/accuracies"][0] == pytest.approx(float((margins > 0).float().mean()))

    # another beta, and the gradient: d loss / d pi_c = -beta * sigma(-beta * h)
    beta = 0.5
    trl_value, _ = trl_loss(pc, pr, rc, rr, beta, tmp_path)
    policy_chosen = pc.clone().requires_grad_(True)
    losses = dpo_loss(policy_chosen, pr, rc, rr, beta).losses
    assert abs(float(losses.detach().mean()) - trl_value) <= 1e-5
    losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    assert policy_chosen.grad is not None
    assert torch.allclose(policy_chosen.grad, -beta * torch.sigmoid(-beta * h), atol=1e-6)


# -- (c) a tiny preference task, (b) the reference policy -----------------------------------------
class DpoHooks(TrainHooks):
    def __init__(self, stop_at: int | None = None) -> None:
        self.progress: list[StepMetrics] = []
        self.evals: list[tuple[int, PreferenceMetrics]] = []
        self.checkpoints: list[tuple[Path, int]] = []
        self.stop_at = stop_at

    def on_progress(self, metrics: StepMetrics) -> None:
        self.progress.append(metrics)

    def on_preference_eval(self, step: int, metrics: PreferenceMetrics) -> None:
        self.evals.append((step, metrics))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append((path, step))

    def should_stop(self) -> StopRequest | None:
        if self.stop_at is not None and len(self.progress) >= self.stop_at:
            return StopRequest.PREEMPT
        return None


@pytest.fixture(scope="module")
def preference_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("preference-data")
    train_path = write_jsonl(folder / "train.jsonl", preference_rows(48, seed=1))
    return train_path, write_jsonl(folder / "val.jsonl", preference_rows(12, seed=2))


def dpo_spec(model_dir: Path, **overrides: Any):  # type: ignore[no-untyped-def]
    values: dict[str, Any] = {
        "method": "dpo",
        "dpo_beta": BETA,
        "max_steps": STEPS,
        "batch_size": 4,
        "gradient_accumulation_steps": 1,
        "dropout": 0.1,
        "checkpoint_steps": 3,
        "warmup_ratio": 0.2,
    }
    values.update(overrides)
    return small_spec(model_dir, **values)


@pytest.fixture(scope="module")
def learned(
    tiny_model_dir: Path,
    preference_data: tuple[Path, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> tuple[TrainResult, DpoHooks, int]:
    """One DPO run on the greeting preferences; counts the base models it loads."""
    import worker.training.model as model_module

    loads = 0
    original = model_module.AutoModelForCausalLM.from_pretrained

    def counting(*args: Any, **kwargs: Any) -> Any:
        nonlocal loads
        loads += 1
        return original(*args, **kwargs)

    train_path, val_path = preference_data
    hooks = DpoHooks()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(model_module.AutoModelForCausalLM, "from_pretrained", counting)
        result = train(
            dpo_spec(tiny_model_dir),
            train_path,
            tmp_path_factory.mktemp("dpo-learned"),
            hooks,
            validation_path=val_path,
        )
    return result, hooks, loads


@pytest.mark.slow
def test_held_out_preference_accuracy_and_margin_rise(
    learned: tuple[TrainResult, DpoHooks, int],
) -> None:
    result, hooks, loads = learned
    assert result.stopped is None and result.step == STEPS
    assert loads == 1  # the reference is the same model: no second base is ever loaded
    (first_step, before), (last_step, after) = hooks.evals[0], hooks.evals[-1]
    assert (first_step, last_step) == (0, STEPS) and before.pairs == after.pairs == 12
    # a fresh adapter is the reference itself: every reward 0, loss log 2, no pair won
    assert before.loss == pytest.approx(math.log(2), abs=1e-6)
    assert before.reward_margin == 0 and before.accuracy == 0
    assert after.accuracy >= 0.9, after
    assert after.reward_margin > 0.5, after
    assert after.loss < 0.5 * before.loss
    assert after.chosen_reward > after.rejected_reward
    # every step reported its DPO figures, consistent with its loss
    assert [m.step for m in hooks.progress] == list(range(1, STEPS + 1))
    for metrics in hooks.progress:
        assert metrics.preference is not None
        assert metrics.preference.loss == pytest.approx(metrics.loss)
        assert metrics.preference.reward_margin == pytest.approx(
            metrics.preference.chosen_reward - metrics.preference.rejected_reward
        )
    assert hooks.progress[-1].preference.accuracy >= 0.75  # type: ignore[union-attr]
    summary = result.metrics
    assert summary["method"] == "dpo" and summary["dpo_beta"] == BETA
    assert "adapter disabled" in summary["reference_policy"]
    assert summary["eval_preference_after"]["preference_accuracy"] == after.accuracy
    assert summary["history"][-1]["reward_margin"] == pytest.approx(
        hooks.progress[-1].preference.reward_margin  # type: ignore[union-attr]
    )


def base_logps(model: Any, batch: PairBatch) -> torch.Tensor:
    """Summed answer log-probs of a plain (adapter-free) causal LM, computed independently:
    the full logits, log_softmax, the target tokens, per sequence."""
    with torch.no_grad():
        logits = model(
            input_ids=batch.input_ids,
            attention_mask=batch.attention_mask,
            position_ids=batch.position_ids,
            use_cache=False,
        ).logits.float()
    logps = torch.log_softmax(logits, dim=-1)
    sums = torch.zeros(2 * batch.pairs)
    for row in range(batch.targets.shape[0]):
        for t in range(batch.targets.shape[1]):
            target = int(batch.targets[row, t])
            if target != IGNORE_INDEX:
                sums[int(batch.owner[row, t])] += float(logps[row, t, target])
    return sums


@pytest.mark.slow
def test_reference_is_the_base_with_the_adapter_off(
    learned: tuple[TrainResult, DpoHooks, int],
    tiny_model_dir: Path,
    preference_data: tuple[Path, Path],
) -> None:
    """With the trained adapter loaded, `reference_logps` equals a fresh base model's
    log-probs (computed before the adapter is attached), while the policy's differ;
    the model is left as it was (adapter on, train mode). Packed and padded batches agree."""
    result = learned[0]
    assert result.output_dir is not None
    spec = dpo_spec(tiny_model_dir, packing=False)
    device = training_device()
    tokenizer = load_tokenizer(tiny_model_dir)
    rows = preference_rows(3, seed=5)
    pairs = tokenize_preference_rows(rows, tokenizer, spec.max_seq_length).examples
    padded = collate_pairs(pairs, packing=False, pad_id=tokenizer.pad_token_id)
    packed = collate_pairs(pairs, packing=True, pad_id=tokenizer.pad_token_id)

    base = load_base_model(spec, tiny_model_dir, device)
    expected = base_logps(base, padded)  # before any adapter exists
    model = PeftModel.from_pretrained(base, result.output_dir)
    model.train()
    reference = reference_logps(model, padded)
    assert torch.allclose(reference, expected, atol=1e-4), (reference, expected)
    assert model.training
    lora_layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    assert lora_layers and not any(layer.disable_adapters for layer in lora_layers)
    with torch.no_grad():
        model.eval()  # no dropout: comparable policy log-probs
        policy = sequence_logps(model, padded)
        policy_packed = sequence_logps(model, packed)
    assert torch.allclose(policy, policy_packed, atol=1e-4)
    # the trained policy prefers the chosen answers more than the reference does
    margin = (policy[:3] - reference[:3]) - (policy[3:] - reference[3:])
    assert bool((margin > 0).all()), margin
    with torch.no_grad():
        model.eval()
        assert torch.allclose(reference_logps(model, packed), expected, atol=1e-4)
    # and the answer tokens are the only targets: one per answer token, plus the end of turn
    answer = tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    assert int((padded.targets[0] != IGNORE_INDEX).sum()) == len(answer) + 1


# -- (f) resume ----------------------------------------------------------------------------------
@pytest.mark.slow
def test_resumed_dpo_run_reproduces_the_uninterrupted_run(
    learned: tuple[TrainResult, DpoHooks, int],
    tiny_model_dir: Path,
    preference_data: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    full, full_hooks, _ = learned
    train_path, val_path = preference_data
    hooks = DpoHooks(stop_at=K)
    stopped = train(
        dpo_spec(tiny_model_dir), train_path, tmp_path / "b", hooks, validation_path=val_path
    )
    assert stopped.stopped is StopRequest.PREEMPT and stopped.checkpoint is not None
    assert [step for _, step in hooks.checkpoints] == [3, K]
    out = Path(shutil.copytree(tmp_path / "b", tmp_path / "resumed"))
    resumed_hooks = DpoHooks()
    resumed = train(
        dpo_spec(tiny_model_dir),
        train_path,
        out,
        resumed_hooks,
        validation_path=val_path,
        resume_from=out / "checkpoints" / f"step-{K}",
    )
    assert resumed.stopped is None and resumed.step == STEPS
    assert full.output_dir is not None and resumed.output_dir is not None
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    for x, y in zip(full.metrics["history"], resumed.metrics["history"], strict=True):
        assert x["step"] == y["step"] and x["lr"] == y["lr"]
        for key in ("loss", "reward_margin", "chosen_reward", "preference_accuracy"):
            assert abs(x[key] - y[key]) <= 1e-5, (key, x, y)
    assert [m.step for m in resumed_hooks.progress] == list(range(K + 1, STEPS + 1))
    after_full, after_resumed = full_hooks.evals[-1][1], resumed_hooks.evals[-1][1]
    assert abs(after_full.reward_margin - after_resumed.reward_margin) <= 1e-5
    assert resumed.metrics["eval_preference_before"] == full.metrics["eval_preference_before"]


@pytest.mark.slow
def test_dpo_starts_from_a_trained_adapter(
    learned: tuple[TrainResult, DpoHooks, int],
    tiny_model_dir: Path,
    preference_data: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    """`init_adapter` (how a job continues a fine-tuned model) is the LoRA start of a DPO run;
    the reference stays the base with the adapter off, so the first evaluation already
    measures the start adapter's preference."""
    start = learned[0].output_dir
    assert start is not None
    train_path, val_path = preference_data
    hooks = DpoHooks()
    result = train(
        dpo_spec(tiny_model_dir, max_steps=1, checkpoint_steps=None),
        train_path,
        tmp_path / "continued",
        hooks,
        validation_path=val_path,
        init_adapter=start / "adapter_model.safetensors",
    )
    assert result.stopped is None
    before = hooks.evals[0][1]
    assert before.accuracy == learned[1].evals[-1][1].accuracy
    assert before.reward_margin == pytest.approx(learned[1].evals[-1][1].reward_margin, abs=1e-4)
