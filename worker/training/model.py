"""Base model loading (NF4/FP4 + double quantization, or 16-bit), LoRA, optimizer, schedule."""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
import types
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, cast

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from torch.optim.lr_scheduler import LambdaLR
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
)

from shared.estimate import GIB, estimate_memory, usable_bytes
from shared.train_spec import ALL_LINEAR, TrainSpec
from shared.workers import available_ram_bytes
from worker.training.attention import PACKED_ATTENTION, check_packing_supported
from worker.training.data import IGNORE_INDEX, Batch
from worker.training.hooks import SpecError
from worker.training.losses import LossSum, chunk_tokens, chunked_cross_entropy
from worker.training.norms import fuse_rms_norms
from worker.training.trim import target_rows, trim_last_layer

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
# TRAIN_CPU_BF16=1 / 0 fixes what "auto" means on a CPU instead of measuring it.
CPU_BF16_ENV = "TRAIN_CPU_BF16"


def training_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def _matmul_seconds(dtype: torch.dtype, n: int = 512, repeats: int = 5) -> float:
    a = torch.randn(n, n).to(dtype)
    b = torch.randn(n, n).to(dtype)
    torch.matmul(a, b)  # warm-up: kernel selection, packing buffers
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def cpu_has_fast_bf16() -> bool:
    """Whether this CPU multiplies bf16 matrices faster than fp32 ones, measured (a 512^3
    matmul each way, best of 5, about 10 ms). AMX or AVX512-BF16 make bf16 several times
    faster; without them torch converts to fp32 and bf16 is slower. `TRAIN_CPU_BF16=1`/`0`
    decides instead of the probe."""
    forced = os.environ.get(CPU_BF16_ENV, "").strip().lower()
    if forced in ("1", "true", "yes", "on"):
        return True
    if forced in ("0", "false", "no", "off"):
        return False
    return _matmul_seconds(torch.bfloat16) < _matmul_seconds(torch.float32)


def resolve_compute_dtype(requested: str, device: torch.device) -> torch.dtype:
    """The autocast dtype of a run: `requested` ("auto" or a dtype name) on `device`.

    auto: bf16 on a GPU that supports it, else fp16 (with loss scaling); on a CPU bf16 when
    it measures faster than fp32, else fp32. An explicit dtype the device cannot run is a
    SpecError naming compute_dtype.
    """
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if requested == "auto":
            return torch.bfloat16 if bf16 else torch.float16
        if requested == "bfloat16" and not bf16:
            raise SpecError(
                "compute_dtype: this GPU has no bfloat16 support; use float16, float32 or auto"
            )
        return DTYPES[requested]
    if requested == "auto":
        return torch.bfloat16 if cpu_has_fast_bf16() else torch.float32
    return DTYPES[requested]


# fp16 loss scaling: torch's defaults (start at 2**16, double after 2000 clean steps).
FP16_INIT_SCALE = 2.0**16
FP16_GROWTH_INTERVAL = 2000


def grad_scaler(device: torch.device, dtype: torch.dtype) -> torch.amp.GradScaler:
    """Loss scaling for fp16 (whose range is too narrow for small gradients); a disabled,
    pass-through scaler for bf16 and fp32, which have fp32's range."""
    return torch.amp.GradScaler(
        device.type,
        init_scale=FP16_INIT_SCALE,
        growth_interval=FP16_GROWTH_INTERVAL,
        enabled=dtype == torch.float16,
    )


@contextlib.contextmanager
def autocast(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Mixed precision for a forward pass: autocast to `dtype`, nothing for fp32."""
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        yield


def quantization_config(spec: TrainSpec, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    """QLoRA's storage: 4-bit NF4/FP4 blocks of 64, optional double quantization."""
    if spec.quant_type == "none":
        return None
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=spec.quant_type,
        bnb_4bit_use_double_quant=spec.double_quant,
        bnb_4bit_compute_dtype=dtype,
        bnb_4bit_quant_storage=torch.uint8,
    )


