"""`_CausalAttention`: a packed example's causal attention on the CPU in bf16, as exact as sdpa."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.nn import functional as F

from tests.training.helpers import lora_model_and_batch
from worker.training import attention
from worker.training.model import batch_loss

BF16 = torch.bfloat16


def _reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """fp64 causal attention, [heads, L, dim] with grouped kv heads."""
    groups = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(groups, 0), v.repeat_interleave(groups, 0)
    scores = q @ k.transpose(1, 2) * q.shape[-1] ** -0.5
    future = torch.ones(q.shape[1], q.shape[1], dtype=torch.bool).triu_(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1) @ v


def _errors(fn: Any, inputs: list[torch.Tensor], grad: torch.Tensor) -> list[float]:
    """Max |difference| from the fp64 reference: output, then dq, dk, dv."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    exact = [t.detach().double().requires_grad_() for t in inputs]
    out = fn(*leaves)
    ref = _reference(*exact)
    grads = torch.autograd.grad(out, leaves, grad)
    ref_grads = torch.autograd.grad(ref, exact, grad.double())
    pairs = [(out, ref), *zip(grads, ref_grads, strict=True)]
    return [(a.double() - b).abs().max().item() for a, b in pairs]


@pytest.mark.parametrize(("heads", "kv_heads", "length"), [(4, 4, 37), (8, 2, 130), (6, 1, 5)])
def test_as_close_to_exact_as_torch_flash_kernel(heads: int, kv_heads: int, length: int) -> None:
    torch.manual_seed(length)
    q = (2 * torch.randn(heads, length, 64)).to(BF16)
    k = (2 * torch.randn(kv_heads, length, 64)).to(BF16)
    v = torch.randn(kv_heads, length, 64).to(BF16)
    grad = torch.randn(heads, length, 64).to(BF16)

    def ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return attention._CausalAttention.apply(q, k, v, 64**-0.5)  # type: ignore[no-any-return]

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(
            q[None], k[None], v[None], is_causal=True, enable_gqa=True
        )
        return out[0]

    mine, theirs = _errors(ours, [q, k, v], grad), _errors(flash, [q, k, v], grad)
    for name, a, b in zip(("out", "dq", "dk", "dv"), mine, theirs, strict=True):
        # bf16 outputs: an error of a few units in the last place of values of order 1-10
        assert a <= max(2 * b, 0.02), (name, a, b)


def test_a_bf16_packed_row_uses_it_with_sdpa_numbers(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and LoRA gradients of a packed bf16 batch on the CPU: the same as with torch's
    flash kernel per example, to bf16 precision; and the batched path really ran."""
    model, batch = lora_model_and_batch(
        tiny_model_dir, compute_dtype="bfloat16", dropout=0.0, gradient_checkpointing=False
    )
    examples = int((batch.position_ids == 0).sum())
    calls = 0
    apply = attention._CausalAttention.apply

    def counted(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        return apply(*args)

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = batch_loss(model, batch, dtype=BF16).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads

    monkeypatch.setattr(attention._CausalAttention, "apply", counted)
    batched_loss, batched = loss_and_grads()
    layers = model.config.num_hidden_layers
    assert calls == layers * examples
    monkeypatch.setattr(attention, "_batched_causal", lambda *args: False)
    flash_loss, flash = loss_and_grads()
    assert calls == layers * examples  # the control ran sdpa
    assert batched_loss == pytest.approx(flash_loss, rel=2e-3)
    assert batched.keys() == flash.keys() and batched
    for name in batched:
        cosine = F.cosine_similarity(batched[name].flatten(), flash[name].flatten(), dim=0)
        assert cosine > 0.999, name


def test_long_examples_and_other_cases_keep_sdpa() -> None:
    """The batched path holds [heads, L, L] scores: past `BATCHED_SCORES_MAX` (16 heads of 512
    tokens), and wherever it would not compute sdpa's numbers, sdpa runs."""
    module = torch.nn.Module().train()

    def qkv(heads: int, length: int, dtype: torch.dtype = BF16) -> list[torch.Tensor]:
        return [torch.empty(1, heads, length, 8, dtype=dtype) for _ in range(3)]

    assert attention._batched_causal(module, *qkv(16, 512), {})
    assert not attention._batched_causal(module, *qkv(16, 513), {})
    assert not attention._batched_causal(module, *qkv(16, 64, torch.float32), {})
    assert not attention._batched_causal(module, *qkv(16, 64), {"dropout": 0.1})
    assert attention._batched_causal(module.eval(), *qkv(16, 64), {"dropout": 0.1})
    assert not attention._batched_causal(module, *qkv(16, 64), {"is_causal": False})
