"""Padding-free attention for packed rows: one causal sdpa call per example.

With `position_ids` restarting per example, `attention_mask=None` and no cache, stock
transformers (5.23) already keeps examples apart, but through a block-diagonal mask over the
whole row: attention costs T^2 for a row of T tokens. Registered as `sdpa_packed`, this
implementation splits the row at every position 0 and runs sdpa with `is_causal=True` on each
example, costing sum(L_i^2), the same work as the examples run one by one (what flash
attention's varlen kernels do on GPU). The mask hook returns None: in packed mode no mask is
built at all. Rows that are not packed (batch > 1, or a mask given) fall back to plain sdpa.
"""

from __future__ import annotations

from itertools import pairwise
from typing import Any

import torch
from torch import nn
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface

PACKED_ATTENTION = "sdpa_packed"


def packed_sdpa_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention of a [1, heads, T, dim] packed row, example by example; [1, T, heads, dim]."""
    if position_ids is None or query.shape[0] != 1 or attention_mask is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    length = query.shape[2]
    starts = torch.nonzero(position_ids[0, :length] == 0).flatten().tolist()
    bounds = sorted({0, *starts, length})
    if len(bounds) == 2:
        return sdpa_attention_forward(module, query, key, value, None, **kwargs)
    outputs = [
        sdpa_attention_forward(
            module, query[:, :, a:b], key[:, :, a:b], value[:, :, a:b], None, **kwargs
        )[0]
        for a, b in pairwise(bounds)
    ]
    return torch.cat(outputs, dim=1), None


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


AttentionInterface.register(PACKED_ATTENTION, packed_sdpa_attention)
AttentionMaskInterface.register(PACKED_ATTENTION, _no_mask)
