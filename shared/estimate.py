"""GPU memory estimate of a QLoRA run, from a model's config.json and a `TrainSpec`.

Pure arithmetic, no torch: the API uses it to refuse jobs that fit no GPU class and to pick the
smallest class that does. It covers LLaMA-architecture decoders (q/k/v/o + gate/up/down
projections, RMSNorm, SwiGLU), which is what the model registry serves.

The parts, in bytes:

* quantized weights: the seven projections of every layer at 4 bits plus their blockwise
  constants: 32/64 bit/param of fp32 absmax without double quantization (4.5 bits), and
  8/64 + 32/(64*256) bit/param with it (about 4.127 bits). With `quant_type="none"` they are
  stored in the compute dtype.
* unquantized weights: embeddings and output head (unless tied) in the compute dtype, norms in
  fp32 (the engine's mixed-precision layout, `worker/training/model.py`).
* LoRA: r * (in + out) parameters per adapted projection (plus the magnitude vector with DoRA,
  plus full copies of `modules_to_save`), kept in fp32 (master weights), with fp32 gradients.
* optimizer: two Adam moments per trainable parameter, 4 bytes each for 32-bit optimizers; the
  8-bit ones store 1 byte each plus one fp32 absmax per 256-value block, but only for tensors
  of at least 4096 values (bitsandbytes' `min_8bit_size`), smaller ones stay 32-bit.
* activations of one micro-batch of `batch_size * max_seq_length` tokens (the packed worst
  case; `max_tokens_per_batch` when set), counted as the tensors autograd saves per decoder
  layer under autocast (see `_layer_activation_bytes`); with gradient checkpointing (on, or
  "auto": the worker turns it off only where the run fits without it) each layer's input (in
  the compute dtype) is kept, plus one layer recomputed and its backward's gradients; the
  logits chunk is freed before that layer is recomputed, so only the larger of the two counts.
* logits: the engine's cross-entropy runs over chunks of `LOGITS_CHUNK_ELEMENTS // vocab`
  tokens, so only one chunk's logits exist at a time. A frozen head (the default) makes each
  chunk's gradient in the forward: the head's output in the compute dtype, its fp32 upcast
  turned into the gradient in place, and that gradient's compute-dtype copy
  (`_FUSED_LOGIT_BYTES`), plus the hidden states' fp32 gradient per token. A trained head
  (`modules_to_save`) checkpoints each chunk: the head's output, log-softmax's fp32 output and
  the fp32 gradients (`_LOGIT_FP32_BYTES`).
* autocast copies: under bf16/fp16 autocast every fp32 weight a matmul reads (LoRA A and B, a
  trained `lm_head`) is cast once per forward and the copy is kept for the backward.
* dequantization workspace: a 4-bit projection is dequantized to the compute dtype for its
  matmul (forward and backward), one at a time: the largest projection's size.
* DPO (`method="dpo"`): a micro-batch of `batch_size` preference pairs is `2 * batch_size`
  sequences (chosen and rejected), so activations and logits count twice the tokens. The
  reference policy is the same 4-bit base with the adapter disabled (PEFT's
  `disable_adapter()`), run under `no_grad` before the policy's forward: no second model,
  no saved activations, so `reference_model_bytes` is 0 and the peak is the policy's.

A GPU class holds the run when the total fits in its capacity minus 1 GiB for the CUDA context
and kernels' workspaces, minus 10% for allocator fragmentation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from shared.train_spec import ALL_LINEAR, TrainSpec

GIB = 1024**3
GPU_CLASSES: dict[str, int] = {"24g": 24 * GIB, "48g": 48 * GIB, "80g": 80 * GIB}
CUDA_RESERVED_BYTES = 1 * GIB
FRAGMENTATION_HEADROOM = 0.10
BLOCK_SIZE = 64  # bitsandbytes 4-bit block size
DQ_BLOCK_SIZE = 256  # blocks per second-level constant with double quantization
OPTIMIZER_8BIT_BLOCK = 256
OPTIMIZER_MIN_8BIT_SIZE = 4096
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
DPO_REFERENCE = (
    "the same base with the adapter disabled (no second model in memory); its log-probs are "
    "computed under no_grad, so it adds no activations"
)
# model_type of the families whose RMSNorm is LLaMA's formula (`worker/training/norms.py`
# fuses those; Gemma's `1 + weight` norm runs stock and keeps an fp32 copy of its input)
LLAMA_NORM_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3"})
# On the CPU in a 16-bit dtype the engine attends each example with batched matmuls
# (`worker/training/attention.py`) where it holds at most this many [heads, L, L] scores,
# saving q, k and v only; longer examples, and GPUs, take flash kernels, which also save the
# output and its log-sum-exp.
BATCHED_SCORES_MAX = 1 << 22
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# Logits per chunk of the engine's cross-entropy (worker/training/losses.py uses this value).
LOGITS_CHUNK_ELEMENTS = 1 << 24
# Bytes per logit of one chunk at its peak in the backward, besides the compute-dtype head
# output: log-softmax's saved fp32 output and the fp32 gradients of the cross-entropy and of
# the logits, which overlap only in part (measured on the CPU: 2.2-2.5 fp32 copies).
_LOGIT_FP32_BYTES = 9
# The same for a frozen head, whose loss makes the gradient in the forward
# (`worker/training/losses.py`): the fp32 logits, which become the gradient in place; with
# soft-capping, the capped logits and the cap's derivative besides (8 more).
_FUSED_LOGIT_BYTES = 4


def compute_bytes(compute_dtype: str) -> int:
    """Bytes per element of the autocast dtype. "auto" is bf16 (or fp16 on GPUs without
    bf16): 2 bytes on every GPU the classes describe."""
    return 2 if compute_dtype == "auto" else _DTYPE_BYTES[compute_dtype]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a LLaMA-architecture decoder that memory depends on."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    tie_word_embeddings: bool
    logit_softcapping: bool = False  # Gemma-2/3's final soft-capping of the logits
    # LLaMA-style RMSNorm, which the engine fuses under autocast (worker/training/norms.py)
    llama_norms: bool = True

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> ModelShape:
        """Read the fields of an HF `config.json` (as a dict); raises ValueError if any lacks."""
        try:
            hidden = int(config["hidden_size"])
            heads = int(config["num_attention_heads"])
            return cls(
                hidden_size=hidden,
                intermediate_size=int(config["intermediate_size"]),
                num_hidden_layers=int(config["num_hidden_layers"]),
                num_attention_heads=heads,
                num_key_value_heads=int(config.get("num_key_value_heads") or heads),
                head_dim=int(config.get("head_dim") or hidden // heads),
                vocab_size=int(config["vocab_size"]),
                tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
                logit_softcapping=bool(config.get("final_logit_softcapping")),
                llama_norms=str(config.get("model_type", "llama")) in LLAMA_NORM_FAMILIES,
            )
        except KeyError as exc:
            raise ValueError(f"model config lacks {exc.args[0]!r}") from exc

    def projection_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each projection of one decoder layer."""
        h, i = self.hidden_size, self.intermediate_size
        q = self.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        return {
            "q_proj": (h, q),
            "k_proj": (h, kv),
            "v_proj": (h, kv),
            "o_proj": (q, h),
            "gate_proj": (h, i),
            "up_proj": (h, i),
            "down_proj": (i, h),
        }

    def projection_params(self) -> int:
        """Parameters of all projections of all layers (the part that is quantized)."""
        per_layer = sum(a * b for a, b in self.projection_shapes().values())
        return per_layer * self.num_hidden_layers

    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    def head_params(self) -> int:
        return 0 if self.tie_word_embeddings else self.vocab_size * self.hidden_size

    def norm_params(self) -> int:
        return (2 * self.num_hidden_layers + 1) * self.hidden_size

    def total_params(self) -> int:
        return (
            self.projection_params()
            + self.embedding_params()
            + self.head_params()
            + self.norm_params()
        )


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per part of one training process on one GPU, and the smallest class that fits."""

    quantized_weights_bytes: int
    unquantized_weights_bytes: int
    lora_params: int
    trainable_params: int
    trainable_weights_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int
    logits_bytes: int
    total_bytes: int
    gpu_class: str | None
    method: str = "supervised"
    reference_model_bytes: int = 0  # DPO's reference is the base with the adapter disabled
    reference_policy: str | None = None
    autocast_copy_bytes: int = 0  # compute-dtype copies of fp32 weights under autocast
    workspace_bytes: int = 0  # one projection dequantized for its matmul
    logits_chunk_tokens: int = 0  # tokens per chunk of the chunked cross-entropy
    compute_bytes: int = 2  # bytes per element of the compute dtype assumed
    # With checkpointing, the logits chunk and the recomputed layer never coexist (the head's
    # backward ends before the first layer is recomputed): the smaller is not in the peak.
    disjoint_bytes: int = 0

    def transient_bytes(self) -> int:
        """What exists only during a step, at its peak: activations, one logits chunk,
        autocast copies, dequantization workspace."""
        return (
            self.activation_bytes
            + self.logits_bytes
            + self.autocast_copy_bytes
            + self.workspace_bytes
            - self.disjoint_bytes
        )

    def static_bytes(self) -> int:
        """Everything but activations and logits: what stays allocated between steps."""
        return (
            self.quantized_weights_bytes
            + self.unquantized_weights_bytes
            + self.trainable_weights_bytes
            + self.gradient_bytes
            + self.optimizer_bytes
        )


def quantized_bits_per_param(quant_type: str, double_quant: bool, compute_dtype: str) -> float:
    """Stored bits per projection weight, constants included."""
    if quant_type == "none":
        return 8.0 * compute_bytes(compute_dtype)
    if double_quant:
        return 4 + 8 / BLOCK_SIZE + 32 / (BLOCK_SIZE * DQ_BLOCK_SIZE)
    return 4 + 32 / BLOCK_SIZE


def lora_targets(shape: ModelShape, target_modules: list[str] | str) -> list[str]:
    """The projections LoRA adapts; raises ValueError naming target_modules for unknown ones."""
    if target_modules == ALL_LINEAR:
        return list(PROJECTIONS)
    names = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    unknown = [n for n in names if n.rsplit(".", 1)[-1] not in shape.projection_shapes()]
    if unknown:
        raise ValueError(
            f"target_modules: {', '.join(unknown)} not in this model "
            f"(known: {', '.join(PROJECTIONS)})"
        )
    return [n.rsplit(".", 1)[-1] for n in names]


def lora_tensor_sizes(shape: ModelShape, spec: TrainSpec) -> list[int]:
    """Element counts of every trainable tensor (LoRA A/B, DoRA magnitudes, saved modules)."""
    sizes: list[int] = []
    shapes = shape.projection_shapes()
    for name in lora_targets(shape, spec.target_modules):
        fan_in, fan_out = shapes[name]
        per_layer = [spec.rank * fan_in, fan_out * spec.rank]
        if spec.use_dora:
            per_layer.append(fan_out)
        sizes.extend(per_layer * shape.num_hidden_layers)
    for module in spec.modules_to_save:
        leaf = module.rsplit(".", 1)[-1]
        if leaf in ("lm_head", "embed_tokens"):
            sizes.append(shape.vocab_size * shape.hidden_size)
        else:
            raise ValueError(f"modules_to_save: cannot size {module!r} (lm_head, embed_tokens)")
    return sizes


def lora_param_count(shape: ModelShape, spec: TrainSpec) -> int:
    """LoRA A and B parameters only: r * (in + out) per adapted projection per layer."""
    shapes = shape.projection_shapes()
    per_layer = sum(
        spec.rank * sum(shapes[name]) for name in lora_targets(shape, spec.target_modules)
    )
    return per_layer * shape.num_hidden_layers


def optimizer_state_bytes(tensor_sizes: list[int], optimizer: str) -> int:
    """Adam's two moments for each trainable tensor, as bitsandbytes or torch store them."""
    eight_bit = optimizer in ("paged_adamw_8bit", "adamw_8bit")
    total = 0
    for n in tensor_sizes:
        if eight_bit and n >= OPTIMIZER_MIN_8BIT_SIZE:
            blocks = math.ceil(n / OPTIMIZER_8BIT_BLOCK)
            total += 2 * (n + 4 * blocks + 4 * 256)  # uint8 state + fp32 absmax + qmap
        else:
            total += 2 * 4 * n
    return total


