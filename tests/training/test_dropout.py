"""`CpuDropout`: LoRA's input dropout on the CPU, cheaper masks with nn.Dropout's semantics."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from tests.training.helpers import small_spec
from worker.training.model import CpuDropout, attach_lora, keep_mask, load_base_model


def test_drops_at_the_rate_and_keeps_the_expectation() -> None:
    torch.manual_seed(0)
    x = torch.ones(4000, 512, requires_grad=True)
    dropout = CpuDropout(0.05).train()
    y = dropout(x)
    kept = y != 0
    assert abs(1 - kept.float().mean().item() - 0.05) < 0.002  # 2M draws: sd 1.5e-4
    scale = y[kept].unique()
    assert scale.numel() == 1 and scale.item() == pytest.approx(1 / (1 - 3277 / 65536))
    assert y.mean().item() == pytest.approx(1.0, abs=0.003)
    y.sum().backward()
    assert x.grad is not None and torch.equal(x.grad, y.detach())  # d(mask * s * x)/dx


def test_every_lane_of_a_draw_drops_at_the_rate() -> None:
    """Each int64 draw gives four 16-bit levels; each lane on its own drops at the rate (a
    draw over torch's default int64 range, [0, 2**63), would leave the top lane's sign bit
    clear, and that lane would never drop)."""
    torch.manual_seed(1)
    keep = keep_mask(torch.Size([400_000, 4]), 6554)  # column j is lane j of every draw
    rates = 1 - keep.float().mean(0)
    assert torch.allclose(rates, torch.full((4,), 6554 / 65536), atol=0.003)  # sd 4.7e-4
    odd = keep_mask(torch.Size([3, 5, 7]), 32768)
    assert odd.shape == (3, 5, 7) and odd.dtype == torch.bool


def test_is_nn_dropout_where_it_should_be() -> None:
    x = torch.randn(64, 32)
    assert torch.equal(CpuDropout(0.05).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert isinstance(CpuDropout(0.1), nn.Dropout)  # PEFT's DoRA path checks the type


def test_seeded_draws_repeat_and_the_mask_is_kept_as_bools() -> None:
    x = torch.randn(256, 128, requires_grad=True)
    torch.manual_seed(3)
    first = CpuDropout(0.1).train()(x)
    saved: list[torch.dtype] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        saved.append(t.dtype)
        return t

    torch.manual_seed(3)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        second = CpuDropout(0.1).train()(x)
    assert torch.equal(first, second)
    assert saved == [torch.bool]  # nn.Dropout on the CPU keeps a 4-byte float per element


def test_attach_lora_uses_it_for_every_adapted_layer_on_the_cpu(tiny_model_dir: Path) -> None:
    spec = small_spec(tiny_model_dir, dropout=0.05)
    model = attach_lora(load_base_model(spec, tiny_model_dir, torch.device("cpu")), spec)
    layers = [m for m in model.modules() if hasattr(m, "lora_A")]
    dropouts = [d for m in layers for d in m.lora_dropout.values()]  # type: ignore[union-attr]
    assert layers and all(type(d) is CpuDropout and d.p == 0.05 for d in dropouts)
    assert len(dropouts) == len(layers)
