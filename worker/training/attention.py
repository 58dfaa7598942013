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
* neither: sdpa with `is_causal=True`, per example.

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
