"""`python -m worker.prestart`: the worker side's one-time set-up on the embedded default.

Builds the tiny local base model (no network) and registers it as `tiny-llama` when
`REGISTER_TINY_MODEL` is on. It lives with the worker because building a model needs torch,
which the API image does not carry.
"""

from __future__ import annotations

import logging

from shared.config import Settings, get_settings
from shared.db import session_scope
from shared.tenancy import service as tenancy

log = logging.getLogger("worker.prestart")
TINY_MODEL_NAME = "tiny-llama"


def ensure_tiny_model(settings: Settings) -> None:
    """Build the tiny local base model once and register it as `tiny-llama`."""
    from worker.training.tiny import build_tiny_model

    assert settings.models_dir is not None
    folder = settings.models_dir.resolve() / TINY_MODEL_NAME
    if not (folder / "config.json").is_file():
        log.info("building the tiny base model in %s", folder)
        build_tiny_model(folder)
    with session_scope(settings) as session:
        tenancy.ensure_model(session, name=TINY_MODEL_NAME, source=str(folder))


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    settings = get_settings()
    if settings.register_tiny_model:
        ensure_tiny_model(settings)


if __name__ == "__main__":
    main()
