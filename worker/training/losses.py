"""Cross-entropy over the vocabulary in chunks of tokens, with token accuracy at no extra cost.

The output head turns each hidden state into `vocab_size` logits; for a micro-batch of T
target tokens the full `[T, vocab]` fp32 logits (and their gradient, and log-softmax's saved
output) are often the largest tensors of a QLoRA step. Here the targets are processed
`chunk_size` tokens at a time: head, upcast to fp32, soft-capping, cross-entropy and argmax per
chunk. With a frozen head (the QLoRA default) each chunk's gradient for the hidden states is
made right there, in the forward (`_FrozenHeadCrossEntropy`, the fused linear cross-entropy
of Liger and Unsloth): the logits exist once, are never recomputed, and the backward is one
scaling. A trained head keeps each chunk under activation checkpointing, so the backward
recomputes one chunk's logits at a time. Either way what stays resident is the hidden states
(already there) plus one chunk's logits. The sum over chunks equals the unchunked loss and
gradient (up to the order of floating-point summation); the argmax comes from the same
logits, so the accuracy costs one reduction per chunk.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from shared.estimate import LOGITS_CHUNK_ELEMENTS

# Logits per chunk (tokens x vocabulary): 2**24 fp32 values are 64 MiB; with the compute-dtype
# copy, log-softmax's output and the gradient, a chunk's peak is about 3.5x that. The memory
# estimator counts the same chunk.
CHUNK_LOGITS = LOGITS_CHUNK_ELEMENTS


def chunk_tokens(vocab_size: int, budget: int | None = None) -> int:
    """Tokens per chunk so that one chunk holds at most `budget` (default `CHUNK_LOGITS`)
    logits, at least 1 token."""
    return max(1, (budget or CHUNK_LOGITS) // max(1, vocab_size))


@dataclass(frozen=True)
class LossSum:
    """A batch's summed cross-entropy (differentiable, fp32) and its correct argmax count."""

    loss: torch.Tensor
    correct: torch.Tensor  # int64 scalar: tokens whose argmax logit is the label
    tokens: int


def head_logits(head: nn.Module, hidden: torch.Tensor, softcap: float | None) -> torch.Tensor:
    """fp32 logits of `hidden` (with Gemma-style final soft-capping when `softcap`)."""
    logits: torch.Tensor = head(hidden).float()
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return logits


