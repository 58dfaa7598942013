"""GPU memory estimate of a QLoRA run, from a model's config.json and a `TrainSpec`.

Pure arithmetic, no torch: the API uses it to refuse jobs that fit no GPU class and to pick the
smallest class that does. It covers LLaMA-architecture decoders (q/k/v/o + gate/up/down
projections, RMSNorm, SwiGLU), which is what the model registry serves.

The parts, in bytes:

* quantized weights: the seven projections of every layer at 4 bits plus their blockwise
  constants: 32/64 bit/param of fp32 absmax without double quantization (4.5 bits), and
  8/64 + 32/(64*256) bit/param with it (about 4.127 bits). With `quant_type="none"` they are
  stored in the compute dtype.
* unquantized weights: embeddings, output head (unless tied) and norms. With 4-bit loading
  `prepare_model_for_kbit_training` upcasts them to fp32; otherwise compute dtype.
* LoRA: r * (in + out) parameters per adapted projection (plus the magnitude vector with DoRA,
  plus full copies of `modules_to_save`), kept in fp32, with fp32 gradients.
* optimizer: two Adam moments per trainable parameter, 4 bytes each for 32-bit optimizers; the
  8-bit ones store 1 byte each plus one fp32 absmax per 256-value block, but only for tensors
  of at least 4096 values (bitsandbytes' `min_8bit_size`), smaller ones stay 32-bit.
* activations of one micro-batch of `batch_size * max_seq_length` tokens (the packed worst
  case), counted as the tensors autograd saves per decoder layer (see `_layer_activation_bytes`);
  with gradient checkpointing only each layer's fp32 input is kept, plus one layer recomputed.
* logits: fp32 logits and their gradient for every token of the micro-batch.

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
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}


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
        return 8.0 * _DTYPE_BYTES[compute_dtype]
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


def _layer_activation_bytes(shape: ModelShape, spec: TrainSpec) -> int:
    """Bytes autograd saves per token in one decoder layer (sdpa attention, no s*s scores).

    fp32 inputs of both RMSNorms (prepare_model_for_kbit_training keeps norms in fp32), and in
    the compute dtype: the normed inputs of attention and MLP, q, k (after RoPE), v, the
    attention output, the o_proj input, gate, up, silu(gate) and their product. Each
    LoRA-adapted projection adds its fp32 dropped input plus a 1-byte dropout mask and the
    r-wide fp32 output of A.
    """
    d = _DTYPE_BYTES[spec.compute_dtype]
    h, i = shape.hidden_size, shape.intermediate_size
    q = shape.num_attention_heads * shape.head_dim
    kv = shape.num_key_value_heads * shape.head_dim
    base = 2 * 4 * h + d * (2 * h + q + 2 * kv + q + q + 4 * i)
    lora = 0
    shapes = shape.projection_shapes()
    for name in lora_targets(shape, spec.target_modules):
        fan_in = shapes[name][0]
        lora += 4 * spec.rank
        if spec.dropout > 0:
            lora += 4 * fan_in + fan_in
    return base + lora


def estimate_memory(config: Mapping[str, Any] | ModelShape, spec: TrainSpec) -> MemoryEstimate:
    """Estimate the peak GPU memory of training `spec` on the model described by `config`."""
    shape = config if isinstance(config, ModelShape) else ModelShape.from_config(config)
    bits = quantized_bits_per_param(spec.quant_type, spec.double_quant, spec.compute_dtype)
    quantized = math.ceil(shape.projection_params() * bits / 8)
    unquant_bytes = 4 if spec.quant_type != "none" else _DTYPE_BYTES[spec.compute_dtype]
    unquantized = unquant_bytes * (
        shape.embedding_params() + shape.head_params() + shape.norm_params()
    )
    sizes = lora_tensor_sizes(shape, spec)
    trainable = sum(sizes)
    tokens = spec.batch_size * spec.max_seq_length
    per_layer = _layer_activation_bytes(shape, spec)
    if spec.gradient_checkpointing:
        per_token = 4 * shape.hidden_size * shape.num_hidden_layers + per_layer
    else:
        per_token = per_layer * shape.num_hidden_layers
    per_token += (4 + _DTYPE_BYTES[spec.compute_dtype]) * shape.hidden_size  # final norm
    activations = tokens * per_token
    logits = tokens * shape.vocab_size * 4 * 2
    parts = [quantized, unquantized, 4 * trainable, 4 * trainable]
    optimizer = optimizer_state_bytes(sizes, spec.optimizer)
    total = sum(parts) + optimizer + activations + logits
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
