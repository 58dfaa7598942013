"""`load_adapter_weights`: how a job continuing from a fine-tuned model or checkpoint starts.
Exactly the adapter's tensors are loaded; another LoRA shape is a SpecError naming why."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel, get_peft_model_state_dict
from safetensors.torch import save_file

from tests.training.helpers import small_spec
from worker.training.checkpoint import load_adapter_weights
from worker.training.hooks import SpecError
from worker.training.model import attach_lora, load_base_model


def lora(model_dir: Path, **overrides: object) -> PeftModel:
    spec = small_spec(model_dir, **overrides)
    return attach_lora(load_base_model(spec, model_dir, torch.device("cpu")), spec)


def test_loads_the_same_shape_and_refuses_another(tiny_model_dir: Path, tmp_path: Path) -> None:
    source = lora(tiny_model_dir, seed=1)
    with torch.no_grad():  # B starts at zero: give every tensor a recognisable value
        for name, param in source.named_parameters():
            if "lora_" in name:
                param.fill_(0.01)
    weights = tmp_path / "adapter_model.safetensors"
    save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(source).items()}, weights)

    target = lora(tiny_model_dir, seed=2)
    load_adapter_weights(target, weights)
    loaded = get_peft_model_state_dict(target)
    assert loaded.keys() == get_peft_model_state_dict(source).keys()
    assert all(torch.all(t == 0.01) for t in loaded.values())

    with pytest.raises(SpecError, match="tensor shapes do not fit"):
        load_adapter_weights(lora(tiny_model_dir, rank=4), weights)
    with pytest.raises(SpecError, match="does not fit this LoRA configuration"):
        load_adapter_weights(lora(tiny_model_dir, target_modules=["q_proj"]), weights)
    (tmp_path / "broken.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(SpecError, match="cannot be read"):
        load_adapter_weights(target, tmp_path / "broken.safetensors")
