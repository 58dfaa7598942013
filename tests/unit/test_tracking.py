"""worker/tracking.py without a service: metric names, and that a failing integration is
reported once and switched off while the others keep logging (it never raises)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from shared.config import Settings
from worker import tracking
from worker.tracking import RunTracking, TrackedRun, Tracker, step_metrics


class Recording(Tracker):
    label = "Recording"
    calls: list[tuple[str, Any]] = []

    def __init__(self, options: dict[str, Any], settings: Settings) -> None:
        self.options = options

    def start(self, run: TrackedRun) -> None:
        self.calls.append(("start", run.job_id))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.calls.append(("log", (step, metrics)))

    def finish(self, outcome: str) -> None:
        self.calls.append(("finish", outcome))


class Broken(Recording):
    label = "Broken"

    def log(self, metrics: dict[str, float], step: int) -> None:
        raise ConnectionError("secret-host:443 refused")


def test_step_metrics_take_openai_names_and_drop_non_finite_figures() -> None:
    metrics = {  # asdict(StepMetrics(...)), without importing the engine (torch)
        "step": 3,
        "total_steps": 9,
        "loss": 1.5,
        "lr": 2e-4,
        "grad_norm": float("nan"),
        "tokens_per_second": 100.0,
        "eta_seconds": 4.0,
        "mean_token_accuracy": 0.25,
        "preference": None,
        "compute_dtype": "float32",
    }
    assert step_metrics(metrics) == {
        "train_loss": 1.5,
        "learning_rate": 2e-4,
        "tokens_per_second": 100.0,
        "train_mean_token_accuracy": 0.25,
    }
    dpo = {**metrics, "preference": {"loss": 0.6, "reward_margin": 0.2, "accuracy": 0.75}}
    assert step_metrics(dpo) == {
        **step_metrics(metrics),
        "train_dpo_loss": 0.6,
        "train_reward_margin": 0.2,
        "train_preference_accuracy": 0.75,
    }


def test_a_failing_integration_is_reported_once_and_the_others_keep_logging(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(tracking.TRACKERS, "wandb", Recording)
    monkeypatch.setitem(tracking.TRACKERS, "mlflow", Broken)
    Recording.calls = []
    failures: list[str] = []
    run = RunTracking(
        [{"type": "wandb", "wandb": {"project": "p"}}, {"type": "mlflow", "mlflow": {}}],
        Settings(var_dir=tmp_path),
        on_failure=failures.append,
    )
    run.start(TrackedRun(job_id="ftjob-x", model="tiny", config={}))
    for step in (1, 2):
        run.log_step({"step": step, "total_steps": 2, "loss": 1.0 / step})
    run.log_eval(2, 0.5, 1.6, None)
    run.finish("succeeded")
    assert failures == [
        "MLflow logging stopped after an error on log (ConnectionError); training continues "
        "without it".replace("MLflow", "Broken")
    ]
    assert "secret-host" not in failures[0]
    recorded = [c for c in Recording.calls if c[0] == "log"]
    assert [step for _, (step, _) in recorded] == [1, 2, 2]  # the Recording tracker's only
    assert recorded[-1][1][1] == {"valid_loss": 0.5, "valid_perplexity": 1.6}
    assert Recording.calls[-1] == ("finish", "succeeded")
    assert Recording.calls.count(("start", "ftjob-x")) == 2  # one per tracker instance


def test_missing_libraries_or_settings_fail_softly(tmp_path: Path) -> None:
    """An MLflow URI the client refuses: reported, not raised."""
    failures: list[str] = []
    run = RunTracking(
        [{"type": "mlflow", "mlflow": {"experiment": "e"}}],
        Settings(var_dir=tmp_path, mlflow_tracking_uri="unknown-scheme://nowhere"),
        on_failure=failures.append,
    )
    run.start(TrackedRun(job_id="ftjob-y", model="tiny", config={"rank": 16}))
    run.log_step({"step": 1, "loss": 1.0})
    run.finish("failed")
    assert len(failures) == 1 and failures[0].startswith("MLflow logging stopped")
    assert not run
