"""Packed rows are exact per example in every supported model family, sliding windows and
soft-capping included: logits and LoRA gradients of a packed row (the engine's `packed_examples`)
equal those of the examples run one by one through transformers' eager attention."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pytest
import torch
from peft import PeftModel
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    Gemma3ForCausalLM,
    Gemma3TextConfig,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Phi3Config,
    Phi3ForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from tests.training.helpers import small_spec
from worker.training.data import Example, collate
from worker.training.hooks import SpecError
from worker.training.model import attach_lora, load_base_model, summed_loss

CPU = torch.device("cpu")
WINDOW = 8  # shorter than every example below but one
LENGTHS = (21, 6, 30, 13)
TINY: dict[str, Any] = {
    "vocab_size": 300,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 128,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}
ALTERNATING = {"layer_types": ["sliding_attention", "full_attention"]}
FAMILIES: dict[str, Callable[[], tuple[PretrainedConfig, type[PreTrainedModel]]]] = {
    "llama": lambda: (LlamaConfig(**TINY), LlamaForCausalLM),
    "mistral": lambda: (MistralConfig(**TINY, sliding_window=WINDOW), MistralForCausalLM),
    "qwen2": lambda: (
        Qwen2Config(**TINY, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
        Qwen2ForCausalLM,
    ),
    "qwen3": lambda: (
        Qwen3Config(
            **TINY,
            head_dim=16,
            use_sliding_window=True,
            sliding_window=WINDOW,
            max_window_layers=1,
        ),
        Qwen3ForCausalLM,
    ),
    "gemma2": lambda: (
        Gemma2Config(
            **TINY,
            **ALTERNATING,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            attn_logit_softcapping=2.0,  # small, so that capping changes the scores
            final_logit_softcapping=3.0,
        ),
        Gemma2ForCausalLM,
    ),
    "gemma3": lambda: (
        Gemma3TextConfig(**TINY, **ALTERNATING, head_dim=16, sliding_window=WINDOW),
        Gemma3ForCausalLM,
    ),
    "phi3": lambda: (Phi3Config(**TINY, sliding_window=WINDOW), Phi3ForCausalLM),
}


def build(family: str, folder: Path) -> Path:
    config, cls = FAMILIES[family]()
    torch.manual_seed(0)
    model = cls(config)
    with torch.no_grad():  # random, larger than the init's 0.02: attention patterns matter
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, 0.2 if param.dim() > 1 else 0.02)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def examples() -> list[Example]:
    generator = torch.Generator().manual_seed(1)
    return [
        Example(torch.randint(3, 300, (n,), generator=generator).tolist(), [True] * n)
        for n in LENGTHS
    ]


def lora_model(folder: Path) -> PeftModel:
    spec = small_spec(folder, quant_type="none", compute_dtype="float32", dropout=0.0)
    model = attach_lora(load_base_model(spec, folder, CPU), spec)
    torch.manual_seed(2)
    for name, param in model.named_parameters():  # LoRA B non-zero, so LoRA takes part
        if "lora_B" in name:
            torch.nn.init.normal_(param, std=0.1)
    return model


def set_attention(model: PeftModel, implementation: str) -> None:
    cast(PreTrainedModel, model.get_base_model()).set_attn_implementation(implementation)


def logits_and_grads(
    model: PeftModel, batches: list[Any]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    logits = []
    for batch in batches:
        out = model(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        )
        logits.append(out.logits[0])
        summed_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return torch.cat(logits), grads


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_packed_row_equals_examples_one_by_one(family: str, tmp_path: Path) -> None:
    model = lora_model(build(family, tmp_path))
    model.train()  # dropout is 0: train mode only so that checkpointing runs as in training
    rows = examples()
    assert model.config._attn_implementation == "packed_examples"
    packed_logits, packed_grads = logits_and_grads(model, [collate(rows, packing=True, pad_id=0)])
    set_attention(model, "eager")
    alone_logits, alone_grads = logits_and_grads(
        model, [collate([e], packing=False, pad_id=0) for e in rows]
    )
    torch.testing.assert_close(packed_logits, alone_logits, atol=1e-4, rtol=1e-4)
    assert packed_grads.keys() == alone_grads.keys() and packed_grads
    for name, grad in alone_grads.items():
        torch.testing.assert_close(packed_grads[name], grad, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("family", ["mistral", "gemma3"])
def test_window_is_applied_at_all(family: str, tmp_path: Path) -> None:
    """Control: the same examples without the window differ, so the test above can fail."""
    model = lora_model(build(family, tmp_path)).eval()
    rows = [e for e in examples() if len(e) > WINDOW]
    with torch.no_grad():
        packed = model(**_inputs(collate(rows, packing=True, pad_id=0))).logits
        base = cast(PreTrainedModel, model.get_base_model())
        for module in base.modules():
            if getattr(module, "sliding_window", None):
                module.sliding_window = None
        if family == "mistral":  # Mistral reads the window from the config
            base.config.sliding_window = None
        full = model(**_inputs(collate(rows, packing=True, pad_id=0))).logits
    assert (packed - full).abs().max() > 1e-2


def _inputs(batch: Any) -> dict[str, Any]:
    return {
        "input_ids": batch.input_ids,
        "position_ids": batch.position_ids,
        "attention_mask": batch.attention_mask,
        "use_cache": False,
    }


@pytest.mark.parametrize(
    ("config", "kind"),
    [
        (
            LlamaConfig(
                **{**TINY, "max_position_embeddings": 32},
                rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 10000.0},
            ),
            "dynamic",
        ),
        (
            Phi3Config(
                **TINY,
                original_max_position_embeddings=32,
                rope_parameters={
                    "rope_type": "longrope",
                    "rope_theta": 10000.0,
                    "short_factor": [1.0] * 8,
                    "long_factor": [2.0] * 8,
                },
            ),
            "longrope",
        ),
    ],
)
def test_length_dependent_rope_refuses_packing(
    config: PretrainedConfig, kind: str, tmp_path: Path
) -> None:
    config.save_pretrained(tmp_path)
    spec = small_spec(tmp_path, quant_type="none", compute_dtype="float32", max_seq_length=64)
    with pytest.raises(SpecError, match=rf"packing: {config.model_type} uses '{kind}' RoPE"):
        load_base_model(spec, tmp_path, CPU)
    # within the original context the frequencies never change: packing is allowed
    ok = small_spec(tmp_path, quant_type="none", compute_dtype="float32", max_seq_length=32)
    from worker.training.attention import check_packing_supported

    check_packing_supported(config, ok.max_seq_length)
