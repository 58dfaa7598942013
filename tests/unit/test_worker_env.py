"""Process-wide defaults the worker package sets before torch is imported."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
THP_MODE = Path("/sys/kernel/mm/transparent_hugepage/enabled")
# page faults while a fresh 64 MiB CPU tensor is filled: 16,384 with 4 KiB pages, about 32
# with 2 MiB huge pages
PROBE = (
    "import resource, worker, torch; "
    "before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt; "
    "torch.empty(64 * 2**20, dtype=torch.uint8).fill_(1); "
    "print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)"
)

pytestmark = pytest.mark.skipif(
    not THP_MODE.exists() or "[madvise]" not in THP_MODE.read_text(),
    reason="transparent huge pages are not in madvise mode here (always: every process "
    "gets them; never: none can)",
)


def _page_faults(**env: str) -> int:
    base = {k: v for k, v in os.environ.items() if k != "THP_MEM_ALLOC_ENABLE"}
    proc = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        env={**base, "PYTHONPATH": str(ROOT), **env},
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    return int(proc.stdout.strip())


def test_importing_the_worker_backs_large_cpu_tensors_with_huge_pages() -> None:
    """`THP_MEM_ALLOC_ENABLE=1` makes torch advise huge pages for large CPU tensors."""
    assert _page_faults() < 2048


def test_an_operator_can_turn_it_off() -> None:
    assert _page_faults(THP_MEM_ALLOC_ENABLE="0") > 8192