def load_tokenizer(path: Path) -> Any:
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(
    spec: TrainSpec, path: Path, device: torch.device, dtype: torch.dtype | None = None
) -> PreTrainedModel:
    """The frozen base, quantized per `spec`, from safetensors only, never remote code.

    bitsandbytes 0.50 repacks a Linear4bit's weight in place, into an inference-only layout,
    the first time it runs under no_grad in eval mode on an AVX512-BF16 CPU; training after
    an evaluation would then use a kernel with no backward. That repacking is switched off.

    Unquantized weights load in the compute dtype `dtype` (default: the spec's, resolved for
    `device`); `attach_lora` then puts norms back in fp32.

    Packed runs use `packed_examples` (exact per example, sliding windows and soft-capping
    included); a family whose packed rows cannot be exact raises SpecError first.
    """
    config = AutoConfig.from_pretrained(path, trust_remote_code=False, local_files_only=True)
    if spec.packing:
        check_packing_supported(config, spec.max_seq_length)
        attention = PACKED_ATTENTION
    else:  # padded rows: sdpa, or eager where sdpa cannot soft-cap the scores (Gemma-2)
        softcap = getattr(config.get_text_config(), "attn_logit_softcapping", None)
        attention = "eager" if softcap else "sdpa"
    dtype = dtype or resolve_compute_dtype(spec.compute_dtype, device)
    model: PreTrainedModel = AutoModelForCausalLM.from_pretrained(
        path,
        attn_implementation=attention,
        quantization_config=quantization_config(spec, dtype),
        dtype=dtype,
        device_map={"": device},
        use_safetensors=True,
        trust_remote_code=False,
        local_files_only=True,
    )
    import bitsandbytes as bnb

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False
            module.register_forward_pre_hook(_autocast_input)
    return model


@dataclass(frozen=True)
class CheckpointingChoice:
    """Whether the run recomputes activations, and why (recorded in the job's metrics)."""

    enabled: bool
    reason: str


# The share of the free RAM a CPU run may plan to fill without activation checkpointing.
CPU_MEMORY_SHARE = 0.8


def device_memory_bytes(device: torch.device) -> int:
    """What a run may plan to allocate: a GPU's usable capacity (as the estimator's GPU
    classes count it), or a share of the RAM the kernel reports available now."""
    if device.type == "cuda":
        return usable_bytes(torch.cuda.get_device_properties(device).total_memory)
    return int(CPU_MEMORY_SHARE * available_ram_bytes())


def choose_checkpointing(
    spec: TrainSpec, model_path: Path, device: torch.device, dtype: torch.dtype
) -> CheckpointingChoice:
    """`gradient_checkpointing: "auto"`: off when the memory estimate of the run without it
    (in the dtype it will really compute in) fits `device_memory_bytes`, else on. Recomputing
    costs about a third more compute, so it is paid only where the activations would not fit.
    A model the estimator cannot read keeps it on."""
    if spec.gradient_checkpointing != "auto":
        return CheckpointingChoice(bool(spec.gradient_checkpointing), "set in the spec")
    try:
        config = json.loads((model_path / "config.json").read_text())
        without = estimate_memory(
            config,
            spec.model_copy(
                update={"gradient_checkpointing": False, "compute_dtype": DTYPE_NAMES[dtype]}
            ),
            device.type,
        )
    except (OSError, ValueError, TypeError, KeyError):
        return CheckpointingChoice(True, "auto: no memory estimate for this model")
    room = device_memory_bytes(device)
    need = f"{without.total_bytes / GIB:.2f} GiB without it"
    if without.total_bytes <= room:
        return CheckpointingChoice(False, f"auto: the run fits ({need}, {room / GIB:.1f} GiB free)")
    return CheckpointingChoice(True, f"auto: the run would not fit ({need}, {room / GIB:.1f} GiB)")


