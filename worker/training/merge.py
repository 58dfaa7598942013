"""Merge a LoRA adapter into its base: one plain 16-bit model that serves without PEFT.

`merge_adapter_folder(base, adapter, out, dtype=...)`:

1. The base is loaded exactly as training loaded it (`model.load_base_model`: NF4/FP4 with
   double quantization, safetensors only, no remote code) and the adapter attached: the
   *reference*, base(NF4)+adapter, what the adapter was trained and evaluated with.
2. Every 4-bit linear layer is dequantized (`bitsandbytes.functional.dequantize_4bit`) and, where
   the adapter adapts it, the LoRA update folded in, in fp32:
   W' = W + scale * B @ A with scale = alpha / r (rsLoRA: alpha / sqrt(r)), PEFT's own
   `get_delta_weight`. The weights QLoRA trained against are the dequantized ones, so W' gives
   the adapter's behaviour, not the original 16-bit weights' plus a correction made for others.
3. Everything else (embeddings, norms, unquantized layers) comes from the base's safetensors;
   `modules_to_save` copies replace their originals. The result is cast once to bf16 or fp16
   and saved with safetensors, the config (dtype set, no quantization_config) and the
   tokenizer: a folder vLLM loads and llama.cpp's `convert_hf_to_gguf.py` converts.
4. Parity: the saved folder is loaded fresh (plain transformers, no PEFT, no bitsandbytes) and
   its logits compared with the reference's on held-out rows: `parity.json`.

No queue, database or store here; the Celery task and `python -m worker.training merge` wrap it.
"""

from __future__ import annotations

import json
import math
import shutil
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel

from shared.train_spec import TrainSpec
from worker.training.data import (
    Batch,
    DataError,
    Example,
    collate,
    read_rows,
    split_rows,
    tokenize_rows,
)
from worker.training.model import (
    DTYPES,
    autocast,
    load_base_model,
    load_tokenizer,
    prepare_for_training,
    resolve_compute_dtype,
    training_device,
)

MERGE_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
PARITY = "parity.json"
CARD = "README.md"
ADAPTER_SPEC = "train_spec.json"
ADAPTER_METRICS = "metrics.json"
ADAPTER_NAME = "default"
# Held-out rows for the parity report: a few, each cut to a few hundred tokens (the logits of
# both models are compared position by position, vocabulary-wide).
PARITY_ROWS = 8
PARITY_MAX_TOKENS = 256
PARITY_LOGITS_BUDGET = 32 * 2**20  # elements of one batch's logits (128 MiB in fp32)
# Used when no rows are given (the CLI without --rows).
BUILTIN_ROWS: tuple[dict[str, Any], ...] = (
    {"text": "The quick brown fox jumps over the lazy dog."},
    {"text": "Merged models serve without an adapter: one set of weights, no extra latency."},
)


class MergeError(ValueError):
    """An adapter this engine cannot merge; the message says why (no paths)."""


@dataclass(frozen=True)
class LogitDiff:
    max_abs: float
    mean_abs: float


@dataclass(frozen=True)
class ParityReport:
    """Merged model vs base(NF4)+adapter on held-out rows (logits, every position).

    `adapter_effect` is the same comparison for the base *without* the adapter: the size of
    what the adapter changes. A faithful merge sits far below it (a merge that dropped the
    adapter or scaled it wrongly does not)."""

    rows: int
    tokens: int
    rows_source: str
    max_abs_logit_diff: float
    mean_abs_logit_diff: float
    adapter_effect: dict[str, float]
    merged_dtype: str
    reference: dict[str, Any]
    lora: dict[str, Any]
    device: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class MergeResult:
    output_dir: Path
    parity: ParityReport
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- inputs


def read_adapter_spec(adapter_dir: Path) -> TrainSpec:
    """The spec the adapter was trained with (its `train_spec.json`)."""
    path = adapter_dir / ADAPTER_SPEC
    if not path.is_file():
        raise MergeError(f"the adapter folder has no {ADAPTER_SPEC} (not a job's output)")
    return TrainSpec.model_validate_json(path.read_text(encoding="utf-8"))


