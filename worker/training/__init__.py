"""The QLoRA training engine: `train(spec, dataset_path, output_dir, hooks) -> TrainResult`.

No queue, database or object store here; the Celery task and the CLI both wrap `train`.
"""

from worker.training.checkpoint import CheckpointError
from worker.training.data import DataError
from worker.training.hooks import SpecError, StepMetrics, StopRequest, TrainHooks, TrainResult
from worker.training.loop import train

__all__ = [
    "CheckpointError",
    "DataError",
    "SpecError",
    "StepMetrics",
    "StopRequest",
    "TrainHooks",
    "TrainResult",
    "train",
]
