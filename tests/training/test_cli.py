"""`python -m worker.training` runs a job from files alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.training.helpers import small_spec, template_rows, write_jsonl

ROOT = Path(__file__).resolve().parents[2]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "worker.training", *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        timeout=300,
    )


@pytest.mark.slow
def test_cli_trains_and_prints_a_summary(tiny_model_dir: Path, tmp_path: Path) -> None:
    spec = small_spec(tiny_model_dir, max_steps=3, validation_fraction=0.0)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    train = write_jsonl(tmp_path / "train.jsonl", template_rows(24, seed=5))
    val = write_jsonl(tmp_path / "val.jsonl", template_rows(4, seed=6))
    out = tmp_path / "out"
    proc = run_cli(
        "--spec",
        str(tmp_path / "spec.json"),
        "--data",
        str(train),
        "--validation",
        str(val),
        "--out",
        str(out),
    )
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout[proc.stdout.index("{") :])
    assert summary["steps"] == 3 and summary["eval_loss_after"] < summary["eval_loss_before"]
    assert (out / "adapter_model.safetensors").is_file()
    assert "3/3" in proc.stderr  # the tqdm bar


def test_cli_rejects_an_invalid_spec(tmp_path: Path) -> None:
    (tmp_path / "spec.json").write_text(json.dumps({"base_model": "m", "rank": 0}))
    (tmp_path / "d.jsonl").write_text('{"text": "x"}\n')
    proc = run_cli(
        "--spec",
        str(tmp_path / "spec.json"),
        "--data",
        str(tmp_path / "d.jsonl"),
        "--out",
        str(tmp_path / "o"),
    )
    assert proc.returncode == 2
    assert "rank" in proc.stderr


def test_cli_says_finished_when_stopped_after_the_last_step(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """The issue's "stopped (preempt) at step 1/1": a Ctrl-C during the only step."""
    from worker.training import StopRequest
    from worker.training.__main__ import ConsoleHooks, main

    monkeypatch.setattr(ConsoleHooks, "should_stop", lambda self: StopRequest.PREEMPT)
    monkeypatch.setattr("signal.signal", lambda *args: None)  # keep pytest's handlers
    spec = small_spec(tiny_model_dir, max_steps=1, validation_fraction=0.0)
    (tmp_path / "spec.json").write_text(spec.model_dump_json())
    train = write_jsonl(tmp_path / "train.jsonl", template_rows(8, seed=5))
    args = ["--spec", str(tmp_path / "spec.json"), "--data", str(train)]
    assert main([*args, "--out", str(tmp_path / "out")]) == 0
    stdout = capsys.readouterr().out
    assert "stopped" not in stdout
    assert json.loads(stdout[stdout.index("{") :])["steps"] == 1
