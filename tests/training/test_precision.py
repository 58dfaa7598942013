"""Mixed precision: what "auto" resolves to, the dtypes along the forward path (forward hooks),
fp32 master weights and gradients, a bf16 run that learns on the CPU, and fp16 loss scaling
whose skipped steps and scaler state survive a resume exactly."""

from __future__ import annotations

import csv
import io
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

import worker.training.model as engine_model
from shared.jobs import results
from tests.training.helpers import completion_rows, small_spec, write_jsonl
from tests.training.test_train import RecordingHooks
from worker.training import SpecError, StopRequest, train
from worker.training.data import collate, tokenize_rows
from worker.training.hooks import EvalMetrics
from worker.training.model import (
    attach_lora,
    batch_loss,
    cpu_has_fast_bf16,
    load_base_model,
    load_tokenizer,
    resolve_compute_dtype,
)

CPU, CUDA = torch.device("cpu"), torch.device("cuda")
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


@pytest.fixture
def probe(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    monkeypatch.delenv(engine_model.CPU_BF16_ENV, raising=False)
    cpu_has_fast_bf16.cache_clear()
    yield monkeypatch
    cpu_has_fast_bf16.cache_clear()


def test_auto_follows_the_measured_cpu(probe: pytest.MonkeyPatch) -> None:
    timings = {BF16: 1.0, FP32: 3.0}
    probe.setattr(engine_model, "_matmul_seconds", lambda dtype: timings[dtype])
    assert resolve_compute_dtype("auto", CPU) == BF16
    cpu_has_fast_bf16.cache_clear()
    timings[BF16] = 9.0  # a CPU without bf16 units converts, and is slower
    assert resolve_compute_dtype("auto", CPU) == FP32
    cpu_has_fast_bf16.cache_clear()
    probe.setenv(engine_model.CPU_BF16_ENV, "1")  # the operator's word beats the probe
    assert resolve_compute_dtype("auto", CPU) == BF16
    # explicit choices are honoured on the CPU (fp16 autocast and loss scaling run there)
    assert [resolve_compute_dtype(n, CPU) for n in ("bfloat16", "float16", "float32")] == [
        BF16,
        FP16,
        FP32,
    ]


def test_auto_and_refusals_on_a_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    assert resolve_compute_dtype("auto", CUDA) == BF16
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)  # e.g. a T4
    assert resolve_compute_dtype("auto", CUDA) == FP16
    assert resolve_compute_dtype("float32", CUDA) == FP32
    with pytest.raises(SpecError, match="compute_dtype: this GPU has no bfloat16"):
        resolve_compute_dtype("bfloat16", CUDA)


