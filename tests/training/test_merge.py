"""Merge and export: base(NF4, dequantized) + LoRA folded into one 16-bit safetensors model.

The merged folder is loaded fresh with plain transformers (no PEFT, no bitsandbytes) and its
logits compared with the training path's, base(NF4)+adapter, computed here independently of
the parity report. The bound comes from the output dtype's rounding, and it must sit far below
the adapter's own effect (base alone vs base+adapter): a merge that drops the adapter, or
scales it by alpha/r where rsLoRA's alpha/sqrt(r) applies, fails.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from tests.training.helpers import small_spec, template_rows, write_jsonl
from worker.training import train
from worker.training.__main__ import main as cli_main
from worker.training.data import collate, tokenize_rows
from worker.training.merge import merge_adapter_folder, parity_rows, read_adapter_spec
from worker.training.model import attach_lora, load_base_model, load_tokenizer

CPU = torch.device("cpu")
# The merged logits may differ from the reference by the rounding of the weights to the output
# dtype, carried through the layers: a few units of the dtype's epsilon, relative to the logits'
# size. Measured on the tiny model: bf16 ~0.3 eps, fp16 ~0.3 eps of the largest logit.
EPS_BUDGET = 2.0


@pytest.fixture(scope="module")
def held_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("merge-data")
    return write_jsonl(folder / "val.jsonl", template_rows(6, seed=11))


@pytest.fixture(scope="module")
def trained_adapter(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny adapter trained for a few steps at a high learning rate (a visible effect)."""
    folder = tmp_path_factory.mktemp("merge-adapter")
    data = write_jsonl(folder / "train.jsonl", template_rows(24, seed=1))
    spec = small_spec(tiny_model_dir, max_steps=3, learning_rate=5e-3, validation_fraction=0.0)
    result = train(spec, data, folder / "out")
    assert result.output_dir is not None
    return result.output_dir


def rslora_adapter(base: Path, folder: Path) -> Path:
    """An untrained rsLoRA adapter (rank 4, alpha 8: scale 4, where alpha/r would be 2) with
    random B matrices, saved as a run's output folder."""
    spec = small_spec(base, rank=4, alpha=8, use_rslora=True, target_modules=["q_proj", "up_proj"])
    model = attach_lora(load_base_model(spec, base, CPU, torch.float32), spec)
    torch.manual_seed(3)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            param.data.normal_(0, 0.02)
    model.save_pretrained(str(folder), safe_serialization=True)
    (folder / "train_spec.json").write_text(spec.model_dump_json(), encoding="utf-8")
    return folder


@torch.no_grad()
def reference_logits(
    base: Path, adapter: Path, rows_path: Path
) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """(base(NF4)+adapter, base(NF4) alone) logits on the rows, and the padded batch."""
    spec = read_adapter_spec(adapter)
    tokenizer = load_tokenizer(base)
    rows, _ = parity_rows(spec, rows_path=rows_path)
    batch = collate(
        tokenize_rows(rows, tokenizer, 64).examples, packing=False, pad_id=tokenizer.pad_token_id
    )
    model = PeftModel.from_pretrained(load_base_model(spec, base, CPU, torch.float32), adapter)
    model.eval()
    kwargs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with_adapter = model(**kwargs).logits.float()
    with model.disable_adapter():
        plain = model(**kwargs).logits.float()
    return with_adapter, plain, batch


@torch.no_grad()
def check_merged_folder(
    folder: Path, dtype: torch.dtype, base: Path, adapter: Path, rows_path: Path
) -> dict[str, float]:
    """Everything a user of the folder relies on; returns the measured differences."""
    names = {p.name for p in folder.iterdir()}
    assert "model.safetensors" in names and "tokenizer.json" in names and "parity.json" in names
    assert not any(n.startswith("adapter_") for n in names)
    assert not any(n.endswith((".bin", ".pt")) for n in names)
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config
    name = str(dtype).removeprefix("torch.")
    assert config["dtype"] == name and config["torch_dtype"] == name
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {  # noqa: SIM118
            {"bfloat16": "BF16", "float16": "F16"}[name]
        }
    assert AutoTokenizer.from_pretrained(folder).chat_template

    merged = AutoModelForCausalLM.from_pretrained(folder)  # no PEFT, no bitsandbytes
    assert merged.dtype == dtype
    assert not any("lora" in n for n, _ in merged.named_parameters())
    expected, plain, batch = reference_logits(base, adapter, rows_path)
    got = merged(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits.float()
    real = batch.attention_mask.bool()
    diff = (got - expected).abs()[real]
    effect = (plain - expected).abs()[real]
    bound = EPS_BUDGET * torch.finfo(dtype).eps * float(expected[real].abs().max())
    assert float(diff.max()) <= bound, (float(diff.max()), bound)
    assert float(diff.max()) < 0.05 * float(effect.max())  # the adapter is in, at its scale
    assert float(diff.mean()) < 0.02 * float(effect.mean())

    parity = json.loads((folder / "parity.json").read_text())
    assert parity["merged_dtype"] == name and parity["rows"] == batch.input_ids.shape[0]
    assert parity["tokens"] == batch.real_tokens
    assert math.isclose(parity["max_abs_logit_diff"], float(diff.max()), rel_tol=0.2, abs_tol=1e-4)
    assert parity["adapter_effect"]["max_abs_logit_diff"] > 10 * parity["max_abs_logit_diff"]
    return {"diff": float(diff.max()), "effect": float(effect.max()), "bound": bound}


@pytest.mark.slow
def test_merged_bf16_model_matches_the_nf4_base_with_its_adapter(
    tiny_model_dir: Path, trained_adapter: Path, held_out: Path, tmp_path: Path
) -> None:
    spec = read_adapter_spec(trained_adapter)
    rows, source = parity_rows(spec, rows_path=held_out)
    result = merge_adapter_folder(
        tiny_model_dir, trained_adapter, tmp_path / "merged", rows=rows, rows_source=source
    )
    assert result.parity.lora["scale"] == 16 / 8 and result.parity.rows_source == "rows_file"
    assert (
        result.parity.reference["quant_type"] == "nf4" and result.parity.reference["double_quant"]
    )
    check_merged_folder(
        tmp_path / "merged", torch.bfloat16, tiny_model_dir, trained_adapter, held_out
    )


@pytest.mark.slow
def test_cli_merges_an_rslora_adapter_in_fp16(
    tiny_model_dir: Path, held_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    adapter = rslora_adapter(tiny_model_dir, tmp_path / "adapter")
    out = tmp_path / "merged"
    argv = ["merge", "--base", str(tiny_model_dir), "--adapter", str(adapter), "--out", str(out)]
    assert cli_main([*argv, "--dtype", "fp16", "--rows", str(held_out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["lora"]["scale"] == 8 / math.sqrt(4) and printed["lora"]["use_rslora"]
    check_merged_folder(out, torch.float16, tiny_model_dir, adapter, held_out)
    assert cli_main([*argv, "--adapter", str(tmp_path)]) == 1  # no train_spec.json: refused
