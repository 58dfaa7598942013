"""`fuse_lora_forward`: one addmm for the LoRA update, the same numbers as PEFT's forward."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from tests.training.helpers import completion_rows, small_spec
from worker.training.data import collate, tokenize_rows
from worker.training.model import attach_lora, batch_loss, load_base_model, load_tokenizer

CPU = torch.device("cpu")


def _lora_layers(model: nn.Module) -> list[Any]:
    return [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]


def _loss_and_grads(
    model: Any, batch: Any, dtype: torch.dtype, *, fused: bool
) -> tuple[float, dict[str, torch.Tensor]]:
    for layer in _lora_layers(model):
        if not fused:
            layer.__dict__.pop("forward", None)  # back to PEFT's class forward
    model.zero_grad()
    torch.manual_seed(11)  # the same dropout masks on both sides
    loss = batch_loss(model, batch, dtype=dtype).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.item(), grads


def _model_and_batch(model_dir: Path, **overrides: Any) -> tuple[Any, Any]:
    spec = small_spec(model_dir, dropout=0.1, **overrides)
    model = attach_lora(load_base_model(spec, model_dir, CPU), spec)
    torch.manual_seed(5)
    for layer in _lora_layers(model):  # B starts at zero: make the update count
        for weight in layer.lora_B.values():
            nn.init.normal_(weight.weight, std=0.05)
    tokenizer = load_tokenizer(model_dir)
    examples = tokenize_rows(completion_rows(6, seed=2), tokenizer, 64).examples
    return model.train(), collate(examples, packing=True, pad_id=0)


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_fp32_matches_peft_forward_and_gradients(tiny_model_dir: Path, quant_type: str) -> None:
    model, batch = _model_and_batch(tiny_model_dir, quant_type=quant_type)
    layers = _lora_layers(model)
    assert layers and all("forward" in layer.__dict__ for layer in layers)
    fused_loss, fused = _loss_and_grads(model, batch, torch.float32, fused=True)
    peft_loss, peft = _loss_and_grads(model, batch, torch.float32, fused=False)
    assert fused_loss == pytest.approx(peft_loss, rel=1e-6)
    assert fused.keys() == peft.keys() and len(fused) == 2 * len(layers)
    for name in fused:
        # fp32 sums in another order: errors scale with the summed terms, so an element that
        # cancels to near zero is held to the tensor's scale, not its own
        scale = peft[name].abs().max().item()
        torch.testing.assert_close(fused[name], peft[name], rtol=1e-4, atol=1e-5 * scale)


def test_bf16_autocast_stays_close_to_peft(tiny_model_dir: Path) -> None:
    """Under autocast PEFT rounds B's output to bf16, scales and adds it; the addmm rounds
    once. Same loss and gradient directions to bf16 precision."""
    model, batch = _model_and_batch(tiny_model_dir, compute_dtype="bfloat16")
    fused_loss, fused = _loss_and_grads(model, batch, torch.bfloat16, fused=True)
    peft_loss, peft = _loss_and_grads(model, batch, torch.bfloat16, fused=False)
    assert fused_loss == pytest.approx(peft_loss, rel=5e-3)
    for name in fused:
        cosine = torch.nn.functional.cosine_similarity(
            fused[name].flatten(), peft[name].flatten(), dim=0
        )
        assert cosine > 0.99, name


def test_dora_keeps_peft_forward(tiny_model_dir: Path) -> None:
    """DoRA is not a plain low-rank update: the fused forward hands it to PEFT unchanged."""
    model, batch = _model_and_batch(tiny_model_dir, use_dora=True)
    fused_loss, fused = _loss_and_grads(model, batch, torch.float32, fused=True)
    peft_loss, peft = _loss_and_grads(model, batch, torch.float32, fused=False)
    assert fused_loss == peft_loss
    assert all(torch.equal(fused[n], peft[n]) for n in fused)


@pytest.mark.parametrize("quant_type", ["nf4", "none"])
def test_the_update_is_added_in_place_into_the_base_output(
    tiny_model_dir: Path, quant_type: str
) -> None:
    """No copy of the [tokens, out] base output: the update goes in with `addmm_`."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.names: list[str] = []

        def __torch_dispatch__(
            self, func: Any, types: Any, args: Any = (), kwargs: Any = None
        ) -> Any:
            self.names.append(str(func))
            return func(*args, **(kwargs or {}))

    model, _ = _model_and_batch(tiny_model_dir, quant_type=quant_type)
    layer = _lora_layers(model)[0]
    x = torch.randn(2, 5, layer.in_features, requires_grad=True)
    with Ops() as ops:
        out = layer(x)
    assert out.shape == (2, 5, layer.out_features)
    assert "aten.addmm_.default" in ops.names
    assert "aten.addmm.default" not in ops.names and "aten.clone.default" not in ops.names
    out.sum().backward()  # autograd accepts the in-place update
    assert x.grad is not None and layer.lora_B["default"].weight.grad is not None