def _trained_compute_dtype(adapter_dir: Path, spec: TrainSpec, device: torch.device) -> torch.dtype:
    """The compute dtype the run resolved (recorded in metrics.json), else the spec's."""
    path = adapter_dir / ADAPTER_METRICS
    if path.is_file():
        recorded = json.loads(path.read_text(encoding="utf-8")).get("compute_dtype")
        if recorded in DTYPES and not (
            recorded == "bfloat16" and device.type == "cuda" and not torch.cuda.is_bf16_supported()
        ):
            return DTYPES[recorded]
    return resolve_compute_dtype(spec.compute_dtype, device)


def parity_rows(
    spec: TrainSpec,
    *,
    training_path: Path | None = None,
    validation_path: Path | None = None,
    rows_path: Path | None = None,
    n: int = PARITY_ROWS,
) -> tuple[list[dict[str, Any]], str]:
    """Held-out rows for the parity report, and where they came from.

    Preference: an explicit rows file (its last `n` rows); the job's validation file; the rows
    the run held out of its training file (the same seeded split as training); the last rows of
    the training file; two built-in text rows."""
    if rows_path is not None:
        return read_rows(rows_path)[-n:], "rows_file"
    if validation_path is not None:
        return read_rows(validation_path)[:n], "validation_file"
    if training_path is not None:
        rows = read_rows(training_path)
        _, held = split_rows(rows, spec.validation_fraction, spec.seed)
        if held:
            return held[:n], "training_file_held_out"
        return rows[-n:], "training_file_tail"
    return list(BUILTIN_ROWS), "builtin"


def tokenize_parity_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Any, spec: TrainSpec
) -> list[Example]:
    """Tokenized as training tokenizes them (`data.tokenize_rows`), cut to a few hundred tokens."""
    limit = min(spec.max_seq_length, PARITY_MAX_TOKENS)
    try:
        examples = tokenize_rows(rows, tokenizer, limit).examples
    except (DataError, KeyError, TypeError) as exc:
        raise MergeError("the parity rows cannot be tokenized as training rows") from exc
    if not examples:
        raise MergeError("the parity rows hold no tokens to compare")
    return examples


# --------------------------------------------------------------------------- the merge


