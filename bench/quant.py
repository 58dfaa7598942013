"""Stored bits per parameter of 4-bit weights, and quantization error of NF4 / FP4 / int4.

* bits/param: every tensor bitsandbytes keeps for a quantized 4096x4096 weight (packed
  4-bit codes, absmax constants, and with double quantization the second-level constants,
  code table and offset), times 8, over the number of weights; also over all Linear4bit layers
  of the tiny model as loaded by the engine. QLoRA's figures: 4.5 without double quantization,
  4 + 8/64 + 32/(64*256) = 4.127 with it.
* relative error ||W - dequant(quant(W))||^2 / ||W||^2 on N(0, 0.02^2) weights for NF4, FP4
  and symmetric blockwise int4 (block 64, absmax scaling, levels -7..7); QLoRA reports NF4
  lowest.

    .venv/bin/python bench/quant.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from bitsandbytes import functional as bnbf

N = 4096
BLOCK = 64


def state_bytes(packed: torch.Tensor, state: bnbf.QuantState) -> int:
    total = packed.numel() * packed.element_size()
    total += state.absmax.numel() * state.absmax.element_size()
    if state.nested:
        total += state.state2.absmax.numel() * state.state2.absmax.element_size()
        total += state.state2.code.numel() * state.state2.code.element_size()
        total += 4  # the fp32 offset
    return int(total)


def bits_per_param(weight: torch.Tensor, quant_type: str, double_quant: bool) -> float:
    packed, state = bnbf.quantize_4bit(
        weight, blocksize=BLOCK, quant_type=quant_type, compress_statistics=double_quant
    )
    return 8 * state_bytes(packed, state) / weight.numel()


def relative_error(weight: torch.Tensor, quant_type: str) -> float:
    packed, state = bnbf.quantize_4bit(weight, blocksize=BLOCK, quant_type=quant_type)
    restored = bnbf.dequantize_4bit(packed, state)
    return float((weight - restored).pow(2).sum() / weight.pow(2).sum())


def int4_relative_error(weight: torch.Tensor) -> float:
    blocks = weight.reshape(-1, BLOCK)
    scale = blocks.abs().amax(dim=1, keepdim=True) / 7
    restored = (blocks / scale).round().clamp(-7, 7) * scale
    return float((blocks - restored).pow(2).sum() / blocks.pow(2).sum())


def tiny_model_bits(double_quant: bool) -> float:
    import bitsandbytes as bnb

    from shared.train_spec import TrainSpec
    from worker.training.model import load_base_model
    from worker.training.tiny import build_tiny_model

    with tempfile.TemporaryDirectory() as tmp:
        path = build_tiny_model(Path(tmp))
        spec = TrainSpec(base_model=tmp, double_quant=double_quant, compute_dtype="float32")
        model = load_base_model(spec, path, torch.device("cpu"))
        stored = params = 0
        for module in model.modules():
            if isinstance(module, bnb.nn.Linear4bit):
                state = module.weight.quant_state  # type: ignore[attr-defined]
                stored += state_bytes(module.weight.data, state)
                params += module.in_features * module.out_features
        return 8 * stored / params


def main() -> None:
    torch.manual_seed(0)
    weight = torch.randn(N, N) * 0.02
    print(f"stored bits per parameter ({N}x{N} weight, block {BLOCK})")
    for dq, limit in ((False, 4.5), (True, 4.127)):
        bits = bits_per_param(weight, "nf4", dq)
        tiny = tiny_model_bits(dq)
        verdict = "ok" if bits <= limit + 1e-3 else "OVER"
        print(
            f"  NF4 double_quant={dq!s:5}  {bits:.4f}  (tiny model layers {tiny:.4f})"
            f"  limit {limit}  {verdict}"
        )
    print("relative quantization error on N(0, 0.02^2) weights (lower is better)")
    errors = {
        "NF4": relative_error(weight, "nf4"),
        "FP4": relative_error(weight, "fp4"),
        "int4 blockwise absmax": int4_relative_error(weight),
    }
    for name, err in errors.items():
        print(f"  {name:24} {err:.5f}  ({err / errors['NF4']:.2f}x NF4)")
    lowest = min(errors, key=errors.__getitem__)
    print(f"lowest error: {lowest}")


if __name__ == "__main__":
    main()
