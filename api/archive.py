"""Stream a store prefix (a checkpoint or adapter folder) to the client as a .tar.gz."""

from __future__ import annotations

import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from fastapi.responses import StreamingResponse

from shared.errors import NotFound
from shared.storage import ObjectStore

CHUNK = 1024 * 1024


def stream_prefix_as_tar(store: ObjectStore, prefix: str, name: str) -> StreamingResponse:
    """Objects are fetched to a temporary folder and packed into a spooled archive, so memory
    stays bounded; the archive is deleted once sent."""
    workdir = Path(tempfile.mkdtemp(prefix="qlora-archive-"))
    try:
        files = store.download_prefix(prefix, workdir / name)
        if not files:
            raise NotFound("nothing is stored for this object", code="not_found")
        archive = workdir / f"{name}.tar.gz"
        with tarfile.open(archive, "w:gz") as tar:
            for path in sorted(files):
                tar.add(path, arcname=str(path.relative_to(workdir)))
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise

    def body() -> Iterator[bytes]:
        try:
            with archive.open("rb") as fh:
                while chunk := fh.read(CHUNK):
                    yield chunk
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    return StreamingResponse(
        body(),
        media_type="application/gzip",
        headers={
            "Content-Disposition": f'attachment; filename="{name}.tar.gz"',
            "Content-Length": str(archive.stat().st_size),
        },
    )