def _lora_input_bytes(shape: ModelShape, spec: TrainSpec) -> int:
    """Per token and layer: what the LoRA branches save of their inputs.

    The branches' inputs are in the compute dtype (the engine casts a norm's output once,
    under autocast). With dropout, each branch keeps its mask (a bool per element: CUDA's
    fused dropout, and the engine's `CpuDropout` on the CPU) and A keeps its own dropped
    input. Without dropout A keeps its input itself, which q/k/v share (and gate/up), and
    o_proj's is the attention output already counted.
    """
    d = compute_bytes(spec.compute_dtype)
    shapes = shape.projection_shapes()
    targets = lora_targets(shape, spec.target_modules)
    fan_in = sum(shapes[name][0] for name in targets)
    if spec.dropout > 0:
        return (1 + d) * fan_in
    h, i = shape.hidden_size, shape.intermediate_size
    shared = h * any(n in targets for n in ("q_proj", "k_proj", "v_proj"))
    shared += h * any(n in targets for n in ("gate_proj", "up_proj"))
    return d * (shared + i * ("down_proj" in targets))


def _layer_activation_bytes(shape: ModelShape, spec: TrainSpec, device: str = "cuda") -> int:
    """Bytes autograd saves per token in one decoder layer under autocast (sdpa / flash
    attention: no s*s scores), as measured tensor by tensor on the engine's path.

    Each RMSNorm keeps its input (and an fp32 rsqrt per token): in the compute dtype where the
    engine fuses it (LLaMA-style norms under autocast), else an fp32 copy; its fp32 weight is
    frozen, so the normalised product is not kept, nor are the inputs of the frozen base
    projections.
    In the compute dtype: q, k (after RoPE), v, the attention output (plus fp32 log-sum-exp
    per head; not on the CPU's batched path, `BATCHED_SCORES_MAX`), gate, up and silu(gate).
    LoRA: A's r-wide output, and its input (see `_lora_input_bytes`).
    """
    d = compute_bytes(spec.compute_dtype)
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    norms = 2 * ((d if shape.llama_norms else 4) * h + 4)
    attention = d * (q + 2 * kv + q) + 4 * shape.num_attention_heads
    longest = shape.num_attention_heads * spec.max_seq_length**2
    if device == "cpu" and d == 2 and longest <= BATCHED_SCORES_MAX:
        attention = d * (q + 2 * kv)
    mlp = 3 * d * i
    lora = d * spec.rank * len(lora_targets(shape, spec.target_modules))
    return norms + attention + mlp + lora + _lora_input_bytes(shape, spec)


