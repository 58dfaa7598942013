"""`train()` end to end: learning, outputs that PEFT loads, hooks, cancellation."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from tests.training.helpers import ANSWER, small_spec, template_rows, write_jsonl
from worker.training import StepMetrics, StopRequest, TrainHooks, TrainResult, train
from worker.training.data import collate, read_rows, tokenize_rows
from worker.training.model import evaluate, load_tokenizer


class RecordingHooks(TrainHooks):
    def __init__(self, stop_at: int | None = None, request: StopRequest | None = None) -> None:
        self.progress: list[StepMetrics] = []
        self.evals: list[tuple[int, float, float]] = []
        self.checkpoints: list[tuple[Path, int]] = []
        self.stop_at, self.request = stop_at, request

    def on_progress(self, metrics: StepMetrics) -> None:
        self.progress.append(metrics)

    def on_eval(self, step: int, eval_loss: float, perplexity: float) -> None:
        self.evals.append((step, eval_loss, perplexity))

    def on_checkpoint(self, path: Path, step: int) -> None:
        self.checkpoints.append((path, step))

    def should_stop(self) -> StopRequest | None:
        if self.stop_at is not None and len(self.progress) >= self.stop_at:
            return self.request
        return None


def generate(model: Any, tokenizer: Any, prompt: str) -> str:
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
    )
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=len(ANSWER) + 2,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
        )
    return str(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))


@pytest.fixture(scope="module")
def learned(
    tiny_model_dir: Path, template_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[TrainResult, RecordingHooks]:
    """One QLoRA run (NF4, double quant, paged 8-bit AdamW) on the template task, in the
    compute dtype the service would pick here ("auto": bf16 where this CPU runs it fast, else
    fp32; a CPU without AVX-512 BF16 runs bf16 matmuls ~100x slower). bf16 learning has its
    own test: test_precision.py::test_bf16_run_on_cpu_learns."""
    train_path, val_path = template_data
    spec = small_spec(
        tiny_model_dir,
        compute_dtype="auto",
        max_steps=60,
        batch_size=8,
        gradient_accumulation_steps=1,
        learning_rate=3e-3,
        rank=16,
        alpha=32,
        eval_steps=30,
    )
    hooks = RecordingHooks()
    out = tmp_path_factory.mktemp("learned")
    return train(spec, train_path, out, hooks, validation_path=val_path), hooks


@pytest.mark.slow
def test_learns_template_and_generalises(
    learned: tuple[TrainResult, RecordingHooks], tiny_model_dir: Path, template_data: Any
) -> None:
    result, _ = learned
    m = result.metrics
    assert m["eval_loss_after"] <= 0.5 * m["eval_loss_before"]

    tokenizer = load_tokenizer(tiny_model_dir)
    prompts = [r["messages"][0]["content"] for r in read_rows(template_data[1])][:10]
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    assert sum(generate(base, tokenizer, p) == ANSWER for p in prompts) == 0
    tuned = PeftModel.from_pretrained(base, result.output_dir).eval()
    answers = [generate(tuned, tokenizer, p) for p in prompts]
    assert sum(a == ANSWER for a in answers) >= 8, answers


@pytest.mark.slow
def test_outputs_round_trip_through_peft(
    learned: tuple[TrainResult, RecordingHooks], tiny_model_dir: Path, template_data: Any
) -> None:
    result = learned[0]
    out = result.output_dir
    assert out is not None
    for name in ("adapter_model.safetensors", "adapter_config.json", "metrics.json", "README.md"):
        assert (out / name).is_file(), name
    assert not (out / "checkpoints").exists()
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "eval_loss_before",
        "eval_loss_after",
        "train_tokens",
        "padding_fraction",
        "wall_seconds",
        "peak_rss_bytes",
    ):
        assert metrics[key] is not None, key
    assert [h["step"] for h in metrics["history"]] == list(range(1, 61))
    assert metrics["padding_fraction"] == 0.0  # packing
    assert '"rank": 16' in (out / "README.md").read_text()
    assert result.trainable_params == metrics["trainable_params"] > 0
    assert result.total_params > result.trainable_params

    # Loaded through PEFT on the same NF4 base, the adapter gives the recorded eval loss.
    from shared.train_spec import TrainSpec
    from worker.training.model import load_base_model, prepare_for_training

    spec = TrainSpec.model_validate_json((out / "train_spec.json").read_text())
    base = load_base_model(spec, tiny_model_dir, torch.device("cpu"))
    # as in training: embeddings and head in the run's compute dtype, fp32 norms next to the
    # NF4 projections
    base = prepare_for_training(base, spec.model_copy(update={"gradient_checkpointing": False}))
    model = PeftModel.from_pretrained(base, out)
    tokenizer = load_tokenizer(tiny_model_dir)
    examples = tokenize_rows(read_rows(template_data[1]), tokenizer, 64).examples
    batches = [collate(examples[i : i + 8], packing=True, pad_id=0) for i in range(0, 24, 8)]
    dtype = getattr(torch, metrics["compute_dtype"])  # what "auto" resolved to on this CPU
    loss = evaluate(model, batches, torch.device("cpu"), dtype=dtype)  # under autocast
    assert loss is not None
    assert math.isclose(loss, metrics["eval_loss_after"], rel_tol=1e-4)


@pytest.mark.slow
def test_hooks_receive_progress_and_evals(learned: tuple[TrainResult, RecordingHooks]) -> None:
    result, hooks = learned
    assert [p.step for p in hooks.progress] == list(range(1, 61))
    last = hooks.progress[-1]
    assert last.step == last.total_steps == 60 and 0 <= last.lr < 3e-3
    assert last.loss > 0 and last.grad_norm >= 0 and last.tokens_per_second > 0
    assert last.eta_seconds == 0
    assert [e[0] for e in hooks.evals] == [0, 30, 60]
    assert hooks.evals[-1][1] == result.metrics["eval_loss_after"]
    assert math.isclose(hooks.evals[-1][2], math.exp(hooks.evals[-1][1]), rel_tol=1e-5)


def test_cancel_returns_at_once_without_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(40, seed=3))
    hooks = RecordingHooks(stop_at=2, request=StopRequest.CANCEL)
    spec = small_spec(tiny_model_dir, max_steps=10, checkpoint_steps=5)
    result = train(spec, data, tmp_path / "out", hooks)
    assert result.stopped is StopRequest.CANCEL
    assert result.step == 2 and result.output_dir is None
    assert not (tmp_path / "out" / "adapter_model.safetensors").exists()
    assert hooks.checkpoints == []


def test_padded_batches_report_padding(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(40, seed=3))
    spec = small_spec(tiny_model_dir, max_steps=3, packing=False, optimizer="adamw_torch")
    result = train(spec, data, tmp_path / "out")
    m = result.metrics
    assert 0 < m["padding_fraction"] < 0.5
    assert m["processed_tokens"] > m["train_tokens"] == result.trained_tokens


def test_unknown_target_module_fails_before_training(tiny_model_dir: Path, tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(10, seed=3))
    spec = small_spec(tiny_model_dir, target_modules=["c_attn"])
    with pytest.raises(ValueError, match="target_modules: c_attn"):
        train(spec, data, tmp_path / "out")


@pytest.mark.slow
def test_merged_model_matches_adapter_on_the_16bit_base(
    learned: tuple[TrainResult, RecordingHooks], tiny_model_dir: Path, tmp_path: Path
) -> None:
    from worker.training.output import merge_adapter

    adapter = learned[0].output_dir
    assert adapter is not None
    merged_dir = merge_adapter(tiny_model_dir, adapter, tmp_path / "merged", dtype="float32")
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    with_adapter = PeftModel.from_pretrained(base, adapter).eval()
    ids = torch.tensor([[256, *b"say hi to abc", 257, 261]])
    with torch.no_grad():
        expected = with_adapter(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - expected).abs().max() > 1e-2


def test_preempt_after_the_last_step_finishes_the_run(tiny_model_dir: Path, tmp_path: Path) -> None:
    """A stop request that arrives while the last step runs (a Ctrl-C, a SIGTERM) finds
    nothing left to resume: the run finishes and reports it, it is not 'preempted'."""
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(20, seed=3))
    hooks = RecordingHooks(stop_at=2, request=StopRequest.PREEMPT)
    spec = small_spec(tiny_model_dir, max_steps=2, checkpoint_steps=1)
    result = train(spec, data, tmp_path / "out", hooks)
    assert result.stopped is None and result.checkpoint is None
    assert result.step == result.total_steps == 2
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file()
    assert result.metrics["steps"] == 2 and result.metrics["eval_loss_after"] is not None
    assert [step for _, step in hooks.checkpoints] == [1]  # step 1's periodic one only
    assert not (tmp_path / "out" / "checkpoints").exists()
