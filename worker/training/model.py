"""Base model loading (NF4/FP4 + double quantization, or 16-bit), LoRA, optimizer, schedule."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any, cast

import torch
from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
from torch import nn
from torch.nn import functional as F
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from shared.train_spec import ALL_LINEAR, TrainSpec
from worker.training.attention import PACKED_ATTENTION
from worker.training.data import IGNORE_INDEX, Batch

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def training_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def quantization_config(spec: TrainSpec) -> BitsAndBytesConfig | None:
    """QLoRA's storage: 4-bit NF4/FP4 blocks of 64, optional double quantization."""
    if spec.quant_type == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=DTYPES[spec.compute_dtype],
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(spec: TrainSpec, path: Path, device: torch.device) -> PreTrainedModel:
    """The frozen base, quantized per `spec`, from safetensors only, never remote code.

    bitsandbytes 0.50 repacks a Linear4bit's weight in place, into an inference-only layout,
    the first time it runs under no_grad in eval mode on an AVX512-BF16 CPU; training after
    an evaluation would then use a kernel with no backward. That repacking is switched off.
    """
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path,
        attn_implementation=PACKED_ATTENTION if spec.packing else "sdpa",
        quantization_config=quantization_config(spec),
        dtype=DTYPES[spec.compute_dtype],
        device_map={"": device},
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
    return model


def linear_module_names(model: nn.Module) -> set[str]:
    """Qualified names of the linear layers LoRA can adapt (bitsandbytes ones included)."""
    import bitsandbytes as bnb

    kinds = (nn.Linear, bnb.nn.Linear4bit)
    return {name for name, module in model.named_modules() if isinstance(module, kinds)}


def _matches(qualified: str, key: str) -> bool:
    return qualified == key or qualified.endswith("." + key)


def check_module_names(model: nn.Module, spec: TrainSpec) -> None:
    """Raise ValueError naming the field if a target or saved module is not in the model."""
    if spec.target_modules != ALL_LINEAR:
        linears = linear_module_names(model)
        missing = [k for k in spec.target_modules if not any(_matches(n, k) for n in linears)]
        if missing:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linears})
            raise ValueError(
                f"target_modules: {', '.join(missing)} not found in the base model "
                f"(its linear layers: {', '.join(leaves)})"
            )
    names = [n for n, _ in model.named_modules()]
    missing = [k for k in spec.modules_to_save if not any(_matches(n, k) for n in names)]
    if missing:
        raise ValueError(f"modules_to_save: {', '.join(missing)} not found in the base model")


def attach_lora(model: PreTrainedModel, spec: TrainSpec) -> PeftModel:
    """prepare_model_for_kbit_training (fp32 norms, input grads, checkpointing) + LoRA."""
    check_module_names(model, spec)
    checkpointing_kwargs = {"use_reentrant": False}
    if spec.quant_type != "none":
        with warnings.catch_warnings():  # peft calls transformers' renamed checkpointing API
            warnings.simplefilter("ignore", FutureWarning)
            model = prepare_model_for_kbit_training(
                model,
                use_gradient_checkpointing=spec.gradient_checkpointing,
                gradient_checkpointing_kwargs=checkpointing_kwargs,
            )
    else:
        for param in model.parameters():
            param.requires_grad = False
        if spec.gradient_checkpointing:
            model.activation_checkpointing_enable(
                activation_checkpointing_kwargs=checkpointing_kwargs
            )
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]  # annotated int, used as a float
        lora_dropout=spec.dropout,
        target_modules=spec.target_modules,
        modules_to_save=list(spec.modules_to_save) or None,
        use_rslora=spec.use_rslora,
        use_dora=spec.use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )
    torch.manual_seed(spec.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        peft_model = get_peft_model(model, config)
    assert isinstance(peft_model, PeftModel)
    return peft_model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters; a packed 4-bit tensor counts its logical elements."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2 * param.element_size()
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def build_optimizer(params: list[nn.Parameter], spec: TrainSpec) -> torch.optim.Optimizer:
    """The optimizer by name: bitsandbytes' paged / 8-bit AdamW, or torch AdamW."""
    kwargs: dict[str, Any] = {
        "lr": spec.learning_rate,
        "betas": (0.9, 0.999),
        "weight_decay": spec.weight_decay,
    }
    if spec.optimizer == "adamw_torch":
        return torch.optim.AdamW(params, **kwargs)
    import bitsandbytes as bnb

    classes: dict[str, type[torch.optim.Optimizer]] = {
        "paged_adamw_8bit": bnb.optim.PagedAdamW8bit,
        "paged_adamw_32bit": bnb.optim.PagedAdamW32bit,
        "adamw_8bit": bnb.optim.AdamW8bit,
    }
    return classes[spec.optimizer](params, **kwargs)


def lr_factor(step: int, *, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Learning-rate multiplier for optimizer step `step` (0-based): linear warmup from 0,
    then cosine or linear decay to 0, or constant."""
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    if kind == "constant":
        return 1.0
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def build_scheduler(
    optimizer: torch.optim.Optimizer, spec: TrainSpec, total_steps: int
) -> LambdaLR:
    warmup = math.ceil(spec.warmup_ratio * total_steps)

    def factor(step: int) -> float:
        return lr_factor(step, total_steps=total_steps, warmup_steps=warmup, kind=spec.lr_scheduler)

    return LambdaLR(optimizer, factor)


def summed_loss(model: PeftModel, batch: Batch) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's targets.

    Runs the decoder, then the output head only at target positions: prompt and padding
    positions never reach the (vocabulary-wide) head. Packed batches pass no attention mask
    and no cache, which makes transformers attend within each example only.
    """
    base = cast(PreTrainedModel, model.get_base_model())
    decoder, head = base.get_decoder(), base.get_output_embeddings()
    hidden = decoder(
        input_ids=batch.input_ids,
        position_ids=batch.position_ids,
        attention_mask=batch.attention_mask,
        use_cache=False,
    ).last_hidden_state
    selected = batch.targets != IGNORE_INDEX
    logits = head(hidden[selected]).float()
    softcap = getattr(base.config, "final_logit_softcapping", None)
    if softcap:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits, batch.targets[selected], reduction="sum")


@torch.no_grad()
def evaluate(model: PeftModel, batches: list[Batch], device: torch.device) -> float | None:
    """Token-mean cross-entropy over the validation targets (None without validation)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for batch in batches:
        total += float(summed_loss(model, batch.to(device)))
        count += batch.target_tokens
    model.train(was_training)
    return total / count
