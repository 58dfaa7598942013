"""`python -m worker.training --spec spec.json --data train.jsonl --out DIR`: one run, no queue.

`python -m worker.training merge --base DIR --adapter DIR --out DIR [--dtype bf16|fp16]
[--rows FILE]`: merge a run's adapter into its base (see `worker.training.merge`).

Ctrl-C (or SIGTERM) once asks for a preemption: the current step finishes, a checkpoint is
written and its path printed, to be passed back with `--resume`. A second Ctrl-C cancels.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path
from types import FrameType

from pydantic import ValidationError
from tqdm import tqdm
from transformers.utils import logging as hf_logging

from shared.train_spec import TrainSpec
from worker.training import CheckpointError, StepMetrics, StopRequest, TrainHooks, train


class ConsoleHooks(TrainHooks):
    """A tqdm bar per step, evaluations and checkpoints printed above it, signal handling."""

    def __init__(self) -> None:
        self.bar: tqdm[None] | None = None
        self.stop: StopRequest | None = None

    def on_progress(self, metrics: StepMetrics) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=metrics.total_steps,
                initial=metrics.step - 1,
                unit="step",
                dynamic_ncols=True,
            )
        self.bar.set_postfix(
            loss=f"{metrics.loss:.4f}",
            lr=f"{metrics.lr:.2e}",
            tok_s=f"{metrics.tokens_per_second:.0f}",
        )
        self.bar.update(1)

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        tqdm.write(f"step {step}: eval loss {eval_loss:.4f}, perplexity {perplexity:.2f}")

    def on_checkpoint(self, path: Path, step: int) -> None:
        tqdm.write(f"step {step}: checkpoint {path}")

    def should_stop(self) -> StopRequest | None:
        return self.stop

    def request_stop(self, signum: int, frame: FrameType | None) -> None:
        self.stop = StopRequest.CANCEL if self.stop else StopRequest.PREEMPT
        tqdm.write(f"stop requested: {self.stop}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m worker.training", description=__doc__)
    parser.add_argument("--spec", type=Path, required=True, help="TrainSpec JSON file")
    parser.add_argument("--data", type=Path, required=True, help="training JSONL")
    parser.add_argument("--validation", type=Path, help="validation JSONL (else a split)")
    parser.add_argument("--out", type=Path, required=True, help="output folder")
    parser.add_argument("--resume", type=Path, help="checkpoint folder to resume from")
    parser.add_argument(
        "--base-model-path", type=Path, help="base model folder (default: spec.base_model)"
    )
    return parser.parse_args(argv)


MERGE_DTYPE_NAMES = {
    "bf16": "bfloat16",
    "fp16": "float16",
    "bfloat16": "bfloat16",
    "float16": "float16",
}


def merge_main(argv: list[str]) -> int:
    """The `merge` subcommand: base + adapter -> a 16-bit model folder with parity.json."""
    from worker.training.merge import (
        MergeError,
        merge_adapter_folder,
        parity_rows,
        read_adapter_spec,
    )

    parser = argparse.ArgumentParser(
        prog="python -m worker.training merge",
        description="Merge a LoRA adapter into its (dequantized) 4-bit base; save safetensors.",
    )
    parser.add_argument("--base", type=Path, required=True, help="base model folder")
    parser.add_argument("--adapter", type=Path, required=True, help="a run's output folder")
    parser.add_argument("--out", type=Path, required=True, help="folder to write")
    parser.add_argument("--dtype", choices=sorted(MERGE_DTYPE_NAMES), default="bf16")
    parser.add_argument("--rows", type=Path, help="JSONL rows for the parity report (last 8)")
    args = parser.parse_args(argv)
    hf_logging.disable_progress_bar()
    try:
        spec = read_adapter_spec(args.adapter)
        rows, source = parity_rows(spec, rows_path=args.rows)
        result = merge_adapter_folder(
            args.base,
            args.adapter,
            args.out,
            dtype=MERGE_DTYPE_NAMES[args.dtype],
            rows=rows,
            rows_source=source,
        )
    except (MergeError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(json.dumps({"output_dir": str(result.output_dir), **result.parity.to_json()}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["merge"]:
        return merge_main(argv[1:])
    args = parse_args(argv)
    try:
        spec = TrainSpec.model_validate_json(args.spec.read_text(encoding="utf-8"))
    except ValidationError as exc:
        print(f"invalid spec {args.spec}:\n{exc}", file=sys.stderr)
        return 2
    hf_logging.disable_progress_bar()
    hooks = ConsoleHooks()
    signal.signal(signal.SIGINT, hooks.request_stop)
    signal.signal(signal.SIGTERM, hooks.request_stop)
    try:
        result = train(
            spec,
            args.data,
            args.out,
            hooks,
            validation_path=args.validation,
            resume_from=args.resume,
            base_model_path=args.base_model_path,
        )
    except (CheckpointError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        hooks.close()
    if result.stopped is not None:
        print(f"stopped ({result.stopped}) at step {result.step}/{result.total_steps}")
        if result.checkpoint is not None:
            print(f"resume with: --resume {result.checkpoint}")
        return 3
    m = result.metrics
    summary = {
        "output_dir": str(result.output_dir),
        "steps": result.step,
        "eval_loss_before": m["eval_loss_before"],
        "eval_loss_after": m["eval_loss_after"],
        "train_tokens": m["train_tokens"],
        "padding_fraction": round(m["padding_fraction"], 4),
        "truncated_rows": m["truncated_rows"],
        "trainable_params": result.trainable_params,
        "total_params": result.total_params,
        "wall_seconds": round(m["wall_seconds"], 1),
        "peak_rss_mib": round(m["peak_rss_bytes"] / 2**20, 1),
    }
    print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
