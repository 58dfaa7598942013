"""Token-budget batches and automatic activation checkpointing, on the tiny model."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.helpers import small_spec, template_rows, write_jsonl
from worker.training import model as model_mod
from worker.training.hooks import TrainHooks
from worker.training.loop import train
from worker.training.model import attach_lora, choose_checkpointing, load_base_model

CPU = torch.device("cpu")


def test_auto_checkpointing_is_off_where_the_run_fits_and_on_where_it_does_not(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = small_spec(tiny_model_dir)
    assert spec.gradient_checkpointing == "auto"
    roomy = choose_checkpointing(spec, tiny_model_dir, CPU, torch.float32)
    assert not roomy.enabled and roomy.reason.startswith("auto: the run fits")
    monkeypatch.setattr(model_mod, "device_memory_bytes", lambda device: 1 << 20)  # 1 MiB
    tight = choose_checkpointing(spec, tiny_model_dir, CPU, torch.float32)
    assert tight.enabled and tight.reason.startswith("auto: the run would not fit")
    forced = spec.model_copy(update={"gradient_checkpointing": False})
    assert choose_checkpointing(forced, tiny_model_dir, CPU, torch.float32).enabled is False
    # the choice reaches the model: its decoder layers recompute or they do not
    for enabled in (True, False):
        resolved = spec.model_copy(update={"gradient_checkpointing": enabled})
        peft = attach_lora(load_base_model(resolved, tiny_model_dir, CPU), resolved)
        assert peft.base_model.model.is_activation_checkpointing is enabled


def varied_rows(n: int, seed: int) -> list[dict[str, Any]]:
    """Template chats padded with a user preamble of 0-40 words: lengths vary about 4x."""
    rng = random.Random(seed)
    rows = template_rows(n, seed=seed)
    for row in rows:
        words = " ".join("word" for _ in range(rng.randint(0, 40)))
        row["messages"][0]["content"] = f"{words} {row['messages'][0]['content']}".strip()
    return rows


def test_a_token_budget_run_fills_micro_batches_and_learns(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    train_path = write_jsonl(tmp_path / "train.jsonl", varied_rows(96, seed=1))
    val_path = write_jsonl(tmp_path / "val.jsonl", varied_rows(16, seed=2))
    budget = 256
    spec = small_spec(
        tiny_model_dir,
        max_seq_length=128,
        max_tokens_per_batch=budget,
        gradient_accumulation_steps=1,
        max_steps=None,
        num_epochs=2,
        learning_rate=3e-3,
    )
    result = train(spec, train_path, tmp_path / "out", TrainHooks(), validation_path=val_path)
    m = result.metrics
    assert m["eval_loss_after"] < 0.7 * m["eval_loss_before"]  # learned, on held-out rows
    assert m["gradient_checkpointing"] is False and "fits" in m["gradient_checkpointing_reason"]
    # every step is one micro-batch of at most `budget` tokens, and most are nearly full
    per_step = [h["tokens"] for h in m["history"]]
    assert max(per_step) <= budget and sum(t > 0.75 * budget for t in per_step) > len(per_step) // 2
    assert m["steps"] == m["total_steps"] == len(per_step)
    assert sum(per_step) == m["train_tokens"]
    # far fewer steps than batch_size examples per micro-batch would take (96 rows / 4)
    assert m["total_steps"] < 2 * 96 // 4
