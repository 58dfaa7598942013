"""The engine on CUDA (run on a GPU box with `pytest -m gpu`); skipped without a GPU."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.helpers import small_spec, template_rows, write_jsonl
from worker.training import train

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


@pytest.mark.parametrize("optimizer", ["paged_adamw_8bit", "paged_adamw_32bit"])
def test_qlora_trains_on_cuda(tiny_model_dir: Path, tmp_path: Path, optimizer: str) -> None:
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(64, seed=3))
    spec = small_spec(tiny_model_dir, compute_dtype="bfloat16", optimizer=optimizer, max_steps=20)
    result = train(spec, data, tmp_path / "out")
    m = result.metrics
    assert m["device"].startswith("cuda")
    assert m["eval_loss_after"] < m["eval_loss_before"]
    assert m["peak_gpu_bytes"] > 0


def test_resume_is_exact_on_cuda(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from tests.training.test_train import RecordingHooks
    from worker.training import StopRequest

    data = write_jsonl(tmp_path / "d.jsonl", template_rows(48, seed=4))
    spec = small_spec(tiny_model_dir, max_steps=8, dropout=0.1)
    full = train(spec, data, tmp_path / "a")
    stop = RecordingHooks(stop_at=4, request=StopRequest.PREEMPT)
    part = train(spec, data, tmp_path / "b", stop)
    assert part.checkpoint is not None
    resumed = train(spec, data, tmp_path / "b", resume_from=part.checkpoint)
    assert full.output_dir is not None and resumed.output_dir is not None
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    # CUDA kernels are not bitwise deterministic run to run: a looser bound than on CPU
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-3


def _adam_step_under_cap(make_optimizer: object) -> None:
    """Four 256 MiB fp32 parameters with gradients, then the allocator capped at what is
    already in use plus 512 MiB: a 32-bit AdamW state (2 GiB) cannot come from it."""
    device = torch.device("cuda")
    params = [torch.nn.Parameter(torch.randn(8192, 8192, device=device)) for _ in range(4)]
    for p in params:
        p.grad = torch.randn_like(p)
    torch.cuda.synchronize()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + 512 * 2**20
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        optimizer = make_optimizer(params)  # type: ignore[operator]
        for _ in range(2):
            optimizer.step()
        torch.cuda.synchronize()
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        del params
        torch.cuda.empty_cache()


def test_paged_optimizer_steps_under_memory_pressure() -> None:
    """Paged optimizers keep their state in CUDA unified memory, outside torch's allocator,
    which the driver pages to host RAM under pressure; torch's AdamW needs the same state
    inside the capped allocator and runs out of memory. The control proves the pressure."""
    import bitsandbytes as bnb

    with pytest.raises(torch.OutOfMemoryError):
        _adam_step_under_cap(lambda ps: torch.optim.AdamW(ps, lr=1e-4))
    _adam_step_under_cap(lambda ps: bnb.optim.PagedAdamW32bit(ps, lr=1e-4))
    _adam_step_under_cap(lambda ps: bnb.optim.PagedAdamW8bit(ps, lr=1e-4))
