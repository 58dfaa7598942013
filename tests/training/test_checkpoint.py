"""Checkpoints: preemption writes one, resume reproduces the uninterrupted run, damage is
refused with a message naming what is wrong."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.training.helpers import completion_rows, small_spec, write_jsonl
from tests.training.test_train import RecordingHooks
from worker.training import CheckpointError, StopRequest, TrainResult, train
from worker.training.checkpoint import read_checkpoint

# 37 rows -> 33 train / 4 held out; batch 4, accumulation 2: 9 micro-batches, 5 steps per
# epoch (the last with one micro-batch), so 8 steps cross an epoch boundary and step 4 is
# in the middle of one. Padded batches, dropout and 8-bit paged AdamW all take part.
K = 4


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("resume") / "d.jsonl", completion_rows(37, seed=9))


def resume_spec(model_dir: Path, **overrides: object):  # type: ignore[no-untyped-def]
    values: dict[str, object] = {
        "max_steps": 2 * K,
        "packing": False,
        "dropout": 0.1,
        "optimizer": "paged_adamw_8bit",
        "warmup_ratio": 0.2,
        "checkpoint_steps": 3,
    }
    values.update(overrides)
    return small_spec(model_dir, **values)


@pytest.fixture(scope="module")
def straight(tiny_model_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    hooks = RecordingHooks()
    result = train(resume_spec(tiny_model_dir), dataset, tmp_path_factory.mktemp("a"), hooks)
    return result, hooks


@pytest.fixture(scope="module")
def preempted(tiny_model_dir: Path, dataset: Path, tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    hooks = RecordingHooks(stop_at=K, request=StopRequest.PREEMPT)
    result = train(resume_spec(tiny_model_dir), dataset, tmp_path_factory.mktemp("b"), hooks)
    return result, hooks


@pytest.mark.slow
def test_preempt_writes_a_checkpoint_and_stops(preempted) -> None:  # type: ignore[no-untyped-def]
    result, hooks = preempted
    assert result.stopped is StopRequest.PREEMPT and result.step == K
    assert [step for _, step in hooks.checkpoints] == [3, K]
    path = hooks.checkpoints[-1][0]
    assert path == result.checkpoint and path.name == f"step-{K}"
    assert not (path.parent / "step-3").exists()  # only the latest is kept
    manifest = json.loads((path / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "adapter_model.safetensors",
        "optimizer.safetensors",
        "optimizer.json",
        "rng.safetensors",
        "trainer_state.json",
        "train_spec.json",
    }
    state = json.loads((path / "trainer_state.json").read_text())
    assert (state["step"], state["epoch"], state["batch_index"]) == (K, 0, 2 * K)


@pytest.mark.slow
def test_resume_reproduces_uninterrupted_run(  # type: ignore[no-untyped-def]
    straight, preempted, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    full: TrainResult = straight[0]
    # resume in (a copy of) the preempted run's own folder, as the jobs pipeline does
    out = Path(shutil.copytree(preempted[0].checkpoint.parent.parent, tmp_path / "b"))
    checkpoint = out / "checkpoints" / f"step-{K}"
    resumed = train(resume_spec(tiny_model_dir), dataset, out, resume_from=checkpoint)
    assert resumed.stopped is None and resumed.step == 2 * K
    assert full.output_dir is not None and resumed.output_dir is not None
    a = load_file(full.output_dir / "adapter_model.safetensors")
    b = load_file(resumed.output_dir / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst <= 1e-5, worst
    history = [(h["step"], h["lr"]) for h in full.metrics["history"]]
    assert [(h["step"], h["lr"]) for h in resumed.metrics["history"]] == history
    for x, y in zip(full.metrics["history"], resumed.metrics["history"], strict=True):
        assert abs(x["loss"] - y["loss"]) <= 1e-5
    assert resumed.metrics["train_tokens"] == full.metrics["train_tokens"]
    assert resumed.metrics["eval_loss_before"] == full.metrics["eval_loss_before"]
    assert abs(resumed.metrics["eval_loss_after"] - full.metrics["eval_loss_after"]) < 1e-5
    # and the adapter did move: a hollow resume (no training) would not match
    init = train(
        resume_spec(tiny_model_dir, max_steps=1, checkpoint_steps=None), dataset, tmp_path / "one"
    )
    assert init.output_dir is not None
    one = load_file(init.output_dir / "adapter_model.safetensors")
    assert max(float((a[k] - one[k]).abs().max()) for k in a) > 1e-3


@pytest.fixture
def checkpoint_copy(preempted, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    source = preempted[0].checkpoint
    return Path(shutil.copytree(source, tmp_path / source.name))


@pytest.mark.slow
def test_intact_copy_reads(checkpoint_copy: Path) -> None:
    assert read_checkpoint(checkpoint_copy).state["step"] == K


@pytest.mark.slow
def test_missing_manifest_is_refused(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest.json missing .*never completed"):
        read_checkpoint(checkpoint_copy)


@pytest.mark.slow
def test_truncated_file_is_refused(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "optimizer.safetensors"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"optimizer.safetensors has 100 bytes"):
        read_checkpoint(checkpoint_copy)


@pytest.mark.slow
def test_flipped_byte_is_refused(checkpoint_copy: Path) -> None:
    path = checkpoint_copy / "adapter_model.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"adapter_model.safetensors sha256 mismatch"):
        read_checkpoint(checkpoint_copy)


@pytest.mark.slow
def test_missing_file_is_refused(checkpoint_copy: Path) -> None:
    (checkpoint_copy / "rng.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"rng.safetensors missing"):
        read_checkpoint(checkpoint_copy)


@pytest.mark.slow
def test_other_spec_or_dataset_is_refused(
    checkpoint_copy: Path, tiny_model_dir: Path, dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(CheckpointError, match=r"spec differs in learning_rate"):
        train(
            resume_spec(tiny_model_dir, learning_rate=1e-4),
            dataset,
            tmp_path / "o",
            resume_from=checkpoint_copy,
        )
    other = write_jsonl(tmp_path / "other.jsonl", completion_rows(37, seed=10))
    with pytest.raises(CheckpointError, match=r"another dataset"):
        train(resume_spec(tiny_model_dir), other, tmp_path / "o", resume_from=checkpoint_copy)


def test_not_a_checkpoint_is_refused(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not a directory"):
        read_checkpoint(tmp_path / "nope")
