"""NF4 QLoRA vs FP4 QLoRA vs 16-bit LoRA on the same task, data, seed and steps.

The task: `text` rows from a small random grammar ("the quiet fox sees a red lamp."), held-out
sentences for evaluation, on the locally built tiny LLaMA. Each run starts from the same base
weights; only the storage of the frozen base differs (NF4 / FP4 with double quantization,
or bfloat16). QLoRA's claim is that NF4 matches 16-bit.

    .venv/bin/python bench/parity.py [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
from pathlib import Path

from shared.train_spec import TrainSpec
from worker.training import train
from worker.training.tiny import build_tiny_model

ADJ = ["quiet", "red", "small", "old", "bright", "lazy", "green", "tall"]
NOUN = ["fox", "lamp", "river", "child", "tower", "cat", "stone", "bird"]
VERB = ["sees", "finds", "likes", "moves", "paints", "hears"]


def sentence(rng: random.Random) -> str:
    def phrase() -> str:
        return f"{rng.choice(['the', 'a'])} {rng.choice(ADJ)} {rng.choice(NOUN)}"

    return f"{phrase()} {rng.choice(VERB)} {phrase()}."


def write_rows(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps({"text": sentence(rng)}) + "\n" for _ in range(n)))
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        model = build_tiny_model(tmp / "model")
        train_path = write_rows(tmp / "train.jsonl", 600, seed=1)
        val_path = write_rows(tmp / "val.jsonl", 64, seed=2)
        rows = []
        for label, quant, dtype in (
            ("NF4 QLoRA", "nf4", "float32"),
            ("FP4 QLoRA", "fp4", "float32"),
            ("16-bit LoRA (bf16 base)", "none", "bfloat16"),
        ):
            spec = TrainSpec(
                base_model=str(model),
                quant_type=quant,
                double_quant=quant != "none",
                compute_dtype=dtype,
                max_steps=args.steps,
                batch_size=8,
                gradient_accumulation_steps=1,
                learning_rate=2e-3,
                max_seq_length=64,
                checkpoint_steps=None,
                seed=0,
            )
            result = train(spec, train_path, tmp / quant, validation_path=val_path)
            m = result.metrics
            rows.append((label, m["eval_loss_before"], m["eval_loss_after"]))
    print(f"tiny LLaMA 3.0M params, LoRA r=16 all-linear, {args.steps} steps x 8 rows, seed 0")
    print(f"{'run':26}{'eval before':>12}{'eval after':>12}")
    for label, before, after in rows:
        print(f"{label:26}{before:12.4f}{after:12.4f}")
    nf4, sixteen = rows[0][2], rows[2][2]
    print(f"NF4 - 16-bit final eval loss: {nf4 - sixteen:+.4f} ({(nf4 / sixteen - 1) * 100:+.2f}%)")


if __name__ == "__main__":
    main()
