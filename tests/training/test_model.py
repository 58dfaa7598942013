"""The quantized model: NF4 + double quant layers, what trains, packing without cross-talk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bitsandbytes as bnb
import pytest
import torch
from torch import nn

from tests.training.helpers import completion_rows, small_spec
from worker.training.data import collate, tokenize_rows
from worker.training.model import (
    attach_lora,
    build_optimizer,
    load_base_model,
    load_tokenizer,
    parameter_counts,
    summed_loss,
)

CPU = torch.device("cpu")


def quantized_snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every frozen tensor: packed 4-bit weights, their constants, fp32 params."""
    snap = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    for name, module in model.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            snap[f"{name}.absmax"] = module.weight.quant_state.absmax.clone()
    return snap


def test_nf4_double_quant_trains_only_lora(tiny_model_dir: Path) -> None:
    spec = small_spec(tiny_model_dir, optimizer="paged_adamw_8bit", dropout=0.1)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = attach_lora(load_base_model(spec, tiny_model_dir, CPU), spec)

    linears = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(linears) == 4 * 7  # every projection of the 4 layers; lm_head stays fp32
    for layer in linears:
        state = layer.weight.quant_state
        assert state.quant_type == "nf4"
        assert state.blocksize == 64
        assert state.state2 is not None  # double quantization of the constants
        assert state.absmax.dtype == torch.uint8
    trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    frozen = quantized_snapshot(model)

    examples = tokenize_rows(completion_rows(16, seed=0), tokenizer, 64).examples
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], spec)
    model.train()
    for step in range(3):
        batch = collate(examples[4 * step : 4 * step + 4], packing=True, pad_id=0)
        loss = summed_loss(model, batch) / batch.target_tokens
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    after = dict(model.named_parameters())
    unchanged = [n for n, before in trainable.items() if torch.equal(before, after[n])]
    assert not unchanged, f"trainable parameters that did not move: {unchanged}"
    now = quantized_snapshot(model)
    moved = [n for n, before in frozen.items() if not torch.equal(before, now[n])]
    assert not moved, f"frozen tensors that changed: {moved}"


def test_parameter_counts_count_4bit_weights_logically(tiny_model_dir: Path) -> None:
    spec = small_spec(tiny_model_dir)
    model = attach_lora(load_base_model(spec, tiny_model_dir, CPU), spec)
    trainable, total = parameter_counts(model)
    base_params = 3_036_416  # the tiny model's unquantized parameter count
    assert total == base_params + trainable
    # r * (in + out) for q(256->256), k, v (256->128), o, gate, up (256->688), down
    per_layer = 8 * ((256 + 256) * 2 + (256 + 128) * 2 + (256 + 688) * 3)
    assert trainable == 4 * per_layer


def test_unknown_target_module_is_rejected(tiny_model_dir: Path) -> None:
    spec = small_spec(tiny_model_dir, target_modules=["q_proj", "query_key_value"])
    model = load_base_model(spec, tiny_model_dir, CPU)
    with pytest.raises(ValueError, match=r"target_modules: query_key_value not found"):
        attach_lora(model, spec)


def _logits(model: Any, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=positions, attention_mask=None, use_cache=False)
    return out.logits[0]


@pytest.mark.parametrize(
    ("quant_type", "packing", "attention"),
    [("nf4", True, "packed_examples"), ("none", True, "packed_examples"), ("nf4", False, "sdpa")],
)
def test_packed_logits_equal_one_by_one(
    tiny_model_dir: Path, quant_type: str, packing: bool, attention: str
) -> None:
    """Both the engine's per-example attention (packing on) and stock sdpa with restarting
    position_ids (what transformers does by itself) keep packed examples apart."""
    spec = small_spec(tiny_model_dir, quant_type=quant_type, packing=packing)
    tokenizer = load_tokenizer(tiny_model_dir)
    model = attach_lora(load_base_model(spec, tiny_model_dir, CPU), spec)
    assert model.config._attn_implementation == attention
    for name, param in model.named_parameters():  # make LoRA B non-zero so it takes part
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.05)
    model.eval()
    examples = tokenize_rows(completion_rows(3, seed=4), tokenizer, 64).examples
    packed = collate(examples, packing=True, pad_id=0)
    together = _logits(model, packed.input_ids, packed.position_ids)
    alone = torch.cat(
        [_logits(model, torch.tensor([e.input_ids]), torch.arange(len(e))[None]) for e in examples]
    )
    torch.testing.assert_close(together, alone, atol=1e-5, rtol=1e-5)
    # control: the same row with continuous positions does attend across examples
    continuous = torch.arange(packed.input_ids.shape[1])[None]
    crossed = _logits(model, packed.input_ids, continuous)
    first = len(examples[0])
    assert (crossed[first:] - alone[first:]).abs().max() > 1e-2

    # the engine's loss on the packed row is the sum of the per-example losses
    with torch.no_grad():
        packed_loss = summed_loss(model, packed)
        single = sum(summed_loss(model, collate([e], packing=False, pad_id=0)) for e in examples)
    torch.testing.assert_close(packed_loss, single, atol=1e-4, rtol=1e-5)
