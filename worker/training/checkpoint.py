"""Resumable checkpoints: written atomically, verified by a manifest before anything is loaded.

Layout of `output_dir/checkpoints/step-{n}/`:

* `adapter_model.safetensors`: the trainable weights (`get_peft_model_state_dict`);
* `optimizer.safetensors` + `optimizer.json`: the optimizer state's tensors, and the rest of
  its state dict (param groups, scalar state) as JSON;
* `rng.safetensors`: torch CPU (and CUDA) generator states;
* `trainer_state.json`: step, data position (epoch, micro-batch index), scheduler state,
  counters, loss history, dataset fingerprint;
* `train_spec.json`: the spec snapshot;
* `manifest.json`, written last: size and sha256 of every file above.

The files go to a hidden `.step-{n}.partial` folder, each fsynced, then the folder is renamed.
Nothing uses pickle: tensors are safetensors, the rest JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from shared.train_spec import RESUME_MUTABLE_FIELDS, TrainSpec
from worker.training.hooks import SpecError

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
ADAPTER = "adapter_model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
RNG = "rng.safetensors"
STATE = "trainer_state.json"
SPEC = "train_spec.json"
REQUIRED_FILES = (ADAPTER, OPTIMIZER_TENSORS, OPTIMIZER_JSON, RNG, STATE, SPEC)


class CheckpointError(Exception):
    """A checkpoint that cannot be resumed from; the message says which part is wrong."""


@dataclass(frozen=True)
class Checkpoint:
    """A verified checkpoint, loaded into memory."""

    path: Path
    spec: TrainSpec
    adapter: dict[str, torch.Tensor]
    optimizer_state: dict[str, Any]
    rng: dict[str, torch.Tensor]
    state: dict[str, Any]


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True), encoding="utf-8")


def _flatten(
    prefix: str, value: Any, tensors: dict[str, torch.Tensor], rest: dict[str, Any]
) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            _flatten(f"{prefix}/{key}", item, tensors, rest)
    elif isinstance(value, torch.Tensor):
        tensors[prefix] = value.detach().cpu().clone()  # bnb shares qmaps across params
    else:
        rest[prefix] = value


def split_optimizer_state(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], Any]:
    """Tensors of an optimizer state dict, keyed by their path (`param/name[/sub]`), and a
    JSON-able remainder. bitsandbytes nests its 8-bit state in a dict, hence paths."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, Any] = {}
    for param_id, values in state_dict["state"].items():
        _flatten(str(param_id), values, tensors, scalars)
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: Any) -> dict[str, Any]:
    """Inverse of `split_optimizer_state`."""
    state: dict[int, dict[str, Any]] = {}
    for path, value in [*tensors.items(), *rest["scalars"].items()]:
        param_id, *keys = path.split("/")
        node = state.setdefault(int(param_id), {})
        for key in keys[:-1]:
            node = node.setdefault(key, {})
        node[keys[-1]] = value
    groups = []
    for group in rest["param_groups"]:
        group = dict(group)
        if isinstance(group.get("betas"), list):
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}


def rng_state() -> dict[str, torch.Tensor]:
    states = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"cuda_{i}"] = s
    return states


def restore_rng(states: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(states["torch_cpu"])
    cuda = [states[k] for k in sorted(states) if k.startswith("cuda_")]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda)


