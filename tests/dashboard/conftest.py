"""The dashboard's browser tests run against the same real stack as the jobs tests."""

from tests.jobs.conftest import base_model_dir, stack, start_stack

__all__ = ["base_model_dir", "stack", "start_stack"]