def _first(output: Any) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@pytest.mark.parametrize(
    ("quant_type", "modules_to_save"), [("nf4", []), ("none", ["lm_head"])], ids=["nf4", "16bit"]
)
def test_dtypes_along_the_path(
    tiny_model_dir: Path, quant_type: str, modules_to_save: list[str]
) -> None:
    """bf16 autocast: embeddings, q/k/v, attention, MLP and logits in bf16; norms keep fp32
    weights (and compute in fp32) but hand their consumers bf16, cast once; LoRA A/B fp32 with
    fp32 gradients; a trained lm_head is an fp32 master copy."""
    spec = small_spec(
        tiny_model_dir,
        compute_dtype="bfloat16",
        quant_type=quant_type,
        modules_to_save=modules_to_save,
        target_modules=[
            "q_proj",
            "k_proj",
            "v_proj",
            "o_proj",
            "gate_proj",
            "up_proj",
            "down_proj",
        ],
    )
    model = attach_lora(load_base_model(spec, tiny_model_dir, CPU), spec)
    seen: dict[str, set[torch.dtype]] = {}

    def record(name: str) -> Any:
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            seen.setdefault(name, set()).add(_first(output).dtype)

        return hook

    causal_lm: Any = model.base_model.model
    layer = causal_lm.model.layers[0]
    watched = {
        "embeddings": model.get_input_embeddings(),
        "q_proj": layer.self_attn.q_proj,
        "k_proj": layer.self_attn.k_proj,
        "v_proj": layer.self_attn.v_proj,
        "attention": layer.self_attn,
        "mlp": layer.mlp,
        "input_norm": layer.input_layernorm,
        "post_attention_norm": layer.post_attention_layernorm,
        "final_norm": causal_lm.model.norm,
        "lm_head": causal_lm.lm_head,
    }
    for name, module in watched.items():
        module.register_forward_hook(record(name))

    tokenizer = load_tokenizer(tiny_model_dir)
    examples = tokenize_rows(completion_rows(4, seed=3), tokenizer, 64).examples
    batch = collate(examples, packing=True, pad_id=0)
    model.train()
    result = batch_loss(model, batch, dtype=BF16)
    assert result.loss.dtype == FP32  # the cross-entropy itself runs in fp32
    result.loss.backward()

    expected = dict.fromkeys(watched, BF16)
    assert {name: seen.get(name) for name in watched} == {n: {d} for n, d in expected.items()}

    params = dict(model.named_parameters())
    lora = {n: p for n, p in params.items() if "lora_" in n}
    assert lora and all(p.dtype == FP32 for p in lora.values())
    assert all(p.grad is not None and p.grad.dtype == FP32 for p in lora.values())
    assert all(p.dtype == FP32 for n, p in params.items() if "norm" in n)
    embed = model.get_input_embeddings().weight
    assert embed.dtype == BF16 and not embed.requires_grad
    head = params["base_model.model.lm_head.weight"] if not modules_to_save else None
    if head is not None:
        assert head.dtype == BF16 and not head.requires_grad
    else:  # PEFT's trainable copy is the fp32 master; the frozen original stays bf16
        saved = params["base_model.model.lm_head.modules_to_save.default.weight"]
        assert saved.dtype == FP32 and saved.grad is not None and saved.grad.dtype == FP32
        original = params["base_model.model.lm_head.original_module.weight"]
        assert original.dtype == BF16


@pytest.fixture(scope="module")
def bf16_run(
    tiny_model_dir: Path, template_data: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory
) -> tuple[Any, RecordingHooks, list[EvalMetrics]]:
    """compute_dtype auto on a CPU declared to have fast bf16: a short template run."""
    evaluations: list[EvalMetrics] = []

    class Hooks(RecordingHooks):
        def on_evaluation(self, metrics: EvalMetrics) -> None:
            evaluations.append(metrics)
            super().on_evaluation(metrics)

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(engine_model.CPU_BF16_ENV, "1")
        cpu_has_fast_bf16.cache_clear()
        spec = small_spec(
            tiny_model_dir,
            compute_dtype="auto",
            max_steps=10,
            batch_size=8,
            gradient_accumulation_steps=1,
            learning_rate=3e-3,
            eval_steps=5,
        )
        hooks = Hooks()
        train_path, val_path = template_data
        out = tmp_path_factory.mktemp("bf16")
        result = train(spec, train_path, out, hooks, validation_path=val_path)
    cpu_has_fast_bf16.cache_clear()
    return result, hooks, evaluations


@pytest.mark.slow
def test_bf16_run_on_cpu_learns(bf16_run: tuple[Any, RecordingHooks, list[EvalMetrics]]) -> None:
    result, hooks, evaluations = bf16_run
    m = result.metrics
    assert m["compute_dtype"] == "bfloat16" and m["skipped_steps"] == 0
    assert m["eval_loss_after"] < 0.8 * m["eval_loss_before"], (
        m["eval_loss_before"],
        m["eval_loss_after"],
    )
    assert {s.compute_dtype for s in hooks.progress} == {"bfloat16"}
    # token accuracy: reported every step and evaluation, and it rises with learning
    assert [e.step for e in evaluations] == [0, 5, 10]
    assert evaluations[-1].mean_token_accuracy > evaluations[0].mean_token_accuracy
    assert m["valid_mean_token_accuracy"] == evaluations[-1].mean_token_accuracy
    accuracies = [s.mean_token_accuracy for s in hooks.progress]
    assert all(a is not None and 0 <= a <= 1 for a in accuracies)
    assert m["train_mean_token_accuracy"] == accuracies[-1]


