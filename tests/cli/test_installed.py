"""The installed `qlora` command (the entry point pip wrote next to this interpreter), run as a
user runs it, against the real service: a uvicorn API, the beat and a Celery worker on
Postgres, Redis and moto's S3 server, training the tiny model.

`jobs watch` runs in a pseudo-terminal, so rich draws its live bar; its connection goes
through a fault proxy that resets it mid-job, so the Last-Event-ID resume is exercised too."""

from __future__ import annotations

import json
import re
import select
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from qlora_cli.exit_codes import ExitCode
from tests.cli.terminal import TerminalRun, run_in_terminal
from tests.faultproxy import FaultProxy
from tests.harness import free_port, inherited_env, jsonl
from tests.jobs.conftest import ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]

QLORA = Path(sys.executable).with_name("qlora")
# FAST_SPEC (tests/harness/stack.py) as `jobs create` flags.
FAST_FLAGS = [
    "--model", "tiny-llama", "--batch-size", "4", "--max-seq-length", "64",
    "--qlora", "gradient_accumulation_steps=1", "--qlora", "checkpoint_steps=4",
    "--qlora", "compute_dtype=float32", "--qlora", "validation_fraction=0.1",
    "--qlora", "learning_rate=0.002",
]  # fmt: skip
EVENT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ (.*?)\s*$")