def write_checkpoint(
    root: Path,
    step: int,
    *,
    spec: TrainSpec,
    adapter: dict[str, torch.Tensor],
    optimizer_state: dict[str, Any],
    state: dict[str, Any],
) -> Path:
    """Write `root/step-{step}` atomically and drop older checkpoints; returns its path."""
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step}"
    partial = root / f".step-{step}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    save_file({k: v.detach().cpu().contiguous() for k, v in adapter.items()}, partial / ADAPTER)
    tensors, rest = split_optimizer_state(optimizer_state)
    save_file(tensors, partial / OPTIMIZER_TENSORS)
    _write_json(partial / OPTIMIZER_JSON, rest)
    save_file(rng_state(), partial / RNG)
    _write_json(partial / STATE, state)
    (partial / SPEC).write_text(spec.model_dump_json(indent=2), encoding="utf-8")
    files = {}
    for name in REQUIRED_FILES:
        _fsync(partial / name)
        files[name] = {"sha256": _sha256(partial / name), "bytes": (partial / name).stat().st_size}
    _write_json(partial / MANIFEST, {"format": FORMAT_VERSION, "step": step, "files": files})
    _fsync(partial / MANIFEST)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(partial, final)
    _fsync(root)
    for old in root.glob("step-*"):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def verify_checkpoint(path: Path) -> dict[str, Any]:
    """Check the manifest against the files; returns the manifest or raises CheckpointError."""
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path}: not a directory")
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError(
            f"checkpoint {path}: {MANIFEST} missing (the checkpoint was never completed)"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        files = manifest["files"]
        version = manifest["format"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {MANIFEST} is unreadable ({exc})") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(f"checkpoint {path}: format {version}, expected {FORMAT_VERSION}")
    for name in REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"checkpoint {path}: {MANIFEST} does not list {name}")
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint {path}: {name} missing")
        if file.stat().st_size != files[name]["bytes"]:
            raise CheckpointError(
                f"checkpoint {path}: {name} has {file.stat().st_size} bytes, "
                f"manifest says {files[name]['bytes']} (truncated or partial)"
            )
        if _sha256(file) != files[name]["sha256"]:
            raise CheckpointError(f"checkpoint {path}: {name} sha256 mismatch (corrupt)")
    return dict(manifest)


def read_checkpoint(path: Path) -> Checkpoint:
    """Verify, then load a checkpoint into memory (tensors via safetensors, no pickle)."""
    path = Path(path)
    verify_checkpoint(path)
    try:
        spec = TrainSpec.model_validate_json((path / SPEC).read_text(encoding="utf-8"))
        rest = json.loads((path / OPTIMIZER_JSON).read_text(encoding="utf-8"))
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        return Checkpoint(
            path=path,
            spec=spec,
            adapter=load_file(path / ADAPTER),
            optimizer_state=join_optimizer_state(load_file(path / OPTIMIZER_TENSORS), rest),
            rng=load_file(path / RNG),
            state=state,
        )
    except (ValueError, KeyError, SafetensorError) as exc:
        raise CheckpointError(f"checkpoint {path}: cannot be loaded ({exc})") from exc


def load_adapter_weights(model: PeftModel, path: Path) -> None:
    """Start a run from trained LoRA weights: an `adapter_model.safetensors` as a finished
    run's PEFT folder or a checkpoint holds it. Its tensors must be exactly the ones this
    spec's LoRA has (same targets, rank, modules_to_save), else SpecError."""
    try:
        tensors = load_file(Path(path))
    except (OSError, SafetensorError) as exc:
        raise SpecError("the initial adapter's weights cannot be read") from exc
    expected = set(get_peft_model_state_dict(model))
    if set(tensors) != expected:
        extra, missing = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise SpecError(
            "the initial adapter does not fit this LoRA configuration "
            f"(unexpected tensors {extra[:3]}, missing {missing[:3]})"
        )
    try:
        set_peft_model_state_dict(model, tensors)
    except RuntimeError as exc:  # a shape mismatch (another rank)
        raise SpecError("the initial adapter's tensor shapes do not fit this LoRA rank") from exc


def check_resumable(checkpoint: Checkpoint, spec: TrainSpec, dataset_sha256: str) -> None:
    """Refuse to resume under a different spec or dataset (the data position would lie)."""
    old, new = checkpoint.spec.model_dump(), spec.model_dump()
    changed = sorted(k for k in new if k not in RESUME_MUTABLE_FIELDS and old[k] != new[k])
    if changed:
        raise CheckpointError(f"checkpoint {checkpoint.path}: spec differs in {', '.join(changed)}")
    if checkpoint.state.get("dataset_sha256") != dataset_sha256:
        raise CheckpointError(f"checkpoint {checkpoint.path}: written for another dataset")


def file_sha256(path: Path) -> str:
    return _sha256(Path(path))