def _chunk_loss(
    head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    logits = head_logits(head, hidden, softcap)
    loss = F.cross_entropy(logits, targets, reduction="sum")
    correct = (logits.detach().argmax(dim=-1) == targets).sum()
    return loss, correct


def _chunk_logprobs(
    head: nn.Module, softcap: float | None, hidden: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    logits = head_logits(head, hidden, softcap)
    return -F.cross_entropy(logits, targets, reduction="none")


class _FrozenHeadCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of a frozen linear head's logits, chunk by chunk, with the
    gradient for the hidden states worked out during the forward.

    The loss is a sum, so its gradient for the hidden states is the upstream scalar times
    `(softmax(z) - onehot(target)) @ W` (times soft-capping's derivative where there is
    one), known as soon as a chunk's logits are. Each chunk's logits are made once, in the
    compute dtype and upcast to fp32 as the autograd path does, turned in place into that
    gradient, multiplied back through the head, and dropped: no recomputation of the head in
    the backward, no saved log-softmax, no separate backward of the cross-entropy. What is
    kept for the backward is `[N, hidden]` fp32. Only for a frozen head (the QLoRA default);
    a trained one (`modules_to_save`) takes the checkpointed path.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        head: nn.Linear,
        softcap: float | None,
        chunk_size: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        n = targets.shape[0]
        grad_hidden = torch.empty(hidden.shape, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.int64, device=targets.device)
        for start in range(0, n, chunk_size):
            h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
            raw = head(h)  # compute dtype under autocast
            logits = raw.float()  # an fp32 copy (raw itself when it is fp32 already)
            deriv = None
            if softcap:
                logits = torch.tanh(logits / softcap)
                deriv = 1 - logits * logits  # d(cap * tanh(z / cap)) / dz
                logits.mul_(softcap)
            top, predicted = logits.max(dim=-1, keepdim=True)
            correct += (predicted.squeeze(1) == t).sum()
            logits.sub_(top)  # z - max, in place: from here on the chunk becomes its gradient
            shifted_target = logits.gather(1, t[:, None])
            grad = logits.exp_()
            total = grad.sum(dim=-1, keepdim=True)
            loss += (total.log() - shifted_target).sum()  # logsumexp(z) - z_target
            grad.div_(total)  # softmax
            grad.scatter_add_(1, t[:, None], grad.new_full((t.shape[0], 1), -1.0))
            if deriv is not None:
                grad.mul_(deriv)
            del logits, deriv
            grad_hidden[start : start + chunk_size] = torch.mm(grad.to(raw.dtype), head.weight)
            del raw, grad
        ctx.save_for_backward(grad_hidden)
        ctx.hidden_dtype = hidden.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(
        ctx: Any, grad_loss: torch.Tensor, _grad_correct: torch.Tensor | None
    ) -> tuple[torch.Tensor, None, None, None, None]:
        (grad_hidden,) = ctx.saved_tensors
        return (grad_hidden * grad_loss).to(ctx.hidden_dtype), None, None, None, None


def _is_frozen_linear(head: nn.Module) -> bool:
    """A bias-free `nn.Linear` head that is not trained."""
    return type(head) is nn.Linear and head.bias is None and not head.weight.requires_grad


def _needs_grad(head: nn.Module, hidden: torch.Tensor) -> bool:
    if not torch.is_grad_enabled():
        return False
    return hidden.requires_grad or any(p.requires_grad for p in head.parameters())


def chunked_cross_entropy(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> LossSum:
    """Summed next-token cross-entropy of `hidden` `[N, h]` against `targets` `[N]` (every
    target valid), and how many argmax predictions equal the target.

    `chunk_size` tokens at a time (default: `chunk_tokens(vocab)`). Under autograd, a frozen
    head takes `_FrozenHeadCrossEntropy` (the gradient made in the forward); a trained one
    runs each chunk under non-reentrant checkpointing, which also restores the autocast state
    for the recomputation.
    """
    n = targets.shape[0]
    if chunk_size is None:
        weight = getattr(head, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1
        chunk_size = chunk_tokens(vocab)
    fn = partial(_chunk_loss, head, softcap)
    grad = _needs_grad(head, hidden)
    if grad and n and _is_frozen_linear(head):
        loss, right = _FrozenHeadCrossEntropy.apply(hidden, targets, head, softcap, chunk_size)
        return LossSum(loss=loss, correct=right, tokens=n)
    losses: list[torch.Tensor] = []
    correct = torch.zeros((), dtype=torch.int64, device=targets.device)
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        if grad:
            loss, right = checkpoint(fn, h, t, use_reentrant=False)
        else:
            loss, right = fn(h, t)
        losses.append(loss)
        correct = correct + right
    total = torch.stack(losses).sum() if losses else hidden.new_zeros((), dtype=torch.float32)
    return LossSum(loss=total, correct=correct, tokens=n)


def chunked_target_logprobs(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: nn.Module,
    *,
    softcap: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Per-token log-probabilities `[N]` (fp32, differentiable) of `targets` under the head,
    chunked like `chunked_cross_entropy` (for sequence log-likelihoods, e.g. DPO)."""
    n = targets.shape[0]
    if chunk_size is None:
        weight = getattr(head, "weight", None)
        vocab = int(weight.shape[0]) if isinstance(weight, torch.Tensor) else 1
        chunk_size = chunk_tokens(vocab)
    fn = partial(_chunk_logprobs, head, softcap)
    grad = _needs_grad(head, hidden)
    parts = []
    for start in range(0, n, chunk_size):
        h, t = hidden[start : start + chunk_size], targets[start : start + chunk_size]
        parts.append(checkpoint(fn, h, t, use_reentrant=False) if grad else fn(h, t))
    if not parts:
        return hidden.new_zeros((0,), dtype=torch.float32)
    return torch.cat(parts)
