"""Fixtures of the engine tests: one tiny base model per session, small JSONL datasets."""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from transformers.utils import logging as hf_logging

from tests.training.helpers import template_rows, write_jsonl
from worker.training.tiny import build_tiny_model

hf_logging.disable_progress_bar()


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