def _lora_layers(model: nn.Module) -> Iterator[tuple[str, Any]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _dequantized(layer: Any) -> torch.Tensor:
    """A linear layer's weight as the forward pass sees it, in fp32 (4-bit ones dequantized)."""
    import bitsandbytes as bnb

    weight = layer.weight
    if isinstance(layer, bnb.nn.Linear4bit):
        dequantized: torch.Tensor = bnb.functional.dequantize_4bit(weight.data, weight.quant_state)
        return dequantized.float()
    return cast(torch.Tensor, weight.detach().float())


def lora_summary(peft_model: Any) -> dict[str, Any]:
    """Rank, alpha and the scale PEFT applies (alpha/r, or alpha/sqrt(r) with rsLoRA)."""
    config = peft_model.peft_config[ADAPTER_NAME]
    scales = {float(m.scaling[ADAPTER_NAME]) for _, m in _lora_layers(peft_model)}
    rank, alpha = int(config.r), float(config.lora_alpha)
    expected = alpha / math.sqrt(rank) if config.use_rslora else alpha / rank
    if any(not math.isclose(s, expected, rel_tol=1e-6) for s in scales):
        raise MergeError(
            "per-layer ranks or alphas are not supported (rank_pattern / alpha_pattern)"
        )
    return {
        "rank": rank,
        "alpha": alpha,
        "use_rslora": bool(config.use_rslora),
        "scale": expected,
        "layers": len(list(_lora_layers(peft_model))),
    }


def fold_adapter(peft_model: Any, target: PreTrainedModel) -> int:
    """Write base(dequantized) + adapter into `target` (a plain model of the same
    architecture, loaded from the base's safetensors in the output dtype). Returns the number
    of weights written. Arithmetic is fp32; each weight is rounded to the output dtype once."""
    import bitsandbytes as bnb
    from peft.utils.other import ModulesToSaveWrapper

    base = peft_model.get_base_model()
    modules = dict(target.named_modules())
    written = 0
    done: list[str] = []

    def inside_done(name: str) -> bool:
        return any(name.startswith(prefix + ".") for prefix in done)

    def put(name: str, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        nonlocal written
        module = modules.get(name)
        if module is None or not hasattr(module, "weight"):
            raise MergeError(f"the base has no layer {name!r} to merge into")
        dtype = module.weight.dtype
        rounded = weight.to(dtype)
        if not torch.isfinite(rounded).all():
            raise MergeError(
                f"merged weights overflow {str(dtype).removeprefix('torch.')}; use bfloat16"
            )
        with torch.no_grad():
            module.weight.copy_(rounded.to(module.weight.device))
            if bias is not None and module.bias is not None:
                module.bias.copy_(bias.to(dtype).to(module.bias.device))
        written += 1

    for name, module in base.named_modules():
        if inside_done(name):
            continue
        if hasattr(module, "lora_A") and hasattr(module, "get_delta_weight"):
            if module.use_dora.get(ADAPTER_NAME):
                raise MergeError("DoRA adapters are not supported by the merge yet")
            layer = module.get_base_layer()
            weight = _dequantized(layer)
            if ADAPTER_NAME in module.lora_A:
                weight = weight + module.get_delta_weight(ADAPTER_NAME).float()
            bias = None if layer.bias is None else layer.bias.detach().float()
            if bias is not None and module.lora_bias.get(ADAPTER_NAME):
                bias = bias + module.lora_B[ADAPTER_NAME].bias.detach().float()
            put(name, weight, bias)
            done.append(name)
        elif isinstance(module, ModulesToSaveWrapper):
            trained = module.modules_to_save[ADAPTER_NAME]
            state = {k: v.detach() for k, v in trained.state_dict().items()}
            with torch.no_grad():  # copies into the target's tensors, casting to its dtype
                modules[name].load_state_dict(state, strict=True)
            written += 1
            done.append(name)
        elif isinstance(module, bnb.nn.Linear4bit):
            bias = None if module.bias is None else module.bias.detach().float()
            put(name, _dequantized(module), bias)
            done.append(name)
    return written


def _clean_config(out_dir: Path, dtype_name: str) -> None:
    """config.json states the dtype under both spellings (transformers 5 writes `dtype`; older
    readers, vLLM and llama.cpp's converter included, look for `torch_dtype`) and carries no
    quantization block."""
    path = out_dir / "config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    config.pop("quantization_config", None)
    config["dtype"] = dtype_name
    config["torch_dtype"] = dtype_name
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _card(spec: TrainSpec, parity: ParityReport) -> str:
    return "\n".join(
        [
            "---",
            f"base_model: {spec.base_model}",
            "tags: [qlora, merged]",
            "---",
            "",
            f"# `{spec.base_model}` with a QLoRA adapter merged in ({parity.merged_dtype})",
            "",
            "The 4-bit base the adapter was trained on, dequantized, with the LoRA update folded "
            f"in (scale {parity.lora['scale']:g}). Serves without PEFT.",
            "",
            "| parity vs base(4-bit)+adapter | value |",
            "| --- | --- |",
            f"| rows / tokens | {parity.rows} / {parity.tokens} ({parity.rows_source}) |",
            f"| max abs logit difference | {parity.max_abs_logit_diff:.5f} |",
            f"| mean abs logit difference | {parity.mean_abs_logit_diff:.6f} |",
            f"| adapter effect (max / mean) | {parity.adapter_effect['max_abs_logit_diff']:.5f} / "
            f"{parity.adapter_effect['mean_abs_logit_diff']:.6f} |",
            "",
        ]
    )


@torch.no_grad()
def _logits(model: nn.Module, batch: Batch) -> torch.Tensor:
    out = model(
        input_ids=batch.input_ids,
        attention_mask=batch.attention_mask,
        position_ids=batch.position_ids,
        use_cache=False,
    ).logits
    return cast(torch.Tensor, out).float()


def _batches(examples: Sequence[Example], vocab: int) -> Iterator[list[Example]]:
    """Padded groups whose fp32 logits stay under `PARITY_LOGITS_BUDGET` elements."""
    group: list[Example] = []
    for example in sorted(examples, key=len):
        width = max([len(example), *(len(e) for e in group)])
        if group and (len(group) + 1) * width * vocab > PARITY_LOGITS_BUDGET:
            yield group
            group = []
        group.append(example)
    if group:
        yield group


def merge_adapter_folder(
    base_model_path: Path,
    adapter_dir: Path,
    out_dir: Path,
    *,
    dtype: str = "bfloat16",
    rows: Sequence[dict[str, Any]] | None = None,
    rows_source: str = "rows",
    device: torch.device | None = None,
) -> MergeResult:
    """Merge `adapter_dir` (a job's output folder) into the base at `base_model_path`; write
    the merged model, tokenizer, `parity.json` and a model card to `out_dir`."""
    if dtype not in MERGE_DTYPES:
        raise MergeError(f"dtype: must be one of {', '.join(MERGE_DTYPES)}")
    from peft import PeftModel

    device = device or training_device()
    spec = read_adapter_spec(adapter_dir)
    if spec.use_dora:
        raise MergeError("DoRA adapters are not supported by the merge yet")
    spec = spec.model_copy(update={"packing": False, "gradient_checkpointing": False})
    compute = _trained_compute_dtype(adapter_dir, spec, device)
    out_dtype = MERGE_DTYPES[dtype]
    if rows is None:
        rows, rows_source = list(BUILTIN_ROWS), "builtin"
    tokenizer = load_tokenizer(base_model_path)
    try:
        examples = tokenize_parity_rows(rows, tokenizer, spec)
    except MergeError:
        if rows_source == "builtin":
            raise
        # Rows of a kind the SFT tokenization does not take (a DPO run's preference pairs).
        examples = tokenize_parity_rows(BUILTIN_ROWS, tokenizer, spec)
        rows_source = f"builtin ({rows_source} could not be tokenized)"

    # The reference: the training path's base and adapter.
    base = prepare_for_training(load_base_model(spec, base_model_path, device, compute), spec)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = PeftModel.from_pretrained(base, str(adapter_dir), is_trainable=False)
    reference.eval()
    lora = lora_summary(reference)

    target: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        base_model_path,
        dtype=out_dtype,
        device_map={"": device},
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    fold_adapter(reference, target)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    target.config.dtype = out_dtype
    target.save_pretrained(out_dir, safe_serialization=True)
    del target
    _clean_config(out_dir, dtype)
    AutoTokenizer.from_pretrained(
        base_model_path, trust_remote_code=False, local_files_only=True
    ).save_pretrained(out_dir)

    # Parity: the saved folder, loaded fresh, against the reference.
    merged = AutoModelForCausalLM.from_pretrained(
        out_dir,
        dtype=out_dtype,
        device_map={"": device},
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    ).eval()
    diff_max = diff_sum = effect_max = effect_sum = 0.0
    count = tokens = 0
    vocab = int(merged.config.vocab_size)
    for group in _batches(examples, vocab):
        batch = collate(group, packing=False, pad_id=tokenizer.pad_token_id).to(device)
        real = batch.attention_mask.bool() if batch.attention_mask is not None else None
        with autocast(device, compute):
            expected = _logits(reference, batch)
            with reference.disable_adapter():
                plain = _logits(reference, batch)
        got = _logits(merged, batch)
        diff, effect = (got - expected).abs()[real], (plain - expected).abs()[real]
        diff_max, diff_sum = max(diff_max, float(diff.max())), diff_sum + float(diff.sum())
        effect_max = max(effect_max, float(effect.max()))
        effect_sum += float(effect.sum())
        count += diff.numel()
        tokens += batch.real_tokens
    del merged, reference, base
    if device.type == "cuda":
        torch.cuda.empty_cache()

    report = ParityReport(
        rows=len(examples),
        tokens=tokens,
        rows_source=rows_source,
        max_abs_logit_diff=diff_max,
        mean_abs_logit_diff=diff_sum / count,
        adapter_effect={
            "max_abs_logit_diff": effect_max,
            "mean_abs_logit_diff": effect_sum / count,
        },
        merged_dtype=dtype,
        reference={
            "model": "base + LoRA adapter, as trained",
            "quant_type": spec.quant_type,
            "double_quant": spec.double_quant,
            "compute_dtype": str(compute).removeprefix("torch."),
        },
        lora=lora,
        device=device.type,
    )
    (out_dir / PARITY).write_text(json.dumps(report.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / CARD).write_text(_card(spec, report), encoding="utf-8")
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    return MergeResult(output_dir=out_dir, parity=report, files=files)
