"""Datasets and specs shared by the engine tests."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from shared.train_spec import TrainSpec

ANSWER = "Hello there, friend!"


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def template_prompt(rng: random.Random) -> str:
    name = "".join(rng.choice("abcdefghijklmnop") for _ in range(rng.randint(3, 10)))
    return f"Say hi to {name}"


def template_rows(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Chats whose assistant turn is always ANSWER, whatever name the user gives."""
    rng = random.Random(seed)
    return [
        {
            "messages": [
                {"role": "user", "content": template_prompt(rng)},
                {"role": "assistant", "content": ANSWER},
            ]
        }
        for _ in range(n)
    ]


def completion_rows(n: int, *, seed: int) -> list[dict[str, Any]]:
    """Prompt/completion rows of varied length."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "".join(rng.choice("xyz ") for _ in range(rng.randint(4, 30)))
        completion = "".join(rng.choice("abc") for _ in range(rng.randint(2, 12)))
        rows.append({"prompt": prompt, "completion": completion})
    return rows


def small_spec(model_dir: Path, **overrides: Any) -> TrainSpec:
    """A fast CPU spec: fp32 compute, NF4 + double quant, short runs."""
    values: dict[str, Any] = {
        "base_model": str(model_dir),
        "max_seq_length": 64,
        "batch_size": 4,
        "gradient_accumulation_steps": 2,
        "learning_rate": 2e-3,
        "compute_dtype": "float32",
        "rank": 8,
        "alpha": 16,
        "max_steps": 6,
        "checkpoint_steps": None,
        "validation_fraction": 0.1,
        "seed": 7,
    }
    values.update(overrides)
    return TrainSpec(**values)


def lora_model_and_batch(model_dir: Path, **overrides: Any) -> tuple[Any, Any]:
    """A LoRA model from `small_spec(model_dir, **overrides)` in train mode, with B drawn
    non-zero (it starts at zero) so the adapters take part, and one packed batch of six
    completion rows."""
    import torch

    from worker.training.data import collate, tokenize_rows
    from worker.training.model import attach_lora, load_base_model, load_tokenizer

    spec = small_spec(model_dir, **overrides)
    model = attach_lora(load_base_model(spec, model_dir, torch.device("cpu")), spec)
    torch.manual_seed(5)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    examples = tokenize_rows(completion_rows(6, seed=2), load_tokenizer(model_dir), 64).examples
    return model.train(), collate(examples, packing=True, pad_id=0)
