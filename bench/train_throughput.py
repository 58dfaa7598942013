"""The engine against the strongest standard recipes, in one invocation.

Sides (same base model, data, hyperparameters, optimizer, optimizer steps and seed; each run in
its own subprocess so peak RSS is its own):

* `engine`: this service's engine (packed rows, per-example attention).
* `trl_sft`: TRL `SFTTrainer`, standard recipe (prompt/completion rows, loss on completions,
  random batches padded to their longest row).
* `trl_packed`: TRL `SFTTrainer` with `packing=True` (best-fit-decreasing packing into
  `max_length` rows, padding-free with position ids).
* `trainer_grouped`: transformers `Trainer` with `train_sampling_strategy="group_by_length"`
  (the one-flag fix for padding), padded collator.

Per side and run: non-padding tokens per second of wall time of the step loop and per CPU
second of the whole child, padding fraction, peak RSS, and the final eval loss: every side's
adapter is loaded onto a fresh NF4 base by the same code and scored on the same held-out rows
(mean cross-entropy over completion tokens and EOS). Model FLOP utilisation (MFU) is the
model's training FLOPs per second divided by this machine's matmul peak in the compute dtype,
measured in the same invocation with a large `torch.matmul`. Sides alternate; each side runs
`--repeats` times and the table shows min / median / max.

    HF_HUB_OFFLINE=1 PYTHONPATH=. .venv/bin/python bench/train_throughput.py \
        [--models small,base] [--steps 8] [--repeats 3] [--sides engine,trl_sft,...] \
        [--checkpointing on|off|engine=off,trl_sft=on,...] [--dtype float32|bfloat16] \
        [--vocab bytes|32000] [--engine-tokens 4096]

`small` is a 26M-parameter LLaMA (hidden 512, 8 layers), `base` a 158M one (hidden 1024,
12 layers, intermediate 2816), both with a byte-level tokenizer; `--vocab 32000` gives them a
BPE tokenizer trained to 32,000 tokens (a real model's head) and rows in its words.
`--engine-tokens 4096` gives the engine trl_packed's budget of 8 rows of up to 512 tokens.
TRL and `datasets` are benchmark extras (`pip install trl`), not service dependencies.

Every side's process gets the same `THP_MEM_ALLOC_ENABLE` (torch's huge pages for large CPU
tensors): the worker's default, 1, unless the caller's environment sets it. It is a process
setting the worker makes (`worker/__init__.py`), not engine code, so the peers get it too.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODELS: dict[str, dict[str, int]] = {
    "small": {
        "hidden_size": 512,
        "intermediate_size": 1408,
        "num_hidden_layers": 8,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
    },
    "base": {
        "hidden_size": 1024,
        "intermediate_size": 2816,
        "num_hidden_layers": 12,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
}
SIDES = ("engine", "trl_sft", "trl_packed", "trainer_grouped")
# Where every side trains and scores (`--device`; set in each child). On "cpu" the children
# see no GPU at all, so the engine (which trains wherever CUDA is) stays on the CPU too.
DEVICE = "cpu"
MAX_LEN = 512
EVAL_ROWS = 48


def make_rows(n: int, seed: int) -> list[dict[str, str]]:
    """Prompts of 16-400 bytes and completions of 8-120 bytes: lengths vary ~25x. The
    completion repeats the prompt's last words, so there is something to learn."""
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]

    def text(lo: int, hi: int) -> str:
        out = ""
        target = rng.randint(lo, hi)
        while len(out) < target:
            out += rng.choice(words) + " "
        return out[:target].strip() or "alpha"

    rows = []
    for _ in range(n):
        prompt = text(16, 400)
        tail = prompt.split()[-rng.randint(1, 12) :]
        rows.append({"prompt": prompt, "completion": " ".join(reversed(tail)) + " ."})
    return rows


