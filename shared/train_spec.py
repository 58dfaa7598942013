"""`TrainSpec`: the one flat, validated description of a QLoRA fine-tuning run.

The CLI (`--spec spec.json`), the jobs API's `qlora` block and the snapshot stored with every
checkpoint and adapter all use this model, so a run can be reproduced from any of them.
This module must stay free of torch: the API imports it.

Step semantics: one *step* is one optimizer update, i.e. `gradient_accumulation_steps`
micro-batches of `batch_size` examples. When `max_steps` is None the run lasts `num_epochs`
full passes over the training rows (the last step of an epoch may hold fewer micro-batches);
when `max_steps` is set it wins over `num_epochs` and the data is cycled, reshuffled every
epoch, until that many steps are done.
"""

from __future__ import annotations

import re
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

LrScheduler = Literal["cosine", "linear", "constant"]
QuantType = Literal["nf4", "fp4", "none"]
ComputeDtype = Literal["auto", "bfloat16", "float16", "float32"]
OptimizerName = Literal["paged_adamw_8bit", "paged_adamw_32bit", "adamw_8bit", "adamw_torch"]
TrainMethod = Literal["supervised", "dpo"]

ALL_LINEAR: Final = "all-linear"
# A module name as PEFT matches it: dotted identifiers, e.g. "q_proj" or "mlp.down_proj".
_MODULE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z0-9_]+)*$")
# Fields that may differ between a checkpoint's spec and the spec used to resume from it.
# Activation checkpointing changes memory, not the math (recomputation replays the RNG).
RESUME_MUTABLE_FIELDS = frozenset({"eval_steps", "checkpoint_steps", "gradient_checkpointing"})


def _check_module_names(field: str, names: list[str]) -> list[str]:
    for name in names:
        if not _MODULE_NAME.match(name):
            raise ValueError(f"{field}: {name!r} is not a module name")
    if len(set(names)) != len(names):
        raise ValueError(f"{field}: duplicate module names")
    return names


