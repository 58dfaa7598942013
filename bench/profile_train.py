"""Where a training side spends its CPU time: `torch.profiler` over one side of
`bench/train_throughput.py` (same model, rows and hyperparameters), top ops by self CPU time.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/profile_train.py \
        [--side engine|trainer_grouped|trl_sft|trl_packed] [--model small|base] [--steps 8] \
        [--checkpointing off|on] [--dtype float32|bfloat16] [--vocab bytes|32000] \
        [--engine-tokens 4096] [--by-shape aten::copy_,aten::mul]

`--by-shape` also lists the named ops' self CPU time per input shape (which tensors a copy,
a multiply or a `where` runs on tells which layer code calls it).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

from bench import train_throughput as tt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", choices=tt.SIDES, default="engine")
    parser.add_argument("--model", choices=sorted(tt.MODELS), default="small")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--checkpointing", choices=("on", "off"), default="off")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--vocab", default="bytes")
    parser.add_argument("--engine-tokens", type=int, default=0)
    parser.add_argument("--top", type=int, default=20)
    parser.add_argument("--by-shape", default="", help="comma list of op names, e.g. aten::copy_")
    args = parser.parse_args()

    from torch.profiler import ProfilerActivity, profile

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model_dir, rows, _ = tt.build_bed(args.model, tmp, args.vocab, args.rows)
        data = tmp / "train.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        shapes = [op for op in args.by_shape.split(",") if op]
        with profile(activities=[ProfilerActivity.CPU], record_shapes=bool(shapes)) as prof:
            start = time.monotonic()
            result = tt.RUNNERS[args.side](model_dir, data, tmp / "out", args)
            wall = time.monotonic() - start
    print(
        f"{args.side} on {args.model}: {result['real_tokens']} real tokens, "
        f"{result['tokens_per_s']:.1f} tokens/s, {wall:.1f} s with the model load"
    )
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.top))
    if shapes:
        grouped: list[Any] = list(prof.key_averages(group_by_input_shape=True))
        for op in shapes:
            ranked = sorted(
                (e for e in grouped if e.key == op), key=lambda e: -e.self_cpu_time_total
            )
            print(f"{op} by input shape (self CPU s, calls, shapes):")
            for e in ranked[:8]:
                print(f"  {e.self_cpu_time_total / 1e6:8.3f} {e.count:6d}  {e.input_shapes}")


if __name__ == "__main__":
    main()