def lexicon(n: int, rng: random.Random) -> list[str]:
    """`n` distinct pseudo-words of one to four consonant-vowel syllables."""
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words: set[str] = set()
    while len(words) < n:
        words.add(
            "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        )
    return sorted(words)


class WordText:
    """Text drawn from a Zipf-distributed lexicon of pseudo-words, like natural language:
    what a BPE tokenizer with a real model's vocabulary (32,000 for Llama-2, Mistral and
    Phi-3) is trained on, and what the benchmark's rows are written in."""

    def __init__(self, seed: int, size: int = 60_000) -> None:
        self.rng = random.Random(seed)
        self.words = lexicon(size, self.rng)
        self.rng.shuffle(self.words)
        weights = [1.0 / (rank + 2.7) for rank in range(size)]
        total, self.cum = 0.0, []
        for w in weights:
            total += w
            self.cum.append(total)

    def sample(self, k: int) -> list[str]:
        return self.rng.choices(self.words, cum_weights=self.cum, k=k)

    def corpus(self, lines: int, words_per_line: int = 100) -> list[str]:
        return [" ".join(self.sample(words_per_line)) for _ in range(lines)]

    def rows(self, n: int) -> list[dict[str, str]]:
        """Prompts of 8-240 words; the completion repeats the prompt's last 2-120 words
        reversed (about a third of the tokens), so there is something to learn. It starts with
        a space: the text is prompt + completion, and tokenizing the two apart or together
        gives the same tokens."""
        out = []
        for _ in range(n):
            prompt = self.sample(self.rng.randint(8, 240))
            tail = prompt[-self.rng.randint(2, min(120, len(prompt))) :]
            out.append({"prompt": " ".join(prompt), "completion": " " + " ".join(reversed(tail))})
        return out


def bpe_tokenizer(corpus: list[str], vocab_size: int) -> Any:
    """A byte-level BPE tokenizer (GPT-2 / Llama-3 style) trained on `corpus` to
    `vocab_size` tokens, with the tiny model's special tokens and chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from worker.training.tiny import BOS, EOS, PAD, ROLE_TOKENS, wrap_tokenizer

    specials = [BOS, EOS, PAD, *ROLE_TOKENS]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(  # type: ignore[call-arg]
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus, trainer)
    backend.post_processor = processors.TemplateProcessing(  # type: ignore[call-arg]
        single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))]
    )
    return wrap_tokenizer(backend)


def hyper(args: argparse.Namespace) -> dict[str, Any]:
    return {
        "batch_size": args.batch_size,
        "max_steps": args.steps,
        "learning_rate": 1e-3,
        "rank": 16,
        "alpha": 32,
        "dropout": 0.05,
        "seed": 0,
    }


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def load_nf4(model_dir: Path, dtype: str = "float32") -> Any:
    """The standard QLoRA load: NF4 + double quant, computing in `dtype`, unquantized weights
    in `dtype`."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    torch_dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(
        model_dir,
        quantization_config=BitsAndBytesConfig(  # type: ignore[no-untyped-call]
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch_dtype,
        ),
        dtype=torch_dtype,
        device_map={"": DEVICE},
    )