def _layer_backward_bytes(shape: ModelShape, spec: TrainSpec) -> int:
    """Per token: the gradients alive while one recomputed decoder layer runs its backward,
    besides its activations: the residual stream's gradient in and out (the layer's inner
    gradients replace activations it frees as it goes)."""
    return 2 * compute_bytes(spec.compute_dtype) * shape.hidden_size


def estimate_memory(
    config: Mapping[str, Any] | ModelShape, spec: TrainSpec, device: str = "cuda"
) -> MemoryEstimate:
    """Estimate the peak memory of training `spec` on the model described by `config`.

    Much the same on a GPU and on the CPU (both keep a bool per element as LoRA dropout's
    mask); `device="cpu"` counts the CPU's batched attention of short examples, which saves
    less. "auto" compute dtype counts as 2 bytes (what it resolves to on a GPU); give the
    CPU's resolved dtype explicitly.
    """
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    d = compute_bytes(spec.compute_dtype)
    bits = quantized_bits_per_param(spec.quant_type, spec.double_quant, spec.compute_dtype)
    quantized = math.ceil(shape.projection_params() * bits / 8)
    unquantized = d * (shape.embedding_params() + shape.head_params()) + 4 * shape.norm_params()
    sizes = lora_tensor_sizes(shape, spec)
    trainable = sum(sizes)
    tokens = spec.micro_batch_tokens()  # DPO: chosen + rejected; or the token budget
    h, layers = shape.hidden_size, shape.num_hidden_layers
    per_layer = _layer_activation_bytes(shape, spec, device)
    checkpointing = spec.gradient_checkpointing is not False  # "auto" may resolve to on
    recomputed = 0
    if checkpointing:
        recomputed = tokens * (per_layer + _layer_backward_bytes(shape, spec))
        per_token = d * h * layers
    else:
        per_token = per_layer * layers
    per_token += 2 * d * shape.head_dim  # RoPE cos and sin, shared by the layers
    per_token += (d if shape.llama_norms else 4) * h + 4  # the final norm's input, rsqrt
    per_token += d * h + 8  # its output at the target positions (the loss's input), index
    trained_head = any(m.rsplit(".", 1)[-1] == "lm_head" for m in spec.modules_to_save)
    if not trained_head:
        per_token += 4 * h  # the frozen head's loss keeps the hidden states' fp32 gradient
    activations = tokens * per_token + recomputed
    chunk = max(1, min(tokens, LOGITS_CHUNK_ELEMENTS // shape.vocab_size))
    extra = 0 if d == 4 else d  # the head's output before the fp32 upcast
    if trained_head:  # checkpointed chunks: log-softmax and its backward
        per_logit = _LOGIT_FP32_BYTES + extra
    else:  # the fp32 logits turned into their gradient in place, and its compute-dtype copy
        per_logit = _FUSED_LOGIT_BYTES + 2 * extra + 8 * shape.logit_softcapping
    logits = chunk * shape.vocab_size * per_logit
    autocast_copies = 0
    if d != 4:
        autocast_copies = d * (lora_param_count(shape, spec) + trained_head * shape.head_params())
    workspace = 0
    if spec.quant_type != "none":
        workspace = d * max(a * b for a, b in shape.projection_shapes().values())
    parts = [quantized, unquantized, 4 * trainable, 4 * trainable]
    optimizer = optimizer_state_bytes(sizes, spec.optimizer)
    disjoint = min(logits, recomputed)
    total = sum(parts) + optimizer + activations + logits + autocast_copies + workspace - disjoint
    return MemoryEstimate(
        quantized_weights_bytes=quantized,
        unquantized_weights_bytes=unquantized,
        lora_params=lora_param_count(shape, spec),
        trainable_params=trainable,
        trainable_weights_bytes=4 * trainable,
        gradient_bytes=4 * trainable,
        optimizer_bytes=optimizer,
        activation_bytes=activations,
        logits_bytes=logits,
        total_bytes=total,
        gpu_class=smallest_gpu_class(total),
        method=spec.method,
        reference_policy=DPO_REFERENCE if spec.method == "dpo" else None,
        autocast_copy_bytes=autocast_copies,
        workspace_bytes=workspace,
        logits_chunk_tokens=chunk,
        compute_bytes=d,
        disjoint_bytes=disjoint,
    )


def usable_bytes(capacity: int) -> int:
    """What a training process can allocate on a GPU of `capacity` bytes."""
    return int((capacity - CUDA_RESERVED_BYTES) * (1 - FRAGMENTATION_HEADROOM))


def smallest_gpu_class(total_bytes: int) -> str | None:
    """The smallest of 24g/48g/80g that holds `total_bytes`, or None if none does."""
    for name, capacity in GPU_CLASSES.items():
        if total_bytes <= usable_bytes(capacity):
            return name
    return None
