"""The issue's "done when" for OpenAI parity, literally: an OpenAI fine-tuning script
(examples/openai_finetune.py: upload, create SFT and DPO jobs, pause/resume, follow events, read
the results file, pick a checkpoint, list by metadata, catch the SDK's exception classes,
delete the model) runs against the real stack with only OPENAI_BASE_URL and OPENAI_API_KEY
set, as a separate process with the default (non-strict) SDK client, as a team would run it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness.stack import addition_rows, jsonl
from tests.jobs.conftest import ROOT, ServiceStack, stop
from tests.training.test_dpo import preference_rows

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCRIPT = ROOT / "examples" / "openai_finetune.py"


@pytest.fixture(scope="module")
def worker(stack: ServiceStack) -> Iterator[None]:
    proc = stack.start_worker()
    yield
    stop(proc)


def test_an_openai_fine_tuning_script_runs_with_only_base_url_and_key_changed(
    stack: ServiceStack, worker: None, tmp_path: Path
) -> None:
    headers = stack.new_tenant("script team")
    chat = [
        {
            "messages": [
                {"role": "user", "content": r["prompt"]},
                {"role": "assistant", "content": r["completion"]},
            ]
        }
        for r in addition_rows(24, seed=5)
    ]
    (tmp_path / "chat.jsonl").write_bytes(jsonl(chat))
    (tmp_path / "prefs.jsonl").write_bytes(jsonl(preference_rows(16, seed=2)))
    env = {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "OPENAI_BASE_URL": f"{stack.url}/v1",
        "OPENAI_API_KEY": headers["Authorization"].removeprefix("Bearer "),
    }
    args = ["--model", "tiny-llama", "--train", str(tmp_path / "chat.jsonl")]
    args += ["--preferences", str(tmp_path / "prefs.jsonl")]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + stack.tail_logs(40)
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["paused"] == "paused"
    assert summary["status"] == "succeeded"
    assert summary["fine_tuned_model"].startswith("ft:tiny-llama:script-team:script:")
    hp = summary["hyperparameters"]
    assert hp["n_epochs"] == 3 and hp["batch_size"] == 4 and hp["learning_rate_multiplier"] == 1
    assert summary["events"] > 10 and "succeeded" in summary["last_event"]  # paged past 10
    assert {"step", "train_loss", "train_mean_token_accuracy", "valid_loss"} <= set(
        summary["results_columns"]
    )
    # 3 epochs of 23 rows (one held out for validation), 4 per micro-batch, 4 micro-batches per
    # step (the default gradient accumulation): 2 steps an epoch
    assert summary["results_steps"] == 6
    assert summary["first_train_loss"] > 0 and summary["last_train_loss"] > 0
    # a checkpoint at the end of each epoch but the last, named like OpenAI's
    assert summary["checkpoint_steps"] == [2, 4]
    assert summary["checkpoint_model"].endswith(":ckpt-step-4")
    assert summary["listed_by_metadata"] is True
    assert summary["dpo_status"] == "succeeded" and summary["dpo_beta"] == 0.1
    assert summary["errors"] == {
        "not_found": "not_found",
        "bad_request": "method.supervised.hyperparameters.n_epochs",
        "conflict": "job_not_cancellable",
        "authentication": "invalid_api_key",
    }
    assert summary["deleted"] is True and summary["gone"] is True
