"""LLaMA-style RMSNorm under autocast as one autograd function instead of a dozen ops.

The stock norm (LLaMA, Mistral, Qwen2, Qwen3, Phi-3) computes
`weight * (x.float() * rsqrt(mean(x^2) + eps)).to(x.dtype)` with an fp32 weight, so under
autocast it returns fp32, which `model._autocast_output` casts once to the compute dtype:
`y = c(w * c(x32 * r))`, c the cast. Autograd records each cast, power, mean, product and
their backwards as separate passes over a [tokens, hidden] tensor, and saves an fp32 copy of
the input. `FusedRMSNorm` computes the same `y` (statistics in fp32, the same two roundings)
with fewer passes, saves the input in its own dtype plus one fp32 rsqrt per row, and gives the
input gradient in fp32 before one rounding, as the stock backward does.

It applies only where its arithmetic is the stock one to the bit: a frozen weight whose
values the compute dtype holds exactly (a checkpoint in that dtype, upcast to fp32 by
`prepare_for_training`), so `c(w * n)` in the compute dtype equals the fp32 product rounded.
Anything else (Gemma's `1 + weight`, a trained norm, an fp32 checkpoint's weight, no
autocast) runs the stock forward.
"""

from __future__ import annotations

import types
from typing import Any, cast

import torch
from torch import nn

# Norm classes whose forward is LLaMA's formula above (checked against transformers 5.x).
LLAMA_STYLE_NORMS = frozenset(
    {"LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm", "Phi3RMSNorm"}
)


class FusedRMSNorm(torch.autograd.Function):
    """y = c(w * c(x32 * r)), r = rsqrt(mean(x32^2) + eps), for x in a 16-bit dtype."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x32 = x.float()
        rstd = torch.rsqrt(x32.square().mean(-1, keepdim=True).add_(eps))
        normed = x32.mul_(rstd).to(x.dtype)
        ctx.save_for_backward(x, rstd, weight)
        return normed.mul_(weight.to(x.dtype))

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        x, rstd, weight = ctx.saved_tensors
        # the stock backward: the gradient of c(x32 * r) rounded to the input dtype, then in
        # fp32 dx = r * g - x * r^3 * mean(g * x), rounded once
        g = (grad * weight.to(grad.dtype)).float()
        x32 = x.float()
        dot = (g * x32).mean(-1, keepdim=True)
        correction = rstd.pow(3).mul_(dot)
        return g.mul_(rstd).sub_(x32.mul_(correction)).to(x.dtype), None, None


def _fused_forward(self: Any, hidden_states: torch.Tensor) -> torch.Tensor:
    kind = hidden_states.device.type
    if (
        self.training
        and not self.weight.requires_grad  # a trainable copy (`modules_to_save`) is stock
        and torch.is_autocast_enabled(kind)
        and hidden_states.dtype == torch.get_autocast_dtype(kind) == self.fused_dtype
    ):
        return cast(
            torch.Tensor,
            FusedRMSNorm.apply(hidden_states, self.weight, self.variance_epsilon),
        )
    return cast(torch.Tensor, type(self).forward(self, hidden_states))


def fuse_rms_norms(model: nn.Module, dtype: torch.dtype) -> int:
    """Give every LLaMA-style RMSNorm of `model` with a frozen weight exact in `dtype` the
    fused forward for training under `dtype` autocast; returns how many."""
    if dtype not in (torch.bfloat16, torch.float16):
        return 0
    fused = 0
    for module in model.modules():
        if type(module).__name__ not in LLAMA_STYLE_NORMS:
            continue
        weight = getattr(module, "weight", None)
        if (
            not isinstance(weight, torch.Tensor)
            or weight.requires_grad
            or not hasattr(module, "variance_epsilon")
            or not torch.equal(weight.to(dtype).to(weight.dtype), weight)
        ):
            continue
        module.__dict__["fused_dtype"] = dtype  # a plain attribute, not a parameter or module
        module.forward = types.MethodType(_fused_forward, module)
        fused += 1
    return fused
