"""Experiment tracking: a job's metrics sent to Weights & Biases and MLflow (OpenAI's
`integrations`, plus MLflow for self-hosting teams). See docs/integrations.md.

`RunTracking` is built from the job's stored `integrations` and the worker's settings; the
runner calls `start` before training, `log_step` / `log_eval` from the engine's hooks and
`finish` with the attempt's outcome. `wandb` and `mlflow` are imported only when a job asks
for them. Tracking never fails a job: an integration that raises is logged, reported once
through `on_failure` (a warning event on the job) and switched off for the rest of the attempt.

One job is one tracked run across attempts, pauses and resumes: the W&B run id is the job id
(`resume="allow"`), and the MLflow run is found again by its `qlora.job_id` tag. A resumed
attempt repeats the steps since its checkpoint; W&B keeps the first value of a step, MLflow
records both.
"""

from __future__ import annotations

import logging
import math
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shared.config import Settings

log = logging.getLogger("worker.tracking")

# StepMetrics fields under the names OpenAI's results file and W&B integration use.
STEP_NAMES = {
    "loss": "train_loss",
    "lr": "learning_rate",
    "mean_token_accuracy": "train_mean_token_accuracy",
}
SKIPPED = frozenset({"step", "total_steps", "eta_seconds", "pairs"})
# A DPO step's `preference` figures (PreferenceMetrics), flattened.
PREFERENCE_NAMES = {
    "loss": "train_dpo_loss",
    "reward_margin": "train_reward_margin",
    "chosen_reward": "train_chosen_reward",
    "rejected_reward": "train_rejected_reward",
    "accuracy": "train_preference_accuracy",
}
MLFLOW_FLUSH_SECONDS = 2.0
MLFLOW_BATCH = 500  # metrics per log_batch call (MLflow's own limit is 1000)
MLFLOW_DEFAULT_EXPERIMENT = "qlora"
JOB_TAG = "qlora.job_id"


@dataclass(frozen=True)
class TrackedRun:
    """What every integration records about the run besides its metrics."""

    job_id: str
    model: str
    config: dict[str, Any]


def step_metrics(values: Mapping[str, Any]) -> dict[str, float]:
    """A step's metrics (`asdict(StepMetrics)`) as tracked: renamed, finite numbers only."""
    out: dict[str, float] = {}
    for key, value in values.items():
        if key == "preference" and isinstance(value, Mapping):
            flat = {PREFERENCE_NAMES.get(str(k), str(k)): v for k, v in value.items()}
            out.update(step_metrics(flat))
            continue
        if key in SKIPPED or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        if math.isfinite(value):
            out[STEP_NAMES.get(key, key)] = float(value)
    return out


class Tracker(ABC):
    label: str

    @abstractmethod
    def start(self, run: TrackedRun) -> None: ...

    @abstractmethod
    def log(self, metrics: dict[str, float], step: int) -> None: ...

    @abstractmethod
    def finish(self, outcome: str) -> None: ...


