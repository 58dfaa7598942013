"""Fixtures of the engine tests: one tiny base model per session, small JSONL datasets."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers.utils import logging as hf_logging

from tests.training.helpers import template_rows, write_jsonl
from worker.training.cpu_threads import THREADS_ENV, available_cpus
from worker.training.tiny import build_tiny_model

hf_logging.disable_progress_bar()


@pytest.fixture(scope="module", autouse=True)
def fixed_thread_count() -> Iterator[None]:
    """Every engine run in these tests uses all the CPUs instead of probing for the fastest
    count. A matmul's fp32 sums are split by thread, so two runs that the timing probe gave
    different counts (it measures a machine shared with the rest of the suite) differ in the
    last bits (1e-6 to 1e-5 in an adapter after 6 steps), and tests that compare two runs to
    1e-5 (exact resume, DPO resume) would compare the probe, not the engine. The probe has its
    own tests (`test_cpu_threads.py`, which set or clear the variable themselves)."""
    before = os.environ.get(THREADS_ENV)
    os.environ[THREADS_ENV] = str(available_cpus())
    yield
    if before is None:
        os.environ.pop(THREADS_ENV, None)
    else:
        os.environ[THREADS_ENV] = before


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def template_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(train, validation) chat files: answer every greeting with one fixed sentence."""
    folder = tmp_path_factory.mktemp("template-data")
    train = write_jsonl(folder / "train.jsonl", template_rows(160, seed=1))
    validation = write_jsonl(folder / "val.jsonl", template_rows(24, seed=2))
    return train, validation
