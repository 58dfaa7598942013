"""The last decoder layer's MLP and attention output projection at target positions only.

The loss reads the decoder's last hidden states at target positions only (`model.target_states`
runs the head there). In the last layer, a position's MLP output and its attention output
projection (`o_proj`) feed nothing but that position's own last hidden state: the residual
adds, norms and MLP work row by row, and no later layer mixes positions. So on prompt and
padding positions they are dead work, about 45% of a layer's matmuls at completion-only
training's usual target share of a quarter to a third. `trim_last_layer` gives those two
modules a forward that runs on the target rows only and puts zeros elsewhere; while
`target_rows` is active the decoder's last hidden states at other positions are therefore
not the model's, which is why nothing outside `target_states` turns it on. q, k and v keep
every position: the target positions attend to the prompt.

The rows a trimmed module sees are the same rows it would compute in full, so the loss and
gradients are the untrimmed ones (up to the order of fp32 sums inside a matmul). A layer that
recomputes its forward in the backward (activation checkpointing) is left whole: the
recomputation runs after `target_rows` has ended.
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

# model_type of the families whose decoder layer is LLaMA's residual layout around `mlp` and
# `self_attn.o_proj` (checked against transformers 5.x); others keep the whole layer
TRIMMABLE_FAMILIES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "gemma3", "gemma3_text"}
)
_TRIMMED = ("mlp", "self_attn.o_proj")


def _rows_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    whole = self.__dict__["whole_forward"]
    rows: torch.Tensor | None = self.__dict__.get("target_rows")
    if rows is None:
        return whole(x, *args, **kwargs)  # type: ignore[no-any-return]
    flat = x.reshape(-1, x.shape[-1])
    part: torch.Tensor = whole(flat.index_select(0, rows), *args, **kwargs)
    out = part.new_zeros(flat.shape[0], part.shape[-1]).index_copy(0, rows, part)
    return out.view(*x.shape[:-1], part.shape[-1])


def _last_layer(model: nn.Module) -> nn.Module | None:
    get_base = getattr(model, "get_base_model", None)
    base = get_base() if callable(get_base) else model
    config = getattr(base, "config", None)
    text = config.get_text_config() if config is not None else None
    if getattr(text, "model_type", None) not in TRIMMABLE_FAMILIES:
        return None
    decoder: Any = base.get_decoder()  # type: ignore[operator]  # PreTrainedModel's method
    layers = getattr(decoder, "layers", None)
    return layers[-1] if isinstance(layers, nn.ModuleList) and len(layers) else None


def trim_last_layer(model: nn.Module) -> list[nn.Module]:
    """Give the last decoder layer's `mlp` and `self_attn.o_proj` the rows-only forward
    (inactive until `target_rows`); returns the modules, none for other families."""
    last = _last_layer(model)
    if last is None:
        return []
    trimmed = []
    for name in _TRIMMED:
        try:
            module = last.get_submodule(name)
        except AttributeError:
            continue
        if "whole_forward" in module.__dict__:
            continue
        module.__dict__["whole_forward"] = module.forward
        module.forward = types.MethodType(_rows_forward, module)
        trimmed.append(module)
    model.__dict__["trimmed_last_layer"] = (last, trimmed)
    return trimmed


@contextlib.contextmanager
def target_rows(model: nn.Module, selected: torch.Tensor) -> Iterator[bool]:
    """While active, the trimmed modules compute only the rows where `selected` ([batch,
    seq] bool) is True; yields whether they do (not for an untrimmed model, a checkpointed
    last layer in training, or no targets)."""
    last, modules = model.__dict__.get("trimmed_last_layer", (None, []))
    checkpointed = bool(
        last is not None and last.training and getattr(last, "gradient_checkpointing", False)
    )
    rows = selected.flatten().nonzero().squeeze(1) if modules and not checkpointed else None
    if rows is None or rows.numel() == 0:
        yield False
        return
    for module in modules:
        module.__dict__["target_rows"] = rows
    try:
        yield True
    finally:
        for module in modules:
            module.__dict__["target_rows"] = None