def peft_model(model_dir: Path, checkpointing: bool, dtype: str) -> Any:
    """The standard QLoRA preparation shared by the Trainer and TRL sides."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
        load_nf4(model_dir, dtype),
        use_gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    return get_peft_model(
        model,
        LoraConfig(
            r=16,
            lora_alpha=32,
            lora_dropout=0.05,
            target_modules="all-linear",
            task_type="CAUSAL_LM",
        ),
    )


def encode(tok: Any, row: dict[str, str]) -> tuple[list[int], list[int]]:
    prompt = tok(row["prompt"])["input_ids"]
    completion = tok(row["completion"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    ids = (prompt + completion)[:MAX_LEN]
    labels = ([-100] * len(prompt) + completion)[:MAX_LEN]
    return ids, labels


def eval_loss(model_dir: Path, adapter_dir: Path, rows: list[dict[str, str]]) -> float:
    """The same scoring for every side: its adapter on a fresh NF4 base, one row at a time."""
    import torch
    from peft import PeftModel
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = PeftModel.from_pretrained(load_nf4(model_dir), adapter_dir).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            ids, labels = encode(tok, row)
            logits = model(input_ids=torch.tensor([ids], device=DEVICE)).logits[0, :-1].float()
            target = torch.tensor(labels[1:], device=DEVICE)
            loss = torch.nn.functional.cross_entropy(
                logits, target, ignore_index=-100, reduction="sum"
            )
            total += float(loss)
            count += int((target != -100).sum())
    return total / count


def run_engine(model_dir: Path, data: Path, out: Path, args: argparse.Namespace) -> dict[str, Any]:
    from shared.train_spec import TrainSpec
    from worker.training import StepMetrics, TrainHooks, train

    class Clock(TrainHooks):
        tokens_per_s = 0.0

        def on_progress(self, metrics: StepMetrics) -> None:
            self.tokens_per_s = metrics.tokens_per_second

    h = hyper(args)
    spec = TrainSpec(
        base_model=str(model_dir),
        max_seq_length=MAX_LEN,
        batch_size=h["batch_size"],
        max_tokens_per_batch=args.engine_tokens or None,
        gradient_accumulation_steps=1,
        max_steps=h["max_steps"],
        learning_rate=h["learning_rate"],
        lr_scheduler="constant",
        warmup_ratio=0.0,
        compute_dtype=args.dtype,
        quant_type="nf4",
        double_quant=True,
        rank=h["rank"],
        alpha=h["alpha"],
        dropout=h["dropout"],
        optimizer="paged_adamw_8bit",
        gradient_checkpointing=args.checkpointing == "on",
        validation_fraction=0.0,
        checkpoint_steps=None,
        seed=h["seed"],
    )
    clock = Clock()
    result = train(spec, data, out, clock)
    m = result.metrics
    return {
        "tokens_per_s": clock.tokens_per_s,  # real tokens / wall time of the step loop
        "real_tokens": m["train_tokens"],
        "padding_fraction": m["padding_fraction"],
        "adapter_dir": str(out),
    }


class Counting:
    """Wraps a collator: counts non-padding and processed token positions."""

    def __init__(self, collate: Callable[[Any], Any]) -> None:
        self.collate = collate
        self.real = 0
        self.processed = 0

    def __call__(self, batch: Any) -> Any:
        out = self.collate(batch)
        ids = out["input_ids"]
        self.processed += ids.numel()
        mask = out.get("attention_mask")
        self.real += int(mask.sum()) if mask is not None else ids.numel()
        return out


def timed_train(trainer: Any, counter: Counting) -> dict[str, Any]:
    from transformers import TrainerCallback

    times: dict[str, float] = {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a: Any, **k: Any) -> None:
            times["start"] = time.monotonic()

        def on_train_end(self, *a: Any, **k: Any) -> None:
            times["end"] = time.monotonic()

    trainer.add_callback(Clock())
    trainer.data_collator = counter
    trainer.train()
    return {
        "tokens_per_s": counter.real / (times["end"] - times["start"]),
        "real_tokens": counter.real,
        "padding_fraction": 1 - counter.real / counter.processed,
    }


def common_args(args: argparse.Namespace) -> dict[str, Any]:
    h = hyper(args)
    return {
        "per_device_train_batch_size": h["batch_size"],
        "gradient_accumulation_steps": 1,
        "max_steps": h["max_steps"],
        "learning_rate": h["learning_rate"],
        "lr_scheduler_type": "constant",
        "optim": "paged_adamw_8bit",
        "gradient_checkpointing": args.checkpointing == "on",
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "logging_steps": 1000,
        "save_strategy": "no",
        "report_to": [],
        "seed": h["seed"],
        "use_cpu": DEVICE == "cpu",
        "dataloader_num_workers": 0,
        "max_grad_norm": 0.3,
        "disable_tqdm": True,
        # the standard mixed-precision flag: autocast to bf16 (CPU autocast included)
        "bf16": args.dtype == "bfloat16",
    }


def run_trl(
    model_dir: Path, data: Path, out: Path, args: argparse.Namespace, *, packing: bool
) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    config = SFTConfig(
        output_dir=str(out),
        max_length=MAX_LEN,
        packing=packing,
        completion_only_loss=True,
        **common_args(args),
    )
    trainer = SFTTrainer(
        model=peft_model(model_dir, args.checkpointing == "on", args.dtype),
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
    )
    result = timed_train(trainer, Counting(trainer.data_collator))
    trainer.model.save_pretrained(str(out / "adapter"))
    return {**result, "adapter_dir": str(out / "adapter")}


def run_trainer_grouped(
    model_dir: Path, data: Path, out: Path, args: argparse.Namespace
) -> dict[str, Any]:
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    tok = AutoTokenizer.from_pretrained(model_dir)
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    features = []
    for row in rows:
        ids, labels = encode(tok, row)
        features.append({"input_ids": ids, "labels": labels, "length": len(ids)})

    def collate(batch: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in batch)
        pad = [width - len(f["input_ids"]) for f in batch]
        return {
            "input_ids": torch.tensor(
                [f["input_ids"] + [tok.pad_token_id] * p for f, p in zip(batch, pad, strict=True)]
            ),
            "labels": torch.tensor(
                [f["labels"] + [-100] * p for f, p in zip(batch, pad, strict=True)]
            ),
            "attention_mask": torch.tensor(
                [[1] * len(f["input_ids"]) + [0] * p for f, p in zip(batch, pad, strict=True)]
            ),
        }

    training_args = TrainingArguments(
        output_dir=str(out),
        train_sampling_strategy="group_by_length",
        remove_unused_columns=False,
        **common_args(args),
    )
    trainer = Trainer(
        model=peft_model(model_dir, args.checkpointing == "on", args.dtype),
        args=training_args,
        train_dataset=Dataset.from_list(features),
        data_collator=collate,
    )
    result = timed_train(trainer, Counting(collate))
    trainer.model.save_pretrained(str(out / "adapter"))
    return {**result, "adapter_dir": str(out / "adapter")}


# Each side's run: (model folder, train rows, output folder, args) -> its figures.
RUNNERS: dict[str, Callable[..., dict[str, Any]]] = {
    "engine": run_engine,
    "trl_sft": lambda *a: run_trl(*a, packing=False),
    "trl_packed": lambda *a: run_trl(*a, packing=True),
    "trainer_grouped": run_trainer_grouped,
}


def child(args: argparse.Namespace) -> None:
    global DEVICE
    DEVICE = args.device
    model_dir, data, out = Path(args.model), Path(args.data), Path(args.out)
    before = os.times()
    result = RUNNERS[args.child](model_dir, data, out, args)
    after = os.times()
    cpu_s = (after.user - before.user) + (after.system - before.system)
    # CPU seconds of the whole run (model load included on every side): on a shared machine
    # they move much less with other processes' load than wall time does
    result["tokens_per_cpu_s"] = result["real_tokens"] / cpu_s
    result["peak_rss_bytes"] = peak_rss()
    if DEVICE == "cuda":
        import torch

        result["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
    valid = [json.loads(line) for line in Path(args.valid).read_text().splitlines()]
    result["eval_loss"] = eval_loss(model_dir, Path(result.pop("adapter_dir")), valid)
    print("RESULT " + json.dumps(result))


def matmul_peak_flops(
    dtype: str = "float32", device: str = "cpu", n: int = 2048, repeats: int = 5
) -> float:
    """The matmul FLOP/s of `device` in `dtype`: the best of a few large square products."""
    import torch

    if device == "cuda":
        n *= 4  # a GPU needs a bigger product to reach its peak
    a = torch.randn(n, n, device=device).to(getattr(torch, dtype))
    b = torch.randn(n, n, device=device).to(getattr(torch, dtype))

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    torch.matmul(a, b)  # warm up
    sync()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best


def linear_params(model_dir: Path) -> tuple[int, int]:
    """(all parameters, parameters of the linear layers incl. lm_head) of the base model."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    total = sum(p.numel() for p in model.parameters())
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return total, linear


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    lo, mid, hi = min(values), statistics.median(values), max(values)
    return f"{fmt.format(lo)} / {fmt.format(mid)} / {fmt.format(hi)}"