def _autocast_input(module: nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
    """bitsandbytes' Linear4bit returns its input's dtype: an fp32 input (a norm's output)
    would give an fp32 q/k/v under autocast. Under autocast the input is cast first, so the
    4-bit projections compute and return the autocast dtype like every other matmul."""
    x = args[0] if args else None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        return None
    kind = x.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    dtype = torch.get_autocast_dtype(kind)
    return None if x.dtype == dtype else (x.to(dtype), *args[1:])


def _autocast_output(module: nn.Module, args: Any, output: Any) -> Any:
    """A norm with an fp32 weight (LLaMA-style RMSNorm) returns fp32 even under autocast, and
    every projection that reads it (q/k/v, gate/up, each of their LoRA branches, the head)
    then casts its own copy to the compute dtype. Under autocast the norm's output is cast
    once instead; its statistics are still computed in fp32. Matmul consumers see exactly
    the values they would have cast themselves, and LoRA dropout runs on half the bytes."""
    if not isinstance(output, torch.Tensor) or output.dtype != torch.float32:
        return None
    kind = output.device.type
    if not torch.is_autocast_enabled(kind):
        return None
    return output.to(torch.get_autocast_dtype(kind))


def _is_norm(module: nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm | nn.RMSNorm) or name.endswith(("RMSNorm", "LayerNorm"))


def prepare_for_training(model: PreTrainedModel, spec: TrainSpec) -> PreTrainedModel:
    """The base frozen, in the precision layout of mixed-precision QLoRA: norms in fp32 (their
    statistics need the range; LLaMA-style ones run as one fused function, `norms.py`),
    embeddings and output head stay in the compute dtype they were loaded in (PEFT's
    trainable copies of `modules_to_save` are made fp32 by `attach_lora`), 4-bit weights as
    they are; activation checkpointing as the spec says.

    This replaces peft's `prepare_model_for_kbit_training`, which upcasts every unquantized
    weight (embeddings and head included) to fp32.
    """
    for param in model.parameters():
        param.requires_grad = False
    embeddings = cast(torch.Tensor, model.get_input_embeddings().weight)
    loaded = embeddings.dtype  # the compute dtype, as loaded
    for module in model.modules():
        if _is_norm(module):
            module.float()
            module.register_forward_hook(_autocast_output)
    fuse_rms_norms(model, loaded)
    if spec.gradient_checkpointing is not False:  # "auto" left unresolved: on, as planned
        model.activation_checkpointing_enable(
            activation_checkpointing_kwargs={"use_reentrant": False}
        )
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
            raise SpecError(
                f"target_modules: {', '.join(missing)} not found in the base model "
                f"(its linear layers: {', '.join(leaves)})"
            )
    names = [n for n, _ in model.named_modules()]
    missing = [k for k in spec.modules_to_save if not any(_matches(n, k) for n in names)]
    if missing:
        raise SpecError(f"modules_to_save: {', '.join(missing)} not found in the base model")


def attach_lora(model: PreTrainedModel, spec: TrainSpec) -> PeftModel:
    """`prepare_for_training` (frozen base, fp32 norms, checkpointing) + LoRA, whose weights
    (and the trainable copies of `modules_to_save`) are fp32 master weights."""
    check_module_names(model, spec)
    model = prepare_for_training(model, spec)
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
    for param in peft_model.parameters():
        if param.requires_grad and param.dtype != torch.float32:
            param.data = param.data.float()
    if next(peft_model.parameters()).device.type == "cpu":
        use_cpu_dropout(peft_model)
    fuse_lora_forward(peft_model)
    trim_last_layer(peft_model)
    return peft_model


def _fused_lora_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """PEFT's LoRA linear forward, `base(x) + scaling * B(A(dropout(x)))`, with the update
    added by one `addmm_` into the base output: PEFT clones the base output (a defensive copy
    for bitsandbytes), scales B's output and adds it, three passes over a [tokens, out]
    tensor; here there is none besides the matmul's own. The base layer gets the input
    flattened to [tokens, in], so its output is a fresh tensor, not a view (the case
    bitsandbytes' clone guards against), and neither bitsandbytes' 4-bit matmul nor
    `nn.Linear` saves its output for the backward. The scaling rides in the matmul (with
    `CpuDropout`'s keep-scale, which then needs no pass of its own, forward or backward).
    Under bf16 the sum is rounded once instead of twice, so the numbers differ from PEFT's in
    the last bits: evaluation (eval mode) takes PEFT's own forward, so an adapter loaded with
    PEFT reproduces the recorded eval loss. So does anything but plain LoRA with one active
    adapter (DoRA, merged or disabled adapters, mixed batches, dtypes autocast would not
    reconcile)."""
    active = self.active_adapters
    name = active[0] if len(active) == 1 else None
    plain = (
        self.training
        and name is not None
        and name in self.lora_A
        and name not in self.lora_variant
        and not self.disable_adapters
        and not self.merged
        and "adapter_names" not in kwargs
        and self.lora_B[name].bias is None
    )
    if plain:
        lora_a, lora_b = self.lora_A[name], self.lora_B[name]
        # without autocast every dtype must already agree (the base layer returns x's dtype:
        # bitsandbytes by design, nn.Linear or it fails); checked before any work is done
        plain = torch.is_autocast_enabled(x.device.type) or (
            x.dtype == lora_a.weight.dtype == lora_b.weight.dtype
        )
    if not plain:
        return cast(torch.Tensor, type(self).forward(self, x, *args, **kwargs))
    flat = x.reshape(-1, x.shape[-1])
    result: torch.Tensor = self.base_layer(flat, *args, **kwargs)  # [tokens, out]
    dropout = self.lora_dropout[name]
    if isinstance(dropout, CpuDropout):  # the keep-scale rides in the addmm too
        dropped, keep_scale = dropout.unscaled(flat)
    else:
        dropped, keep_scale = dropout(flat), 1.0
    low_rank: torch.Tensor = lora_a(dropped)
    alpha = self.scaling[name] * keep_scale
    if result._base is None and low_rank.dtype == result.dtype:
        # added into the base output in place: the frozen base saves nothing of its output
        # for the backward, and an out-of-place addmm would first copy all of it
        out = result.addmm_(low_rank, lora_b.weight.t().to(result.dtype), alpha=alpha)
    else:
        out = torch.addmm(result, low_rank, lora_b.weight.t(), alpha=alpha)
    return out.view(*x.shape[:-1], out.shape[-1])


def fuse_lora_forward(model: nn.Module) -> int:
    """Give every PEFT LoRA linear layer (bitsandbytes 4-bit or plain) `_fused_lora_forward`;
    returns how many. The parameters, state dict and saved adapter are PEFT's own."""
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    fused = 0
    for module in model.modules():
        if isinstance(module, LoraLinear | LoraLinear4bit):
            module.forward = types.MethodType(_fused_lora_forward, module)  # type: ignore[method-assign]  # per instance, on purpose
            fused += 1
    return fused


# Dropout masks on the CPU are drawn as 16-bit integers and compared with a threshold. The
# integers come from numpy's SFC64 generator, seeded per mask by one draw from torch's default
# generator (so seeded runs and exact resume stay exact): it fills 64-bit words about 1.8x
# faster than torch's CPU generator (a Mersenne twister behind a per-element loop), whose
# draws were 7% of a bf16 training step on the CPU. Each 64-bit word holds four uniform int16
# lanes, compared as they are. That is cheaper than one draw per element, which was itself
# about twice as cheap as torch's per-element float Bernoulli draws (BENCHMARKS.md).
_MASK_LEVELS = 1 << 16
_LANES = 4  # int16 lanes per 64-bit draw


def keep_mask(shape: torch.Size, drop: int) -> torch.Tensor:
    """Bool mask of `shape`: each element True with probability 1 - drop / 2**16,
    independently; the seed comes from torch's default CPU generator."""
    n = math.prod(shape)
    seed = int(torch.empty((), dtype=torch.int64).random_())  # [0, 2**63)
    words = np.random.SFC64(seed).random_raw((n + _LANES - 1) // _LANES)
    levels = torch.from_numpy(words.view(np.int16)[:n])  # uniform over [-2**15, 2**15)
    return (levels >= drop - _MASK_LEVELS // 2).view(shape)


class _Keep(torch.autograd.Function):
    """y = where(keep, x, 0); saves only the bool mask for the backward."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(keep)
        return torch.where(keep, x, 0.0)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (keep,) = ctx.saved_tensors
        return torch.where(keep, grad, 0.0), None


class CpuDropout(nn.Dropout):
    """LoRA's input dropout for CPU training: inverted dropout as `nn.Dropout` computes it
    (each element kept with probability 1 - p and scaled by 1 / (1 - p)), with the mask drawn
    as 16-bit integers against a threshold instead of float Bernoulli draws, and kept as one
    bool per element instead of a 4-byte float. The drop rate is p rounded to a multiple of
    2**-16 (at most 7.7e-6 off) and the scale uses that rounded rate, so the expectation of
    the output stays exactly the input. Elsewhere (CUDA, eval, p outside the grid) it is
    `nn.Dropout`. Each mask's seed comes from torch's default generator: seeded runs and exact
    resume stay exact.

    `unscaled` gives the masked input and the scale apart, for a caller that folds the scale
    into a later linear map (`_fused_lora_forward` puts it in the addmm's alpha): one pass
    over the input fewer in the forward, one fewer over its gradient in the backward."""

    def unscaled(self, x: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(where(keep, x, 0), 1 / (1 - rate)): `forward(x)` is their product."""
        drop = round(self.p * _MASK_LEVELS)
        if not self.training or x.device.type != "cpu" or not 0 < drop < _MASK_LEVELS:
            return super().forward(x), 1.0
        kept: torch.Tensor = _Keep.apply(x, keep_mask(x.shape, drop))
        return kept, _MASK_LEVELS / (_MASK_LEVELS - drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept, scale = self.unscaled(x)
        return kept if scale == 1.0 else kept * scale


def use_cpu_dropout(model: nn.Module) -> int:
    """Swap every LoRA dropout of a model trained on the CPU for `CpuDropout`; returns how
    many. PEFT keeps them in `lora_dropout` ModuleDicts, one per adapted layer."""
    swapped = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, dropout in list(dropouts.items()):
            if type(dropout) is nn.Dropout and dropout.p > 0:
                dropouts[name] = CpuDropout(dropout.p)
                swapped += 1
    return swapped


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


class TokenBatch(Protocol):
    """What the decoder reads of a batch (supervised `Batch` and DPO's `PairBatch` alike)."""

    @property
    def input_ids(self) -> torch.Tensor: ...
    @property
    def position_ids(self) -> torch.Tensor: ...
    @property
    def attention_mask(self) -> torch.Tensor | None: ...
    @property
    def targets(self) -> torch.Tensor: ...


def target_states(
    model: PeftModel, batch: TokenBatch, dtype: torch.dtype
) -> tuple[PreTrainedModel, torch.Tensor, torch.Tensor]:
    """The base model, the decoder's last hidden states at target positions (decoder under
    autocast to `dtype`) and those targets: what the output head is applied to, in chunks.
    The last layer's MLP and output projection run at those positions only (`trim.py`)."""
    base = cast(PreTrainedModel, model.get_base_model())
    selected = batch.targets != IGNORE_INDEX
    with autocast(batch.input_ids.device, dtype), target_rows(model, selected):
        hidden = base.get_decoder()(
            input_ids=batch.input_ids,
            position_ids=batch.position_ids,
            attention_mask=batch.attention_mask,
            use_cache=False,
        ).last_hidden_state
    return base, hidden[selected], batch.targets[selected]


def batch_loss(
    model: PeftModel,
    batch: Batch,
    *,
    dtype: torch.dtype = torch.float32,
    chunk_size: int | None = None,
) -> LossSum:
    """Summed next-token cross-entropy over the batch's targets, and the argmax hits.

    Runs the decoder under autocast to `dtype`, then the output head only at target
    positions, in chunks of tokens (`chunked_cross_entropy`): prompt and padding positions
    never reach the (vocabulary-wide) head, and no `[targets, vocab]` fp32 logits exist at
    once. Packed batches pass no attention mask and no cache, which makes transformers
    attend within each example only.
    """
    base, hidden, targets = target_states(model, batch, dtype)
    with autocast(batch.input_ids.device, dtype):
        return chunked_cross_entropy(
            hidden,
            targets,
            base.get_output_embeddings(),
            softcap=getattr(base.config, "final_logit_softcapping", None),
            chunk_size=chunk_size or chunk_tokens(int(base.config.get_text_config().vocab_size)),
        )


def summed_loss(
    model: PeftModel, batch: Batch, *, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Sum of next-token cross-entropies over the batch's targets (see `batch_loss`)."""
    return batch_loss(model, batch, dtype=dtype).loss


@dataclass(frozen=True)
class EvalResult:
    loss: float  # token-mean cross-entropy
    mean_token_accuracy: float  # share of target tokens whose argmax is the label


def evaluate(
    model: PeftModel,
    batches: list[Batch],
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
) -> float | None:
    """Token-mean cross-entropy over the validation targets (None without validation)."""
    result = evaluate_batches(model, batches, device, dtype=dtype)
    return None if result is None else result.loss


@torch.no_grad()
def evaluate_batches(
    model: PeftModel,
    batches: list[Batch],
    device: torch.device,
    *,
    dtype: torch.dtype = torch.float32,
) -> EvalResult | None:
    """Token-mean cross-entropy and token accuracy over the validation targets (None
    without validation)."""
    if not batches:
        return None
    was_training = model.training
    model.eval()
    total, correct, count = 0.0, 0, 0
    for batch in batches:
        result = batch_loss(model, batch.to(device), dtype=dtype)
        total += float(result.loss)
        correct += int(result.correct)
        count += batch.target_tokens
    model.train(was_training)
    return EvalResult(loss=total / count, mean_token_accuracy=correct / count)
