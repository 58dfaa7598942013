"""Fault classes of a run: what is retried, what requeues the job, what fails it for good.

* Transient (the store's 5xx, timeouts and resets; a dropped database connection or a
  serialization failure; the broker down): retried with bounded exponential backoff inside the
  attempt; when the budget runs out the job goes back to `queued` (counting the attempt).
* Permanent: the job fails at once with a stable `code` and a message a tenant can act on. The
  message never carries paths, exception text or stack traces: those go to the worker's log
  with the job id. The codes are documented in docs/errors.md.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")

# code -> the message a tenant sees
PUBLIC_MESSAGES: dict[str, str] = {
    "base_model_unavailable": "The base model is no longer registered or could not be read; "
    "ask the operators to register it again, then create a new job.",
    "source_model_unavailable": "The fine-tuned model or checkpoint this job continues from "
    "was deleted before the job could read it; create a new job from another model.",
    "training_file_missing": "The training file was deleted before the job could read it; "
    "upload it again and create a new job.",
    "validation_file_missing": "The validation file was deleted before the job could read it; "
    "upload it again and create a new job.",
    "invalid_training_data": "The training data cannot be trained on: {detail}",
    "invalid_spec": "The base model cannot take these settings: {detail}",
    "out_of_memory": "The job ran out of memory on its worker; lower batch_size or "
    "max_seq_length (see POST /v1/estimates) and create a new job.",
    "internal_error": "An internal error stopped the job; the operators have the details "
    "(quote the job id).",
    "transient_retries_exhausted": "A dependency (object store, database or broker) stayed "
    "unavailable on every attempt; create the job again once the service is healthy.",
    "max_attempts_exceeded": "The job's worker stopped responding on every attempt.",
}


class JobFault(Exception):
    """A permanent fault with a stable code and a tenant-safe message."""

    def __init__(self, code: str, detail: str = "") -> None:
        self.code = code
        template = PUBLIC_MESSAGES[code]
        self.public_message = template.format(detail=detail) if "{detail}" in template else template
        super().__init__(f"{code}: {self.public_message}")


class TransientFault(Exception):
    """A transient fault whose retry budget ran out."""


@dataclass(frozen=True)
class Classified:
    transient: bool
    code: str
    message: str


def is_transient(exc: BaseException) -> bool:
    """Connection-level trouble with the store, the database or the broker."""
    if isinstance(exc, TransientFault):
        return True
    from shared.storage import StoreUnavailable

    if isinstance(exc, StoreUnavailable | ConnectionError | TimeoutError):
        return True
    from sqlalchemy import exc as sa_exc

    if isinstance(exc, sa_exc.DBAPIError):
        if exc.connection_invalidated or isinstance(exc, sa_exc.OperationalError):
            return True
        sqlstate = getattr(exc.orig, "sqlstate", None)
        return sqlstate in {"40001", "40P01"}  # serialization failure, deadlock
    if isinstance(exc, sa_exc.InterfaceError | sa_exc.TimeoutError | sa_exc.DisconnectionError):
        return True
    import redis.exceptions as redis_exc

    if isinstance(exc, redis_exc.ConnectionError | redis_exc.TimeoutError):
        return True
    from kombu.exceptions import OperationalError as KombuOperationalError

    if isinstance(exc, KombuOperationalError):
        return True
    from botocore.exceptions import ConnectionError as BotoConnectionError
    from botocore.exceptions import ReadTimeoutError

    return isinstance(exc, BotoConnectionError | ReadTimeoutError)


def is_out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    try:
        import torch
    except ImportError:  # the API image has no torch
        return False
    return isinstance(exc, torch.OutOfMemoryError)


def classify(exc: BaseException) -> Classified:
    """Which class a run's exception belongs to, and what the tenant is told."""
    if isinstance(exc, JobFault):
        return Classified(False, exc.code, exc.public_message)
    if is_transient(exc):
        code = "transient_retries_exhausted"
        return Classified(True, code, PUBLIC_MESSAGES[code])
    if is_out_of_memory(exc):
        return Classified(False, "out_of_memory", PUBLIC_MESSAGES["out_of_memory"])
    return Classified(False, "internal_error", PUBLIC_MESSAGES["internal_error"])


def retry_transient(
    fn: Callable[[], T],
    *,
    what: str,
    budget_s: float,
    first_delay_s: float = 0.5,
    max_delay_s: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
    should_give_up: Callable[[], bool] = lambda: False,
    progress: Callable[[], int] | None = None,
) -> T:
    """Call `fn`; on a transient fault, back off exponentially (with jitter) and retry until
    `budget_s` is spent, then raise TransientFault. Other exceptions propagate at once.

    With `progress` (a count that grows as the work advances, e.g. objects landed by a resumable
    upload), `budget_s` is time *without progress*: a try that failed after moving the work
    forward starts the deadline and the backoff over. A store that fails every request still
    runs the budget out; one that fails half of them no longer abandons an upload that keeps
    advancing (a checkpoint of seven files needs several tries there). The work is finite (a
    landed object is not sent again), so the tries stay bounded."""
    deadline = time.monotonic() + budget_s
    delay = first_delay_s
    attempt = 1
    seen = progress() if progress else 0
    while True:
        try:
            return fn()
        except Exception as exc:
            if not is_transient(exc) or isinstance(exc, TransientFault):
                raise
            if progress is not None and (now := progress()) > seen:
                seen = now
                deadline = time.monotonic() + budget_s
                delay = first_delay_s
            left = deadline - time.monotonic()
            if left <= 0 or should_give_up():
                raise TransientFault(f"{what}: still failing after {attempt} tries") from exc
            pause = min(delay * (0.5 + random.random()), max_delay_s, left)
            log.warning(
                "%s failed (%s: %s, try %d); retrying in %.1fs",
                what,
                type(exc).__name__,
                str(exc)[:300],
                attempt,
                pause,
            )
            sleep(pause)
            delay = min(delay * 2, max_delay_s)
            attempt += 1
