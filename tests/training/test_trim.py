"""`trim.py`: the last layer's MLP and o_proj at target positions only, the same loss."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

import worker.training.model as model_module
from tests.training.helpers import lora_model_and_batch
from worker.training.data import IGNORE_INDEX
from worker.training.model import batch_loss
from worker.training.trim import target_rows


def _setup(model_dir: Path, **overrides: Any) -> tuple[Any, Any]:
    return lora_model_and_batch(model_dir, compute_dtype="float32", dropout=0.0, **overrides)


def _last_mlp(model: Any) -> Any:
    return model.get_base_model().get_decoder().layers[-1].mlp


def test_same_loss_and_gradients_on_fewer_rows(
    tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, batch = _setup(tiny_model_dir, gradient_checkpointing=False)
    mlp = _last_mlp(model)
    whole = mlp.__dict__["whole_forward"]
    seen: list[int] = []

    def counting(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.reshape(-1, x.shape[-1]).shape[0])
        return whole(x)  # type: ignore[no-any-return]

    mlp.__dict__["whole_forward"] = counting

    def loss_and_grads() -> tuple[float, dict[str, torch.Tensor]]:
        model.zero_grad()
        loss = batch_loss(model, batch).loss
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        return loss.item(), grads

    trimmed_loss, trimmed = loss_and_grads()
    targets = int((batch.targets != IGNORE_INDEX).sum())
    assert seen == [targets] and targets < batch.input_ids.numel() / 2

    @contextlib.contextmanager
    def untrimmed(*args: Any) -> Iterator[bool]:
        yield False

    monkeypatch.setattr(model_module, "target_rows", untrimmed)
    whole_loss, whole_grads = loss_and_grads()
    assert seen[-1] == batch.input_ids.numel()
    assert trimmed_loss == pytest.approx(whole_loss, rel=1e-6)
    assert trimmed.keys() == whole_grads.keys() and trimmed
    for name, grad in whole_grads.items():
        scale = grad.abs().max().item()
        torch.testing.assert_close(trimmed[name], grad, rtol=1e-4, atol=1e-5 * scale, msg=name)


def test_whole_outside_the_loss_and_when_checkpointed(tiny_model_dir: Path) -> None:
    model, batch = _setup(tiny_model_dir, gradient_checkpointing=False)
    inputs = {"input_ids": batch.input_ids, "position_ids": batch.position_ids}
    with torch.no_grad():
        before = model(**inputs).logits
        batch_loss(model, batch)  # trims inside, and ends it
        after = model(**inputs).logits
    assert torch.equal(before, after)
    selected = batch.targets != IGNORE_INDEX
    with target_rows(model, selected) as trimming:
        assert trimming
    with target_rows(model, torch.zeros_like(selected)) as trimming:
        assert not trimming  # no targets: nothing to compute them on

    checkpointed, batch = _setup(tiny_model_dir, gradient_checkpointing=True)
    with target_rows(checkpointed, batch.targets != IGNORE_INDEX) as trimming:
        assert not trimming  # its recomputation would run after the context ends