class TrainSpec(BaseModel):
    """Hyperparameters of one QLoRA run; every field but `base_model` has QLoRA's default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_model: str = Field(
        min_length=1,
        max_length=200,
        description="Base model: a registry name (resolved by the service) or a local folder.",
    )
    max_seq_length: int = Field(
        default=2048, ge=8, le=131072, description="Tokens per example; longer rows are truncated."
    )
    packing: bool = Field(
        default=True,
        description="Padding-free packing: a micro-batch is one concatenated row with "
        "position_ids restarting per example. False: length-grouped padded batches.",
    )
    num_epochs: int = Field(
        default=3, ge=1, le=100, description="Passes over the training rows (if max_steps unset)."
    )
    max_steps: int | None = Field(
        default=None,
        ge=1,
        le=10_000_000,
        description="Optimizer steps to run; overrides num_epochs. None: derive from num_epochs.",
    )
    batch_size: int = Field(default=4, ge=1, le=1024, description="Examples per micro-batch.")
    max_tokens_per_batch: int | None = Field(
        default=None,
        ge=8,
        le=1_048_576,
        description="Packing only: fill each packed micro-batch with examples up to this many "
        "tokens (at least max_seq_length, so every example fits) instead of batch_size "
        "examples; micro-batches then hold about the same tokens whatever the row lengths, "
        "and memory is bounded by this budget. None: batch_size examples per micro-batch.",
    )
    gradient_accumulation_steps: int = Field(
        default=4, ge=1, le=1024, description="Micro-batches per optimizer step."
    )
    learning_rate: float = Field(default=2e-4, gt=0, le=1, description="Peak learning rate.")
    lr_scheduler: LrScheduler = Field(
        default="cosine", description="Decay after warmup: cosine or linear to 0, or constant."
    )
    warmup_ratio: float = Field(
        default=0.03, ge=0, lt=1, description="Fraction of the steps with linear warmup from 0."
    )
    weight_decay: float = Field(default=0.0, ge=0, lt=1, description="AdamW weight decay.")
    max_grad_norm: float = Field(
        default=0.3, gt=0, le=1000, description="Gradient clipping threshold (global L2 norm)."
    )
    seed: int = Field(
        default=42, ge=0, lt=2**32, description="Seeds LoRA init, dropout and the data order."
    )
    quant_type: QuantType = Field(
        default="nf4", description="4-bit storage type of the frozen base (none: 16-bit LoRA)."
    )
    double_quant: bool = Field(
        default=True,
        description="Quantize the quantization constants too (QLoRA double quantization). "
        "Defaults to false when quant_type is none.",
    )
    compute_dtype: ComputeDtype = Field(
        default="auto",
        description="Autocast dtype of the forward pass (and of the base weights when "
        "quant_type is none; of embeddings and output head unless in modules_to_save). "
        "auto: bfloat16 on a GPU that supports it (else float16, with loss scaling), "
        "bfloat16 on a CPU measured to have fast bf16 matmuls, else float32. LoRA weights, "
        "norms and the loss stay float32 whatever this says.",
    )
    rank: int = Field(default=16, ge=1, le=1024, description="LoRA rank r.")
    alpha: float = Field(
        default=32, gt=0, le=65536, description="LoRA alpha; the update is scaled by alpha/r."
    )
    dropout: float = Field(default=0.05, ge=0, lt=1, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        default=ALL_LINEAR,
        description="Module names to adapt with LoRA, or 'all-linear' (every linear layer "
        "except the output head).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained in full and saved with the adapter (e.g. lm_head).",
    )
    use_rslora: bool = Field(
        default=False, description="Rank-stabilised LoRA: scale by alpha/sqrt(r)."
    )
    use_dora: bool = Field(default=False, description="Weight-decomposed LoRA (DoRA).")
    optimizer: OptimizerName = Field(
        default="paged_adamw_8bit", description="bitsandbytes optimizer by name, or torch AdamW."
    )
    gradient_checkpointing: bool | Literal["auto"] = Field(
        default="auto",
        description="Recompute activations in the backward pass to save memory. auto: off "
        "when the memory estimate without it fits the training device (free RAM on a CPU, "
        "the GPU's capacity), else on; the choice is recorded in the job's metrics.",
    )
    eval_steps: int | None = Field(
        default=None,
        ge=1,
        description="Evaluate every N steps; None: only before and after training.",
    )
    checkpoint_steps: int | None = Field(
        default=200,
        ge=1,
        description="Write a resumable checkpoint every N steps; None: only on preemption.",
    )
    validation_fraction: float = Field(
        default=0.05,
        ge=0,
        le=0.5,
        description="Share of the rows held out for evaluation when no validation file is "
        "given (0: no evaluation).",
    )

    method: TrainMethod = Field(
        default="supervised",
        description="supervised: next-token loss on chat/prompt rows. dpo: Direct Preference "
        "Optimization on preference rows, against the base with the adapter disabled.",
    )
    dpo_beta: float = Field(
        default=0.1,
        gt=0,
        le=100,
        description="DPO's beta: how far the policy may move from the reference (dpo only).",
    )

    @model_validator(mode="before")
    @classmethod
    def _double_quant_default(cls, data: Any) -> Any:
        """Unquantized runs default to no double quantization instead of failing."""
        if isinstance(data, dict) and data.get("quant_type") == "none":
            data = dict(data)
            data.setdefault("double_quant", False)
        return data

    @field_validator("gradient_checkpointing", mode="before")
    @classmethod
    def _checkpointing_choice(cls, value: Any) -> Any:
        if value == "auto" or isinstance(value, bool):
            return value
        raise ValueError('gradient_checkpointing: true, false or "auto"')

    @field_validator("base_model")
    @classmethod
    def _base_model_text(cls, value: str) -> str:
        if not value.strip() or any(ord(c) < 32 for c in value):
            raise ValueError("base_model: must be a non-blank name without control characters")
        return value

    @field_validator("target_modules")
    @classmethod
    def _target_names(cls, value: list[str] | str) -> list[str] | str:
        if isinstance(value, str):
            return value
        if not value:
            raise ValueError("target_modules: give at least one module name or 'all-linear'")
        return _check_module_names("target_modules", value)

    @field_validator("modules_to_save")
    @classmethod
    def _save_names(cls, value: list[str]) -> list[str]:
        return _check_module_names("modules_to_save", value)

    @model_validator(mode="after")
    def _cross_field(self) -> TrainSpec:
        if self.max_tokens_per_batch is not None:
            if not self.packing:
                raise ValueError(
                    "max_tokens_per_batch: needs packing (padded batches count examples; "
                    "they are grouped by length instead)"
                )
            if self.method == "dpo":
                raise ValueError("max_tokens_per_batch: DPO batches count preference pairs")
            if self.max_tokens_per_batch < self.max_seq_length:
                raise ValueError(
                    f"max_tokens_per_batch: {self.max_tokens_per_batch} is below "
                    f"max_seq_length ({self.max_seq_length}); every example must fit a batch"
                )
        if self.double_quant and self.quant_type == "none":
            raise ValueError("double_quant: only applies when quant_type is nf4 or fp4")
        if isinstance(self.target_modules, list):
            both = set(self.target_modules) & set(self.modules_to_save)
            if both:
                raise ValueError(
                    "modules_to_save: "
                    f"{', '.join(sorted(both))} also listed in target_modules; "
                    "a module is either LoRA-adapted or trained in full"
                )
        return self

    def micro_batch_tokens(self) -> int:
        """Most tokens one micro-batch of sequences can hold (DPO: chosen and rejected)."""
        if self.max_tokens_per_batch is not None:
            return self.max_tokens_per_batch
        return self.batch_size * (2 if self.method == "dpo" else 1) * self.max_seq_length

    def effective_batch_size(self) -> int:
        """Examples per optimizer step."""
        return self.batch_size * self.gradient_accumulation_steps

    def lora_scale(self) -> float:
        """Multiplier of the LoRA update B @ A: alpha/r, or alpha/sqrt(r) with rsLoRA."""
        return self.alpha / (self.rank**0.5 if self.use_rslora else self.rank)
