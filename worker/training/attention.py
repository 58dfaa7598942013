"""Padding-free attention for packed rows: one causal attention call per example.

With `position_ids` restarting per example, `attention_mask=None` and no cache, stock
transformers (5.23) keeps examples apart through a block-diagonal mask over the whole row:
attention costs T^2 for a row of T tokens. Registered as `packed_examples`, this implementation
splits the row at every position 0 and attends within each example only, costing sum(L_i^2),
the same work as the examples run one by one (what flash attention's varlen kernels do on
GPU). The mask hook returns None: in packed mode no mask is built at all, so everything a mask
would carry is applied here, per layer, from what the attention module passes:

* `sliding_window` (Mistral, Phi-3 with a window, Qwen2/Qwen3 sliding layers, the local layers
  of Gemma-2/Gemma-3): query i sees keys j with i - window < j <= i, as transformers' masks do;
  sdpa with that boolean mask, per example.
* `softcap` (Gemma-2's attention logit soft-capping, which sdpa cannot do): the eager
  formula, `tanh(scores / cap) * cap` before the mask and softmax, per example.
* neither: sdpa with `is_causal=True`, per example; on the CPU in a 16-bit dtype,
  `_CausalAttention`, the same arithmetic with batched matmuls (faster there than torch's
  CPU flash kernel on examples of a few hundred tokens).

Rows that are not packed (batch > 1, or a mask given) fall back to plain sdpa; a packed row
without `position_ids` is an error, since its example boundaries are unknown.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from transformers import AttentionInterface, PretrainedConfig
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

from shared.estimate import BATCHED_SCORES_MAX
from worker.training.hooks import SpecError

# Not "sdpa_..." : transformers checks `_supports_sdpa` for any name containing "sdpa", and
# Gemma-2 has no sdpa support (soft-capping); this implementation needs none of it.
PACKED_ATTENTION = "packed_examples"
# RoPE variants whose frequencies depend on the longest position in the batch: packed, the
# whole row would use the longest example's choice.
LENGTH_DEPENDENT_ROPE = ("dynamic", "longrope")


def window_mask(length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """[length, length] boolean: True where query i may attend key j (causal, windowed)."""
    i = torch.arange(length, device=device)[:, None]
    j = torch.arange(length, device=device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed &= j > i - window
    return allowed


def _softcapped_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    *,
    window: int | None,
    softcap: float,
    scaling: float | None,
    dropout: float,
) -> torch.Tensor:
    """Gemma-2's eager attention for one example: [1, heads, L, dim] -> [1, L, heads, dim]."""
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(2, 3)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    allowed = window_mask(query.shape[2], window, query.device)
    scores = scores.masked_fill(~allowed, torch.finfo(scores.dtype).min)
    weights = F.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous()


# `_CausalAttention` holds a call's [heads, L, L] scores (fp32, with their gradients in the
# backward, about 16 bytes per score in all): at most 2**22 scores (16 heads of 512 tokens,
# `BATCHED_SCORES_MAX`) keeps that under 64 MiB. Longer examples take torch's flash kernel,
# which needs no scores and is no slower there.


