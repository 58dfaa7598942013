"""Three of the engine's CPU parts against what they replace, alternating, several repeats.

* `norm`: LLaMA's RMSNorm as `prepare_for_training` leaves it (fp32 weight holding bf16
  values, the `_autocast_output` cast) against `norms.FusedRMSNorm`, forward and backward
  of a bf16 `[tokens, hidden]` input under CPU autocast.
* `mask`: the 64-bit words behind one dropout mask, from torch's default CPU generator
  (`random_(-2**63, None)`, what `keep_mask` used) against numpy's SFC64 seeded by one torch
  draw (what it uses now).
* `attention`: one decoder layer's attention of a packed row, forward and backward, for the
  example lengths of `bench/train_throughput.py`'s 32,000-token bed (79 examples of 15-403
  tokens in 4 steps; 16 heads of 64, bf16): torch's flash kernel per example (sdpa, what
  `packed_examples` used) against `attention._CausalAttention` (what it uses now). The time
  is for all 4 steps.

    PYTHONPATH=. .venv/bin/python bench/engine_parts.py [--tokens 3941] [--hidden 1024]
        [--repeats 7] [--inner 10]

Prints min / median / max milliseconds per call of each side. Run it alone: two cores shared
with anything else measure the other thing.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch
from torch.nn import functional as F
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from worker.training.attention import _CausalAttention
from worker.training.model import _autocast_output
from worker.training.norms import FusedRMSNorm

# the 79 example lengths, in tokens, that the engine trains on in the 4 steps of
# `bench/train_throughput.py --vocab 32000 --engine-tokens 4096` (both models: 15,810 tokens;
# recorded at layer 0), dealt into 4
# packed rows after a seeded shuffle
BED_LENGTHS = [
    15, 21, 37, 38, 42, 45, 47, 66, 66, 67, 75, 79, 80, 88, 90, 91, 96, 128, 128, 132,
    133, 150, 158, 162, 164, 170, 172, 175, 175, 175, 176, 177, 180, 180, 182, 186, 189, 190,
    193, 202, 204, 210, 216, 219, 229, 231, 234, 236, 236, 237, 238, 241, 252, 253, 257, 268,
    272, 276, 277, 277, 279, 282, 285, 289, 294, 296, 298, 303, 305, 315, 317, 317, 324, 331,
    342, 349, 349, 349, 403,
]  # fmt: skip


def per_call_ms(fn: Callable[[], object], inner: int) -> float:
    start = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - start) / inner * 1e3


def compare(sides: dict[str, Callable[[], object]], repeats: int, inner: int) -> None:
    for fn in sides.values():
        fn()  # warm up
    times: dict[str, list[float]] = {name: [] for name in sides}
    names = list(sides)
    for r in range(repeats):
        for name in names if r % 2 == 0 else reversed(names):
            times[name].append(per_call_ms(sides[name], inner))
    for name, values in times.items():
        print(
            f"  {name:>24}: {min(values):7.2f} / {statistics.median(values):7.2f} / "
            f"{max(values):7.2f} ms"
        )


def norm_sides(tokens: int, hidden: int) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    norm = LlamaRMSNorm(hidden, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_((1 + 0.1 * torch.randn(hidden)).to(torch.bfloat16).float())
    norm.weight.requires_grad_(False)
    norm.register_forward_hook(_autocast_output)
    x = torch.randn(1, tokens, hidden).to(torch.bfloat16).requires_grad_()
    grad = torch.randn(1, tokens, hidden).to(torch.bfloat16)

    def stock() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = norm(x)
        y.backward(grad)

    def fused() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = FusedRMSNorm.apply(x, norm.weight, norm.variance_epsilon)  # type: ignore[no-untyped-call]
        y.backward(grad)

    return {"stock norm + cast": stock, "FusedRMSNorm": fused}


def mask_sides(words: int) -> dict[str, Callable[[], object]]:
    def torch_words() -> torch.Tensor:
        return torch.empty(words, dtype=torch.int64).random_(-(1 << 63), None)

    def sfc64_words() -> torch.Tensor:
        seed = int(torch.empty((), dtype=torch.int64).random_())
        return torch.from_numpy(np.random.SFC64(seed).random_raw(words).view(np.int64))

    return {"torch random_": torch_words, "numpy SFC64": sfc64_words}


def attention_sides(heads: int = 16, dim: int = 64) -> dict[str, Callable[[], object]]:
    torch.manual_seed(0)
    shuffled = list(BED_LENGTHS)
    random.Random(0).shuffle(shuffled)
    rows = []
    for lengths in (shuffled[i::4] for i in range(4)):
        total = sum(lengths)
        q, k, v = (
            torch.randn(1, total, heads, dim).to(torch.bfloat16).transpose(1, 2).requires_grad_()
            for _ in range(3)
        )
        rows.append((lengths, q, k, v, torch.randn(1, total, heads, dim).to(torch.bfloat16)))

    def run(one: Callable[..., torch.Tensor]) -> None:
        for lengths, q, k, v, grad in rows:
            parts = zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2), strict=True)
            torch.cat([one(a, b, c) for a, b, c in parts], dim=1).backward(grad)

    def flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2)

    def batched(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        a, b, c = (t[0].contiguous() for t in (q, k, v))
        out: torch.Tensor = _CausalAttention.apply(a, b, c, dim**-0.5)  # type: ignore[no-untyped-call]
        return out.transpose(0, 1).unsqueeze(0)

    return {"flash per example": lambda: run(flash), "_CausalAttention": lambda: run(batched)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=3941)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=10)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"norm: [{args.tokens}, {args.hidden}] bf16, forward + backward per call")
    compare(norm_sides(args.tokens, args.hidden), args.repeats, args.inner)
    for width in (args.hidden, args.intermediate):
        words = args.tokens * width // 4
        print(f"mask: {words} 64-bit words (a [{args.tokens}, {width}] mask, 4 lanes a word)")
        compare(mask_sides(words), args.repeats, args.inner)
    print("attention: one layer, 4 steps of the bed's packed rows, forward + backward per call")
    compare(attention_sides(), args.repeats, 1)


if __name__ == "__main__":
    main()