def checkpointing_for(setting: str, side: str) -> str:
    """`on` or `off` for every side, or a comma list of `side=on|off` (unlisted: off)."""
    if setting in ("on", "off"):
        return setting
    chosen = dict(item.split("=", 1) for item in setting.split(",") if item)
    return chosen.get(side, "off")


def build_bed(
    name: str, folder: Path, vocab: str, n_rows: int
) -> tuple[Path, list[dict[str, str]], int | None]:
    """The model `name` and `n_rows` rows: byte-level (`vocab` "bytes") or with a BPE
    vocabulary of `vocab` tokens; returns (model folder, rows, vocabulary size or None)."""
    from worker.training.tiny import build_tiny_model

    if vocab == "bytes":
        return build_tiny_model(folder / "model", **MODELS[name]), make_rows(n_rows, seed=0), None
    text = WordText(seed=0)
    tokenizer = bpe_tokenizer(text.corpus(8000), int(vocab))
    model_dir = build_tiny_model(folder / "model", tokenizer=tokenizer, **MODELS[name])
    return model_dir, text.rows(n_rows), len(tokenizer)


def bench_model(name: str, tmp: Path, args: argparse.Namespace, peak: float) -> None:
    model_dir, rows, vocab = build_bed(name, tmp / name, args.vocab, args.rows + EVAL_ROWS)
    n_params, n_linear = linear_params(model_dir)
    data, valid = tmp / name / "train.jsonl", tmp / name / "valid.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows[: args.rows]))
    valid.write_text("".join(json.dumps(r) + "\n" for r in rows[args.rows :]))
    runs: dict[str, list[dict[str, Any]]] = {side: [] for side in args.sides}
    for repeat in range(args.repeats):
        # alternate the sides (and their order each repeat): background load comes and goes
        order = list(args.sides) if repeat % 2 == 0 else list(reversed(args.sides))
        for side in order:
            cmd = [
                sys.executable,
                __file__,
                "--child",
                side,
                "--model",
                str(model_dir),
                "--data",
                str(data),
                "--valid",
                str(valid),
                "--out",
                str(tmp / name / f"{side}-{repeat}"),
                "--steps",
                str(args.steps),
                "--batch-size",
                str(args.batch_size),
                "--checkpointing",
                checkpointing_for(args.checkpointing, side),
                "--dtype",
                args.dtype,
                "--engine-tokens",
                str(args.engine_tokens),
                "--device",
                args.device,
            ]
            env = {
                **os.environ,
                "HF_HUB_OFFLINE": "1",
                "PYTHONPATH": str(ROOT),
                "THP_MEM_ALLOC_ENABLE": os.environ.get("THP_MEM_ALLOC_ENABLE", "1"),
            }
            if args.device == "cpu":
                env["CUDA_VISIBLE_DEVICES"] = ""
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not lines:
                sys.exit(f"{side} failed:\n{proc.stderr[-3000:]}")
            run = json.loads(lines[-1][len("RESULT ") :])
            # model FLOPs of LoRA training on a frozen base: forward 2N per token, backward
            # through the frozen weights 2N (no weight gradients), attention not counted
            run["mfu"] = 4 * n_linear * run["tokens_per_s"] / peak
            runs[side].append(run)
            print(
                f"  [{name}] {side}: {run['tokens_per_s']:.1f} tok/s, "
                f"{run['tokens_per_cpu_s']:.1f} tok/CPU-s, eval {run['eval_loss']:.4f}",
                flush=True,
            )
    print(
        f"\nmodel {name}: LLaMA {n_params / 1e6:.1f}M params, NF4 + double quant, LoRA r=16 "
        f"all-linear, paged_adamw_8bit, {args.dtype} compute, vocabulary "
        f"{'bytes' if vocab is None else vocab}, {args.steps} steps x batch "
        f"{args.batch_size}, activation checkpointing: {args.checkpointing}, "
        f"{args.repeats} runs per side (min / median / max)"
    )
    print(
        "| side | non-pad tokens/s | tokens/CPU-s | tokens/run | padding | peak RSS MiB "
        "| eval loss | MFU |"
    )
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for side in args.sides:
        rs = runs[side]
        print(
            f"| {side} | {spread([r['tokens_per_s'] for r in rs])} "
            f"| {spread([r['tokens_per_cpu_s'] for r in rs])} "
            f"| {statistics.median(r['real_tokens'] for r in rs):.0f} "
            f"| {statistics.median(r['padding_fraction'] for r in rs):.3f} "
            f"| {statistics.median(r['peak_rss_bytes'] for r in rs) / 2**20:.0f} "
            f"| {spread([r['eval_loss'] for r in rs], '{:.4f}')} "
            f"| {spread([100 * r['mfu'] for r in rs], '{:.2f}%')} |"
        )
    for side in args.sides:
        gpu = [r["peak_gpu_bytes"] for r in runs[side] if "peak_gpu_bytes" in r]
        if gpu:
            print(f"{side}: peak GPU memory (median) {statistics.median(gpu) / 2**20:.0f} MiB")
    if "engine" in runs:
        engine = statistics.median(r["tokens_per_s"] for r in runs["engine"])
        for side in args.sides:
            if side != "engine":
                other = statistics.median(r["tokens_per_s"] for r in runs[side])
                print(f"engine / {side} (median tokens/s): {engine / other:.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", default="small", help="comma list of: small, base")
    parser.add_argument("--sides", default=",".join(SIDES))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rows", type=int, default=400)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--checkpointing",
        default="on",
        help="activation checkpointing: on or off for every side (on: the standard QLoRA "
        "recipe; off: what the engine's 'auto' picks where the activations fit, as on this "
        "CPU), or per side, e.g. engine=off,trl_sft=on (unlisted sides: off)",
    )
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="compute dtype of every side (bfloat16: NF4 computing in bf16 and the "
        "Trainer's bf16=True autocast; the engine's 'auto' picks it on a CPU with fast bf16)",
    )
    parser.add_argument(
        "--vocab",
        default="bytes",
        help="'bytes' (a byte-level tokenizer, 262 tokens, and rows of 8 words) or the size of a "
        "byte-level BPE vocabulary trained on Zipf-distributed pseudo-words, with rows in the "
        "same words, e.g. 32000 (the width of Llama-2's, Mistral's and Phi-3's heads)",
    )
    parser.add_argument(
        "--engine-tokens",
        type=int,
        default=0,
        help="the engine's max_tokens_per_batch (0: batches of --batch-size examples); "
        "batch-size x 512 gives it trl_packed's budget of 8 rows of up to 512 tokens",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        choices=("cpu", "cuda"),
        help="where every side trains and scores (cpu hides any GPU from the children)",
    )
    parser.add_argument("--child", choices=SIDES)
    parser.add_argument("--model")
    parser.add_argument("--data")
    parser.add_argument("--valid")
    parser.add_argument("--out")
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    for item in args.checkpointing.split(","):
        side, _, value = item.rpartition("=")
        if value not in ("on", "off") or (side and side not in SIDES):
            sys.exit(f"--checkpointing: {item!r} is not on, off or side=on|off")
    args.sides = [s for s in args.sides.split(",") if s]
    unknown = set(args.sides) - set(SIDES)
    if unknown:
        sys.exit(f"unknown side(s): {', '.join(sorted(unknown))}")
    peak = matmul_peak_flops(args.dtype, args.device)
    print(f"{args.dtype} matmul peak on {args.device}: {peak / 1e9:.1f} GFLOP/s", flush=True)
    with tempfile.TemporaryDirectory() as tmp_name:
        for name in args.models.split(","):
            bench_model(name, Path(tmp_name), args, peak)


if __name__ == "__main__":
    main()