@pytest.mark.slow
def test_results_csv_from_a_real_run(
    bf16_run: tuple[Any, RecordingHooks, list[EvalMetrics]],
) -> None:
    """The engine's history plus evaluation events shaped as the runner records them."""
    result, _, evaluations = bf16_run
    events = [
        {"step": e.step, "eval_loss": e.eval_loss, "mean_token_accuracy": e.mean_token_accuracy}
        for e in evaluations
    ]
    body = results.render_csv(results.build_rows(result.metrics["history"], events)).decode()
    rows = {r["step"]: r for r in csv.DictReader(io.StringIO(body))}
    assert all(rows[str(s)]["train_mean_token_accuracy"] != "" for s in range(1, 11))
    assert all(rows[str(s)]["train_loss"] != "" for s in range(1, 11))
    assert float(rows["10"]["valid_mean_token_accuracy"]) == evaluations[-1].mean_token_accuracy
    assert rows["5"]["valid_loss"] != "" and rows["4"]["valid_mean_token_accuracy"] == ""


# -- fp16 loss scaling ------------------------------------------------------------------


@pytest.fixture(scope="module")
def fp16_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("fp16") / "d.jsonl", completion_rows(37, seed=9))


def fp16_spec(model_dir: Path) -> Any:
    return small_spec(
        model_dir,
        compute_dtype="float16",
        max_steps=4,
        packing=False,
        dropout=0.1,
        warmup_ratio=0.2,
        checkpoint_steps=2,
    )


@pytest.fixture
def eager_scaler(monkeypatch: pytest.MonkeyPatch) -> None:
    """A scale so high that the first steps overflow, and growth after 2 clean steps: the
    scaler's state changes during the run, so a resume must restore it."""
    monkeypatch.setattr(engine_model, "FP16_INIT_SCALE", 1e6)
    monkeypatch.setattr(engine_model, "FP16_GROWTH_INTERVAL", 2)


@pytest.mark.slow
def test_fp16_skips_overflowing_steps_and_resumes_exactly(
    eager_scaler: None, tiny_model_dir: Path, fp16_data: Path, tmp_path: Path
) -> None:
    straight = train(fp16_spec(tiny_model_dir), fp16_data, tmp_path / "a")
    skipped = straight.metrics["skipped_steps"]
    assert 0 < skipped < 4 and straight.metrics["compute_dtype"] == "float16"
    lrs = [h["lr"] for h in straight.metrics["history"]]
    assert len(set(lrs)) < 4  # a skipped step does not advance the schedule
    assert straight.metrics["eval_loss_after"] < straight.metrics["eval_loss_before"]

    hooks = RecordingHooks(stop_at=2, request=StopRequest.PREEMPT)
    stopped = train(fp16_spec(tiny_model_dir), fp16_data, tmp_path / "b", hooks)
    assert stopped.checkpoint is not None
    out = Path(shutil.copytree(tmp_path / "b", tmp_path / "c"))
    state = (out / "checkpoints" / "step-2" / "trainer_state.json").read_text()
    assert '"scaler"' in state
    resumed = train(
        fp16_spec(tiny_model_dir), fp16_data, out, resume_from=out / "checkpoints" / "step-2"
    )
    assert straight.output_dir is not None and resumed.output_dir is not None
    a = load_file(straight.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    assert resumed.metrics["skipped_steps"] == skipped
    assert [h["lr"] for h in resumed.metrics["history"]] == lrs
