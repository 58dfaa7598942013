"""The engine's CPU thread count: fixed by the environment, else the fastest probed count."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.training.helpers import small_spec, template_rows, write_jsonl
from worker.training import cpu_threads, train
from worker.training.cpu_threads import CpuThreads, candidates


@pytest.fixture(autouse=True)
def keep_torch_threads(monkeypatch: pytest.MonkeyPatch) -> object:
    before = torch.get_num_threads()
    monkeypatch.delenv("TRAIN_CPU_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    yield
    torch.set_num_threads(before)


def test_candidates_are_one_half_and_all() -> None:
    assert candidates(1) == [1]
    assert candidates(2) == [1, 2]
    assert candidates(16) == [1, 8, 16]


def test_environment_fixes_the_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAIN_CPU_THREADS", "1")
    monkeypatch.setattr(cpu_threads, "probe", lambda counts: pytest.fail("probed"))
    threads = CpuThreads()
    assert threads.start() == 1 and torch.get_num_threads() == 1
    assert threads.source == "environment"
    monkeypatch.setenv("TRAIN_CPU_THREADS", "two")
    with pytest.raises(ValueError, match="TRAIN_CPU_THREADS"):
        CpuThreads().start()


def test_probe_picks_the_fastest_and_probes_again_when_due(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    timings = {1: 0.02, 2: 0.09}  # two threads slower: the cores are busy with others
    monkeypatch.setattr(cpu_threads, "available_cpus", lambda: 2)
    monkeypatch.setattr(cpu_threads, "probe", lambda counts: dict(timings))
    now = [100.0]
    threads = CpuThreads(interval_s=60, clock=lambda: now[0])
    torch.set_num_threads(2)
    assert threads.start() == 1 and torch.get_num_threads() == 1
    timings.update({1: 0.03, 2: 0.016})  # the others finished
    now[0] += 59
    assert threads.between_steps() == 1  # not due yet
    now[0] += 1
    assert threads.between_steps() == 2 and torch.get_num_threads() == 2
    assert threads.choices == [1, 2]
    threads.restore()
    assert torch.get_num_threads() == 2


def test_real_probe_times_every_candidate() -> None:
    result = cpu_threads.probe([1, 2], rounds=1)
    assert set(result) == {1, 2} and all(t > 0 for t in result.values())


def test_train_records_threads_and_restores_them(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAIN_CPU_THREADS", "1")
    torch.set_num_threads(2)
    data = write_jsonl(tmp_path / "d.jsonl", template_rows(12, seed=3))
    result = train(small_spec(tiny_model_dir, max_steps=1), data, tmp_path / "out")
    assert result.metrics["cpu_threads"] == 1 and result.metrics["cpu_thread_choices"] == [1]
    assert torch.get_num_threads() == 2