def qlora(
    env: dict[str, str], *args: str, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    assert QLORA.exists(), f"{QLORA} is missing: pip install -e '.[dev,worker]'"
    return subprocess.run(
        [str(QLORA), *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def ok(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, f"{result.args}: {result.returncode}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def worker(stack: ServiceStack) -> Any:
    proc = stack.start_worker()
    yield
    stop(proc)


@pytest.fixture(scope="module")
def key(stack: ServiceStack) -> str:
    return stack.new_tenant("cli")["Authorization"].removeprefix("Bearer ")


@pytest.fixture(scope="module")
def env(stack: ServiceStack, key: str, worker: None) -> dict[str, str]:
    """The CLI's environment. The worker starts first: it boots while the first tests run."""
    return inherited_env(QLORA_API_URL=stack.url, QLORA_API_KEY=key)


@pytest.fixture(scope="module")
def training_file(env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_bytes(jsonl(addition_rows(96, seed=3)))
    uploaded = json.loads(ok(qlora(env, "files", "upload", str(path), "--json")).stdout)
    assert uploaded["rows"] == 96 and uploaded["format"] == "prompt_completion"
    return str(uploaded["id"])


@pytest.fixture(scope="module")
def watched(
    stack: ServiceStack, worker: None, env: dict[str, str], key: str, training_file: str
) -> dict[str, Any]:
    """A job created with the CLI and watched to its end in a terminal, through a proxy that
    resets the stream once its first event is on screen."""
    created = ok(
        qlora(env, "jobs", "create", *FAST_FLAGS, "--training-file", training_file,
              "--max-steps", "12", "--suffix", "cli", "--json")
    )  # fmt: skip
    job_id = json.loads(created.stdout)["id"]
    host, port = stack.url.removeprefix("http://").split(":")
    proxy = FaultProxy((host, int(port)), seed=5).start()
    resets: list[float] = []

    def cut_once_streaming(text: str) -> None:
        if not resets and any(EVENT_LINE.match(line) for line in text.splitlines()):
            proxy.set_mode("reset", times=1)  # this connection, and the next one
            resets.append(time.monotonic())

    try:
        run = run_in_terminal(
            [str(QLORA), "jobs", "watch", job_id],
            {**env, "QLORA_API_URL": proxy.url},
            timeout=240,
            on_output=cut_once_streaming,
        )
    finally:
        proxy.stop()
    headers = {"Authorization": f"Bearer {key}"}
    return {
        "job": stack.job(headers, job_id),
        "events": stack.events(headers, job_id),
        "run": run,
        "resets": resets,
    }


def test_a_bad_file_is_refused_line_by_line(env: dict[str, str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "completion": "2"}\n{"prompt": \n\n{"text": 5}\n')
    result = qlora(env, "files", "upload", str(bad))
    assert result.returncode == ExitCode.ERROR, result.stderr
    lines = result.stderr.splitlines()
    assert lines[0].startswith("error: invalid request (400 invalid_file, param file): "), lines
    assert lines[1].startswith("  line 2: ") and lines[2].startswith("  line 4: "), lines
    assert len(lines) == 3 and result.stdout == ""


def test_watch_draws_a_live_bar_resumes_after_a_reset_and_exits_0(
    watched: dict[str, Any],
) -> None:
    run: TerminalRun = watched["run"]
    job, events = watched["job"], watched["events"]
    assert job["status"] == "succeeded", json.dumps(job)
    assert run.returncode == ExitCode.OK, run.text[-3000:]
    text = run.text
    # rich drew a live bar (cursor moves and a bar glyph) with each of its fields.
    assert "\x1b[" in run.raw and "━" in text
    bar_lines = [line for line in text.splitlines() if "step " in line and "tok/s" in line]
    assert any("step 12/12" in line for line in bar_lines), bar_lines[-3:]
    assert any(re.search(r"loss \d+\.\d{4}", line) for line in bar_lines)
    assert any(re.search(r"ETA \d+:\d\d", line) for line in bar_lines)
    assert len({line for line in bar_lines}) > 2  # it moved
    assert f"succeeded: {job['fine_tuned_model']}" in text
    # The proxy cut the stream after the first event: the CLI reconnected with Last-Event-ID
    # and printed every event of the job exactly once.
    assert watched["resets"] and "reconnecting" in text
    printed = Counter(
        m.group(1) for line in text.splitlines() if (m := EVENT_LINE.match(line)) is not None
    )
    stored = Counter(
        e["message"] for e in events if not (e["type"] == "metrics" and "loss" in (e["data"] or {}))
    )
    assert printed == stored


def test_the_downloaded_adapter_loads_with_peft(
    watched: dict[str, Any], env: dict[str, str], base_model_dir: Path, tmp_path: Path
) -> None:
    adapter_id = watched["job"]["adapter_id"]
    out = tmp_path / "adapter"
    result = ok(qlora(env, "adapters", "download", adapter_id, "--out", str(out)))
    assert f"unpacked {adapter_id}" in result.stdout
    import torch
    from peft import PeftModel, get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_model_dir, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(out))
    saved = load_file(out / "adapter_model.safetensors")
    loaded = get_peft_model_state_dict(model)
    assert saved.keys() == loaded.keys()
    assert all(torch.equal(saved[k], loaded[k]) for k in saved)
    lora_b = [k for k in saved if "lora_B" in k]
    assert lora_b and all(saved[k].abs().sum() > 0 for k in lora_b)  # trained away from 0


def test_json_output_parses_and_lists_agree(
    watched: dict[str, Any], env: dict[str, str], training_file: str
) -> None:
    job = watched["job"]
    got = json.loads(ok(qlora(env, "--json", "jobs", "get", job["id"])).stdout)
    assert got["status"] == "succeeded" and got["adapter_id"] == job["adapter_id"]
    listed = json.loads(ok(qlora(env, "jobs", "list", "--status", "succeeded", "--json")).stdout)
    assert job["id"] in [j["id"] for j in listed["data"]]
    models = json.loads(ok(qlora(env, "models", "list", "--json")).stdout)
    assert job["fine_tuned_model"] in [m["id"] for m in models["data"]]
    checkpoints = json.loads(ok(qlora(env, "jobs", "checkpoints", job["id"], "--json")).stdout)
    assert checkpoints["data"] and checkpoints["data"][0]["fine_tuning_job_id"] == job["id"]
    estimate = json.loads(
        ok(qlora(env, "estimate", "--model", "tiny-llama", "--training-file", training_file,
                 "--rank", "8", "--batch-size", "4", "--json")).stdout
    )  # fmt: skip
    assert estimate["fits"] is True and estimate["qlora"]["rank"] == 8
    table = ok(qlora(env, "files", "list")).stdout
    assert training_file in table


def test_watch_of_a_cancelled_job_exits_with_the_cancelled_code(
    stack: ServiceStack, worker: None, env: dict[str, str], key: str, training_file: str
) -> None:
    created = ok(
        qlora(env, "jobs", "create", *FAST_FLAGS, "--training-file", training_file,
              "--max-steps", "100000", "--json")
    )  # fmt: skip
    job_id = json.loads(created.stdout)["id"]
    watcher = subprocess.Popen(
        [str(QLORA), "jobs", "watch", job_id],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert watcher.stderr is not None
        # The watcher prints each event as it comes: wait for it to be following the job.
        ready, _, _ = select.select([watcher.stderr], [], [], 60)
        assert ready, "the watcher printed nothing"
        stack.wait_for(
            {"Authorization": f"Bearer {key}"}, job_id, lambda j: j["status"] == "running"
        )
        assert job_id in ok(qlora(env, "jobs", "cancel", job_id)).stdout
        out, err = watcher.communicate(timeout=90)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.wait()
    assert watcher.returncode == ExitCode.JOB_CANCELLED, err
    assert "cancelled" in out


def test_api_errors_and_an_unreachable_service(
    watched: dict[str, Any], env: dict[str, str], key: str
) -> None:
    wrong = qlora({**env, "QLORA_API_KEY": "qlsk-not-a-real-key"}, "jobs", "list")
    assert wrong.returncode == ExitCode.ERROR
    assert wrong.stderr.startswith("error: not authenticated (401 invalid_api_key)")
    assert "qlsk-not-a-real-key" not in wrong.stdout + wrong.stderr
    missing = qlora(env, "jobs", "get", "ftjob-nope")
    assert missing.returncode == ExitCode.ERROR
    assert missing.stderr.startswith("error: not found (404 not_found, param fine_tuning_job_id)")
    finished = qlora(env, "jobs", "cancel", watched["job"]["id"])
    assert finished.returncode == ExitCode.ERROR
    assert finished.stderr.startswith("error: conflict (409 job_not_cancellable")
    assert key not in finished.stdout + finished.stderr
    down = qlora({**env, "QLORA_API_URL": f"http://127.0.0.1:{free_port()}"}, "jobs", "list")
    assert down.returncode == ExitCode.UNREACHABLE
    assert "connection refused" in down.stderr