class WandbTracker(Tracker):
    label = "Weights & Biases"

    def __init__(self, options: Mapping[str, Any], settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.run: Any = None

    def start(self, run: TrackedRun) -> None:
        import wandb

        tags = [*(self.options.get("tags") or []), run.job_id]
        self.run = wandb.init(
            project=self.options["project"],
            entity=self.options.get("entity"),
            name=self.options.get("name") or run.job_id,
            tags=list(dict.fromkeys(tags)),
            config={"job_id": run.job_id, "model": run.model, **run.config},
            id=run.job_id,
            resume="allow",
            reinit="create_new",
            settings=wandb.Settings(
                mode=self.settings.wandb_mode or "online",
                api_key=self.settings.wandb_api_key,
                console="off",
                silent=True,
                save_code=False,
                disable_git=True,
                x_disable_stats=True,
                init_timeout=60,
            ),
        )

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def finish(self, outcome: str) -> None:
        if self.run is not None:
            self.run.finish(exit_code=0 if outcome in ("succeeded", "paused", "preempted") else 1)
            self.run = None


class MlflowTracker(Tracker):
    label = "MLflow"

    def __init__(self, options: Mapping[str, Any], settings: Settings) -> None:
        self.options = options
        self.uri = settings.mlflow_tracking_uri
        self.client: Any = None
        self.run_id: str | None = None
        self.pending: list[Any] = []
        self.last_flush = time.monotonic()

    def _experiment_id(self, name: str) -> str:
        from mlflow.exceptions import MlflowException

        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return str(found.experiment_id)
        try:
            return str(self.client.create_experiment(name))
        except MlflowException:  # another worker created it meanwhile
            return str(self.client.get_experiment_by_name(name).experiment_id)

    def start(self, run: TrackedRun) -> None:
        from mlflow.entities import Param
        from mlflow.tracking import MlflowClient

        self.client = MlflowClient(tracking_uri=self.uri)
        experiment = self._experiment_id(
            self.options.get("experiment") or MLFLOW_DEFAULT_EXPERIMENT
        )
        earlier = self.client.search_runs(
            [experiment], filter_string=f"tags.`{JOB_TAG}` = '{run.job_id}'", max_results=1
        )
        if earlier:
            self.run_id = str(earlier[0].info.run_id)
            self.client.update_run(self.run_id, status="RUNNING")
            return
        created = self.client.create_run(
            experiment,
            run_name=self.options.get("run_name") or run.job_id,
            tags={JOB_TAG: run.job_id, "qlora.model": run.model},
        )
        self.run_id = str(created.info.run_id)
        params = [Param(k, str(v)[:6000]) for k, v in sorted(run.config.items())]
        for i in range(0, len(params), 100):
            self.client.log_batch(self.run_id, params=params[i : i + 100])

    def log(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.pending += [Metric(k, v, now, step) for k, v in metrics.items()]
        if time.monotonic() - self.last_flush >= MLFLOW_FLUSH_SECONDS:
            self._flush()

    def _flush(self) -> None:
        while self.pending:
            batch, self.pending = self.pending[:MLFLOW_BATCH], self.pending[MLFLOW_BATCH:]
            self.client.log_batch(self.run_id, metrics=batch)
        self.last_flush = time.monotonic()

    def finish(self, outcome: str) -> None:
        if self.run_id is None:
            return
        self._flush()
        status = {"succeeded": "FINISHED", "cancelled": "KILLED", "failed": "FAILED"}
        if outcome in status:
            self.client.set_terminated(self.run_id, status=status[outcome])
        else:  # paused, preempted, requeued: the next attempt continues the run
            self.client.update_run(self.run_id, status="SCHEDULED")
        self.run_id = None


TRACKERS: dict[str, type[WandbTracker] | type[MlflowTracker]] = {
    "wandb": WandbTracker,
    "mlflow": MlflowTracker,
}


class RunTracking:
    """The integrations of one attempt; every call is guarded (see the module docstring)."""

    def __init__(
        self,
        integrations: list[dict[str, Any]],
        settings: Settings,
        on_failure: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.on_failure = on_failure
        self.trackers: list[Tracker] = []
        for item in integrations:
            kind = item.get("type")
            if kind in TRACKERS:
                self.trackers.append(TRACKERS[kind](item.get(kind) or {}, settings))

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def _each(self, what: str, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.trackers):
            try:
                call(tracker)
            except Exception as exc:
                log.warning("%s tracking failed on %s", tracker.label, what, exc_info=True)
                self.trackers.remove(tracker)
                try:
                    self.on_failure(
                        f"{tracker.label} logging stopped after an error on {what} "
                        f"({type(exc).__name__}); training continues without it"
                    )
                except Exception:
                    log.warning("could not report the tracking failure", exc_info=True)

    def start(self, run: TrackedRun) -> None:
        self._each("start", lambda t: t.start(run))

    def log_step(self, values: Mapping[str, Any]) -> None:
        """After an optimizer step: `values` is `asdict(StepMetrics)`."""
        metrics, step = step_metrics(values), int(values["step"])
        self._each("log", lambda t: t.log(metrics, step))

    def log_eval(
        self, step: int, eval_loss: float, perplexity: float, accuracy: float | None = None
    ) -> None:
        metrics = step_metrics(
            {
                "valid_loss": eval_loss,
                "valid_perplexity": perplexity,
                "valid_mean_token_accuracy": accuracy,
            }
        )
        if metrics:
            self._each("log", lambda t: t.log(metrics, step))

    def log(self, step: int, values: Mapping[str, Any]) -> None:
        """Figures already under their tracked names (e.g. a DPO evaluation's)."""
        metrics = step_metrics(values)
        if metrics:
            self._each("log", lambda t: t.log(metrics, step))

    def finish(self, outcome: str) -> None:
        self._each("finish", lambda t: t.finish(outcome))
