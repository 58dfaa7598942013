"""TrainSpec: QLoRA defaults, and nonsense refused with the field named."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest
from pydantic import ValidationError

from shared.train_spec import TrainSpec


def test_defaults_are_qloras() -> None:
    spec = TrainSpec(base_model="tiny-llama")
    assert (spec.quant_type, spec.double_quant, spec.optimizer) == ("nf4", True, "paged_adamw_8bit")
    assert (spec.rank, spec.alpha, spec.dropout) == (16, 32, 0.05)
    assert spec.target_modules == "all-linear"
    assert spec.max_steps is None
    assert spec.lora_scale() == 2.0
    assert TrainSpec(base_model="m", use_rslora=True, rank=16, alpha=32).lora_scale() == 8.0


def test_round_trips_through_json() -> None:
    spec = TrainSpec(base_model="m", target_modules=["q_proj", "v_proj"], max_steps=10)
    assert TrainSpec.model_validate_json(spec.model_dump_json()) == spec


def test_unquantized_run_defaults_to_no_double_quant() -> None:
    assert TrainSpec(base_model="m", quant_type="none").double_quant is False


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"rank": 0}, "rank"),
        ({"alpha": 0}, "alpha"),
        ({"alpha": -1}, "alpha"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"learning_rate": -1e-4}, "learning_rate"),
        ({"learning_rate": 0}, "learning_rate"),
        ({"batch_size": 0}, "batch_size"),
        ({"max_steps": 0}, "max_steps"),
        ({"warmup_ratio": 1.0}, "warmup_ratio"),
        ({"lr_scheduler": "exponential"}, "lr_scheduler"),
        ({"quant_type": "int3"}, "quant_type"),
        ({"optimizer": "sgd"}, "optimizer"),
        ({"compute_dtype": "float64"}, "compute_dtype"),
        ({"validation_fraction": 0.9}, "validation_fraction"),
        ({"target_modules": []}, "target_modules"),
        ({"target_modules": ["q proj"]}, "target_modules"),
        ({"target_modules": "every-linear"}, "target_modules"),
        ({"base_model": "  "}, "base_model"),
        ({"learning_rat": 1e-4}, "learning_rat"),
    ],
)
def test_nonsense_is_refused_naming_the_field(override: dict[str, Any], field: str) -> None:
    values: dict[str, Any] = {"base_model": "m", **override}
    with pytest.raises(ValidationError) as info:
        TrainSpec(**values)
    assert field in str(info.value)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ({"quant_type": "none", "double_quant": True}, "double_quant"),
        ({"target_modules": ["lm_head"], "modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"eval_steps": 0}, "eval_steps"),
        ({"max_tokens_per_batch": 4096, "packing": False}, "max_tokens_per_batch: needs packing"),
        ({"max_tokens_per_batch": 1024, "max_seq_length": 2048}, "below max_seq_length"),
        ({"max_tokens_per_batch": 4096, "method": "dpo"}, "DPO batches count"),
        ({"gradient_checkpointing": "sometimes"}, "gradient_checkpointing"),
    ],
)
def test_cross_field_nonsense_is_refused(override: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        TrainSpec(base_model="m", **override)


def test_spec_module_does_not_import_torch() -> None:
    code = "import sys, shared.train_spec, shared.estimate; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_token_budget_and_checkpointing_defaults() -> None:
    spec = TrainSpec(base_model="m", max_seq_length=512, batch_size=4)
    assert spec.gradient_checkpointing == "auto" and spec.max_tokens_per_batch is None
    assert spec.micro_batch_tokens() == 4 * 512
    budget = spec.model_copy(update={"max_tokens_per_batch": 8192})
    assert budget.micro_batch_tokens() == 8192
    assert TrainSpec(base_model="m", method="dpo", max_seq_length=512).micro_batch_tokens() == (
        2 * 4 * 512
    )
