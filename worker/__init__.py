"""The GPU worker: Celery tasks (`worker.tasks`) around the training engine (`worker.training`).

Importing the package sets one process-wide default before anything imports torch:
`THP_MEM_ALLOC_ENABLE=1`, torch's switch for advising transparent huge pages for its large
CPU tensors. Without it, a tensor above glibc's mmap threshold (which never exceeds 32 MiB:
a [tokens, hidden] activation, its gradient) is a fresh mapping, faulted in 4 KiB page by
page and handed back on free:
on the 2-core bench machine a [4096, 2816] fp32 multiply took 26-31 ms that way and 10-11
ms with it, and a CPU training step spent about a fifth of its CPU time in the kernel. It
changes nothing on a GPU's memory. An operator's own value (`THP_MEM_ALLOC_ENABLE=0`)
wins. See docs/training.md, "CPU memory".
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