class _CausalAttention(torch.autograd.Function):
    """Causal attention of one example in a 16-bit dtype on the CPU, [heads, L, dim] ->
    [heads, L, dim], with the arithmetic of torch's CPU flash kernel and batched matmuls.

    Scores are an fp32 product of the 16-bit q and k (exact products, fp32 sums, as the
    kernel's fp32 accumulation has them) and the softmax is fp32; the probabilities are
    rounded to the 16-bit dtype for the product with v, and so are the score gradients for
    theirs, as in the kernel. Like flash attention it saves only q, k and v and recomputes the
    probabilities in the backward, so the [heads, L, L] scores never outlive a call. Grouped
    kv heads are read in place: the g query heads of a kv head form one [g * L, dim] matrix.
    On an AVX512-BF16 CPU this runs the examples of a packed row in about four fifths of the time of
    torch's flash kernel, whose small tiles run its matmuls far below the machine's peak.
    """

    @staticmethod
    def probabilities(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
        heads, length, dim = q.shape
        kv_heads = k.shape[0]
        groups = heads // kv_heads
        q32 = q.float().mul_(scale).view(kv_heads, groups * length, dim)
        scores = torch.bmm(q32, k.float().transpose(1, 2))  # [kv_heads, g * L, L]
        future = torch.ones(length, length, dtype=torch.bool).triu_(1)
        scores.view(kv_heads, groups, length, length).masked_fill_(future, float("-inf"))
        return torch.softmax(scores, dim=-1)

    @staticmethod
    def forward(
        ctx: Any, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
    ) -> torch.Tensor:
        probs = _CausalAttention.probabilities(q, k, scale)
        ctx.save_for_backward(q, k, v)
        ctx.scale = scale
        return torch.bmm(probs.to(v.dtype), v).view(q.shape)

    @staticmethod
    def backward(
        ctx: Any, grad: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
        q, k, v = ctx.saved_tensors
        kv_heads, dim = k.shape[0], k.shape[2]
        probs = _CausalAttention.probabilities(q, k, ctx.scale)
        grad_out = grad.reshape(kv_heads, -1, dim)  # [kv_heads, g * L, dim]
        grad_v = torch.bmm(probs.to(v.dtype).transpose(1, 2), grad_out)
        grad_probs = torch.bmm(grad_out, v.transpose(1, 2)).float()
        grad_scores = torch._softmax_backward_data(grad_probs, probs, -1, torch.float32)
        grad_scores = grad_scores.to(q.dtype)
        grad_q = torch.bmm(grad_scores, k).mul_(ctx.scale).view(q.shape)
        grad_k = torch.bmm(grad_scores.transpose(1, 2), q.view(kv_heads, -1, dim))
        return grad_q, grad_k.mul_(ctx.scale), grad_v, None


def _batched_causal(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: dict[str, Any],
) -> bool:
    """Whether `_CausalAttention` computes what sdpa would for this example, within
    `BATCHED_SCORES_MAX`."""
    length = query.shape[2]
    return (
        query.device.type == "cpu"
        and query.shape[1] * length * length <= BATCHED_SCORES_MAX
        and query.dtype in (torch.bfloat16, torch.float16)
        and key.dtype == value.dtype == query.dtype
        and query.shape[2] == key.shape[2]
        and query.shape[1] % key.shape[1] == 0
        and (float(kwargs.get("dropout", 0.0)) == 0.0 or not module.training)
        and kwargs.get("position_bias") is None
        and kwargs.get("is_causal", getattr(module, "is_causal", True)) is not False
    )


def _example_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    window: int | None,
    softcap: float | None,
    kwargs: dict[str, Any],
) -> torch.Tensor:
    length = query.shape[2]
    if softcap:
        return _softcapped_attention(
            module,
            query,
            key,
            value,
            window=window,
            softcap=softcap,
            scaling=kwargs.get("scaling"),
            dropout=float(kwargs.get("dropout", 0.0)),
        )
    if window is not None and length > window:
        mask = window_mask(length, window, query.device)[None, None]
        return sdpa_attention_forward(module, query, key, value, mask, **kwargs)[0]
    if length > 1 and _batched_causal(module, query, key, value, kwargs):
        scaling = kwargs.get("scaling")
        scale = float(scaling) if scaling is not None else query.shape[-1] ** -0.5
        q, k, v = (t[0].contiguous() for t in (query, key, value))
        out: torch.Tensor = _CausalAttention.apply(q, k, v, scale)
        return out.transpose(0, 1).unsqueeze(0)  # [1, L, heads, dim]
    return sdpa_attention_forward(module, query, key, value, None, **kwargs)[0]


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a [1, heads, T, dim] packed row, example by example; [1, T, heads, dim]."""
    if query.shape[0] != 1 or attention_mask is not None:
        if softcap:
            raise ValueError("packed_examples: soft-capped attention needs a packed row")
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    if position_ids is None:
        raise ValueError("packed_examples: a packed row needs position_ids (example boundaries)")
    length = query.shape[2]
    starts = torch.nonzero(position_ids[0, :length] == 0).flatten().tolist()
    bounds = sorted({0, *starts, length})
    sizes = [b - a for a, b in pairwise(bounds)]
    # split, not one slice per example: a slice's backward writes its gradient into a zeroed
    # copy of the whole row (examples x row work); split's backward concatenates once
    outputs = [
        _example_attention(module, q, k, v, sliding_window, softcap, kwargs)
        for q, k, v in zip(
            query.split(sizes, dim=2),
            key.split(sizes, dim=2),
            value.split(sizes, dim=2),
            strict=True,
        )
    ]
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)), None


def check_packing_supported(config: PretrainedConfig, max_seq_length: int) -> None:
    """SpecError naming the family if packed rows cannot be exact per example for it."""
    family = getattr(config, "model_type", "this model")
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    ropes = rope.values() if rope and all(isinstance(v, dict) for v in rope.values()) else [rope]
    for params in ropes:
        kind = params.get("rope_type", params.get("type"))
        if kind not in LENGTH_DEPENDENT_ROPE:
            continue
        original = params.get("original_max_position_embeddings") or getattr(
            config, "original_max_position_embeddings", None
        )
        original = int(original or getattr(config, "max_position_embeddings", 0) or 0)
        if max_seq_length > original:
            raise SpecError(
                f"packing: {family} uses '{kind}' RoPE, whose frequencies depend on the longest "
                f"sequence in a batch; with max_seq_length {max_seq_length} > {original} "
                "a packed row would change them for its shorter examples. Set packing: false, "
                f"or max_seq_length <= {original}."
            )


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)
