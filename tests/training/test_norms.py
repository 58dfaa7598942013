"""`FusedRMSNorm`: LLaMA-style RMSNorm under autocast as one function, the stock numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.models.gemma.modeling_gemma import GemmaRMSNorm
from transformers.models.llama.modeling_llama import LlamaRMSNorm
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from tests.training.helpers import lora_model_and_batch
from worker.training.model import _autocast_output, batch_loss
from worker.training.norms import fuse_rms_norms

BF16 = torch.bfloat16


def _norm(cls: type[nn.Module], hidden: int, seed: int) -> nn.Module:
    """A norm as `prepare_for_training` leaves it: bf16 checkpoint values in an fp32 weight,
    frozen, with the autocast output hook."""
    torch.manual_seed(seed)
    norm = cls(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_((1 + 0.3 * torch.randn(hidden)).to(BF16).float())
    norm.weight.requires_grad_(False)
    norm.register_forward_hook(_autocast_output)
    return norm.train()


def _run(norm: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, ...]:
    x = x.detach().requires_grad_()
    saved: list[tuple[torch.dtype, tuple[int, ...]]] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append((t.dtype, tuple(t.shape)))
        return t

    with (
        torch.autocast("cpu", dtype=BF16),
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
    ):
        y = norm(x)
    y.backward(grad)
    assert x.grad is not None
    return y.detach(), x.grad, saved  # type: ignore[return-value]


@pytest.mark.parametrize("cls", [LlamaRMSNorm, Qwen3RMSNorm])
def test_same_output_and_gradient_as_the_stock_norm(cls: type[nn.Module]) -> None:
    norm = _norm(cls, 256, seed=0)
    torch.manual_seed(1)
    x = (3 * torch.randn(2, 37, 256)).to(BF16)
    grad = torch.randn(2, 37, 256).to(BF16)
    stock_y, stock_grad, stock_saved = _run(norm, x, grad)
    assert fuse_rms_norms(norm, BF16) == 1
    fused_y, fused_grad, fused_saved = _run(norm, x, grad)

    assert stock_y.dtype == fused_y.dtype == BF16
    assert torch.equal(fused_y, stock_y)  # the same two roundings, to the bit
    assert fused_grad.dtype == BF16
    # fp32 arithmetic in another order, rounded once: at most a last-bit difference
    torch.testing.assert_close(fused_grad, stock_grad, rtol=2**-7, atol=1e-6)
    assert (fused_grad != stock_grad).float().mean().item() < 0.01
    # the stock norm keeps an fp32 copy of its input; the fused one the bf16 input itself
    assert (torch.float32, (2, 37, 256)) in stock_saved
    assert (BF16, (2, 37, 256)) in fused_saved
    assert all(shape[-1] == 1 or dtype == BF16 for dtype, shape in fused_saved if len(shape) == 3)


def test_only_where_the_stock_arithmetic_is_reproduced() -> None:
    llama = _norm(LlamaRMSNorm, 64, seed=2)
    assert fuse_rms_norms(llama, torch.float32) == 0  # no autocast, nothing to fuse
    gemma = _norm(GemmaRMSNorm, 64, seed=2)  # (1 + weight), another formula
    assert fuse_rms_norms(gemma, BF16) == 0
    inexact = _norm(LlamaRMSNorm, 64, seed=2)
    with torch.no_grad():
        inexact.weight.add_(1e-4)  # an fp32 checkpoint's weight: not a bf16 value
    assert fuse_rms_norms(inexact, BF16) == 0
    trained = _norm(LlamaRMSNorm, 64, seed=2)
    trained.weight.requires_grad_(True)
    assert fuse_rms_norms(trained, BF16) == 0

    # fused, but made trainable later (PEFT's `modules_to_save` copy): the stock path runs
    later = _norm(LlamaRMSNorm, 64, seed=2)
    assert fuse_rms_norms(later, BF16) == 1
    later.weight.requires_grad_(True)
    x, grad = torch.randn(5, 64).to(BF16), torch.randn(5, 64).to(BF16)
    _, _, saved = _run(later, x, grad)
    assert (torch.float32, (5, 64)) in saved
    assert later.weight.grad is not None  # the stock backward reached the weight


def test_a_bf16_model_trains_with_the_stock_numbers(tiny_model_dir: Path) -> None:
    """Every norm of a bf16 LLaMA is fused by `attach_lora`; loss and LoRA gradients match
    the stock norms'."""
    model, batch = lora_model_and_batch(tiny_model_dir, compute_dtype="bfloat16", dropout=0.0)
    norms = [m for m in model.modules() if type(m).__name__ == "LlamaRMSNorm"]
    assert norms and all("forward" in norm.__dict__ for norm in norms)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = batch_loss(model, batch, dtype=BF16).loss
        loss.backward()
        return loss.item(), {
            n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None
        }

    fused_loss, fused = loss_and_grads()
    for norm in norms:
        norm.__dict__.pop("forward")  # back to the stock forward
    stock_loss, stock = loss_and_grads()
    assert fused_loss == pytest.approx(stock_loss, rel=1e-3)
    assert fused.keys() == stock.keys() and fused
    for name in fused:
        torch.testing.assert_close(fused[name], stock[name], rtol=0.05, atol=1e-4)
