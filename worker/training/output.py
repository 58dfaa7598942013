"""The finished run's folder: PEFT adapter, metrics.json, train_spec.json, model card; and the
optional merge of an adapter into a 16-bit model."""

from __future__ import annotations

import contextlib
import json
import resource
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from shared.train_spec import TrainSpec

METRICS = "metrics.json"
SPEC = "train_spec.json"
CARD = "README.md"


def reset_peak_memory() -> None:
    """Start the peak-memory counters from now: a worker runs many jobs in one process, and
    each job reports its own peak. On Linux, writing 5 to /proc/self/clear_refs resets the
    peak resident set size (VmHWM); CUDA has its own counter."""
    # Not Linux, or not allowed: the figure stays the process's peak.
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def peak_rss_bytes() -> int:
    """Peak resident set size since the last `reset_peak_memory` (VmHWM on Linux; elsewhere
    the process's lifetime peak: ru_maxrss is KiB on Linux, bytes on macOS)."""
    with contextlib.suppress(OSError):  # no /proc (macOS): fall back to getrusage
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def model_card(spec: TrainSpec, metrics: dict[str, Any]) -> str:
    """A README.md for the adapter: what it was trained from, how, and how well."""

    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return "\n".join(
        [
            "---",
            "library_name: peft",
            f"base_model: {spec.base_model}",
            "tags: [qlora, lora]",
            "---",
            "",
            f"# LoRA adapter for `{spec.base_model}`",
            "",
            f"Trained with QLoRA ({spec.quant_type}, double quant {spec.double_quant}, "
            f"rank {spec.rank}, alpha {spec.alpha:g}) for {metrics['steps']} steps on "
            f"{metrics['train_tokens']:,} tokens.",
            "",
            "| metric | value |",
            "| --- | --- |",
            f"| eval loss before | {fmt(metrics['eval_loss_before'])} |",
            f"| eval loss after | {fmt(metrics['eval_loss_after'])} |",
            f"| padding fraction | {metrics['padding_fraction']:.4f} |",
            f"| trainable / total params | {metrics['trainable_params']:,} / "
            f"{metrics['total_params']:,} |",
            f"| wall seconds | {metrics['wall_seconds']:.1f} |",
            "",
            "## Training spec",
            "",
            "```json",
            spec.model_dump_json(indent=2),
            "```",
            "",
            "## Use",
            "",
            "```python",
            "from peft import PeftModel",
            "from transformers import AutoModelForCausalLM",
            "base = AutoModelForCausalLM.from_pretrained(BASE_MODEL_DIR)",
            "model = PeftModel.from_pretrained(base, ADAPTER_DIR)",
            "```",
            "",
        ]
    )


def write_outputs(
    model: PeftModel, output_dir: Path, spec: TrainSpec, metrics: dict[str, Any]
) -> None:
    """Save the adapter (PEFT layout), metrics, spec snapshot and card; drop checkpoints."""
    output_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(output_dir), safe_serialization=True)
    (output_dir / METRICS).write_text(json.dumps(metrics, indent=2), encoding="utf-8")
    (output_dir / SPEC).write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    (output_dir / CARD).write_text(model_card(spec, metrics), encoding="utf-8")
    shutil.rmtree(output_dir / "checkpoints", ignore_errors=True)


def merge_adapter(
    base_model_path: Path, adapter_dir: Path, out_dir: Path, *, dtype: str = "bfloat16"
) -> Path:
    """Write base + LoRA as one plain model (16-bit by default) that serves without PEFT.

    The base is loaded unquantized (the dequantized weights QLoRA trained against are the
    16-bit originals up to quantization error), the adapter merged in, then saved with
    safetensors alongside the tokenizer.
    """
    torch_dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype, torch.float32)
    base = AutoModelForCausalLM.from_pretrained(
        base_model_path,
        dtype=torch_dtype,
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    merged = PeftModel.from_pretrained(base, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir, safe_serialization=True)
    tokenizer = AutoTokenizer.from_pretrained(base_model_path, local_files_only=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
