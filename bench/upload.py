"""Upload benchmark: stream a generated JSONL file through `POST /v1/files` into a real API process.

Runs the API (`uvicorn api.main:app`, migrated first with `python -m api.prestart`) as a separate
process on two backends:

* ``embedded``: SQLite + the local folder store (the default configuration);
* ``s3``: SQLite + S3, where S3 is moto's standalone server in its own process, over HTTP.

For each it reports the upload throughput next to a plain ``shutil.copyfile`` of the same bytes
timed in the same run, and the API process's RSS before the upload, its peak during it and the
growth (target: under 64 MiB whatever the file size). The client streams the multipart body from
disk, so neither side should need memory proportional to the file.

    .venv/bin/python bench/upload.py                 # 1 GiB, both backends
    .venv/bin/python bench/upload.py --size-mib 64 --backend embedded

Exits non-zero when an upload fails or its result does not match the file; missing the RSS target
is reported but does not change the exit status.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import httpx

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python bench/upload.py` puts bench/ first, not the repo root
    sys.path.insert(0, str(ROOT))

from bench.common import proc_cpu  # noqa: E402
from tests.harness import (  # noqa: E402
    ADMIN_KEY,
    SIGNING_SECRET,
    MotoS3,
    StackError,
    free_port,
    inherited_env,
    log_tail,
    moto_server,
    running,
    wait_http,
)
from tests.harness.stack import api_args  # noqa: E402

MIB = 1024 * 1024
MB = 1000 * 1000
RSS_TARGET_BYTES = 64 * MIB
CLIENT_CHUNK = 256 * 1024
SAMPLE_INTERVAL_S = 0.005
WORDS = tuple(
    " ".join(
        (
            "the model adapter weights gradient token batch epoch loss learning rate schedule",
            "warmup dataset prompt completion answer question explain summarise translate café",
            "naïve — résumé 日本語 données über quantised nf4 lora rank alpha dropout checkpoint",
        )
    ).split()
)


class BenchError(RuntimeError):
    """An upload or a check of its result failed."""


# --------------------------------------------------------------------------- data


@dataclass
class Dataset:
    path: Path
    size: int
    rows: int
    sha256: str


def _sentence(rng: random.Random, min_words: int, max_words: int) -> str:
    words = rng.choices(WORDS, k=rng.randint(min_words, max_words))
    text = " ".join(words).capitalize()
    if rng.random() < 0.2:
        text += ' "quoted"\n\tand escaped \\ text'
    return text + "."


def generate_jsonl(path: Path, size: int, seed: int = 0) -> Dataset:
    """Write valid prompt/completion rows of varying length (~60 B to ~8 KiB) up to `size` bytes."""
    rng = random.Random(seed)
    pool = []
    for _ in range(4096):
        row = {
            "prompt": _sentence(rng, 3, 80),
            "completion": _sentence(rng, 5, rng.choice((40, 200, 900))),
        }
        pool.append((json.dumps(row, ensure_ascii=False) + "\n").encode())
    sha = hashlib.sha256()
    written = rows = 0
    with path.open("wb") as fh:
        full = False
        while not full:
            parts = []
            for line in rng.choices(pool, k=512):
                if written + len(line) > size:
                    full = True
                    break
                parts.append(line)
                written += len(line)
            data = b"".join(parts)
            fh.write(data)
            sha.update(data)
            rows += len(parts)
        # Top up with one short row so the file is exactly `size` bytes (when it fits one).
        rest = size - written
        filler_base = b'{"prompt": "", "completion": ""}\n'
        if rest >= len(filler_base) + 1:
            filler = b'{"prompt": "", "completion": "' + b"x" * (rest - len(filler_base)) + b'"}\n'
            fh.write(filler)
            sha.update(filler)
            rows += 1
            written += len(filler)
        # On disk before anything is timed, so no run pays for writing back the generated file.
        fh.flush()
        os.fsync(fh.fileno())
    return Dataset(path=path, size=written, rows=rows, sha256=sha.hexdigest())


def time_copy(src: Path, dst: Path, *, fsync: bool, repeats: int = 3) -> float:
    """Median seconds of `repeats` plain `shutil.copyfile` runs (optionally fsync'ed, as the
    folder store's commit is)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        shutil.copyfile(src, dst)
        if fsync:
            fd = os.open(dst, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        times.append(time.perf_counter() - start)
        dst.unlink()
    print(f"  copyfile{' + fsync' if fsync else ''}: {', '.join(f'{t:.2f}s' for t in times)}")
    return statistics.median(times)


# --------------------------------------------------------------------------- processes


@dataclass
class Api:
    proc: subprocess.Popen[bytes]
    base_url: str
    log: Path


@contextlib.contextmanager
def api_server(work: Path, extra_env: dict[str, str], max_upload: int) -> Iterator[Api]:
    """`python -m api.prestart`, then uvicorn, on the embedded default plus `extra_env`."""
    var_dir = work / "var"
    var_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = inherited_env(
        VAR_DIR=str(var_dir),
        ADMIN_API_KEY=ADMIN_KEY,
        SIGNING_SECRET=SIGNING_SECRET,
        MAX_UPLOAD_BYTES=str(max_upload),
        PUBLIC_BASE_URL=f"http://127.0.0.1:{port}",
        PORT=str(port),
        **extra_env,
    )
    log = work / "api.log"
    migrate = subprocess.run(
        [sys.executable, "-m", "api.prestart"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        check=False,
    )
    log.write_bytes(migrate.stdout)
    if migrate.returncode != 0:
        raise BenchError(f"python -m api.prestart failed:\n{log_tail(log)}")
    with running(api_args(port, quiet=True), env, log) as proc:
        base_url = f"http://127.0.0.1:{port}"
        wait_http(f"{base_url}/healthz", proc=proc, log=log)
        yield Api(proc=proc, base_url=base_url, log=log)


# --------------------------------------------------------------------------- RSS


def _status_kib(pid: int, field_name: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(field_name.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def rss_bytes(pid: int) -> int:
    kib = _status_kib(pid, "VmRSS")
    if kib is None:
        raise BenchError(f"cannot read VmRSS of pid {pid}")
    return kib * 1024


def reset_peak_rss(pid: int) -> bool:
    """Reset the kernel's VmHWM (peak RSS) of `pid` to its current RSS (Linux >= 4.0)."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


@dataclass
class RssSampler:
    """Polls VmRSS of `pid` in a thread; `peak` also takes the kernel's VmHWM when it was reset."""

    pid: int
    interval_s: float = SAMPLE_INTERVAL_S
    baseline: int = 0
    sampled_peak: int = 0
    samples: int = 0
    hwm_reset: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> RssSampler:
        self.baseline = rss_bytes(self.pid)
        self.sampled_peak = self.baseline
        self.hwm_reset = reset_peak_rss(self.pid)
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            kib = _status_kib(self.pid, "VmRSS")
            if kib is None:
                return
            self.samples += 1
            self.sampled_peak = max(self.sampled_peak, kib * 1024)
            self._stop.wait(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def peak(self) -> int:
        hwm = _status_kib(self.pid, "VmHWM") if self.hwm_reset else None
        return max(self.sampled_peak, hwm * 1024 if hwm is not None else 0)


# --------------------------------------------------------------------------- client


def multipart_parts(filename: str, boundary: str) -> tuple[bytes, bytes]:
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="purpose"\r\n\r\n'
        "fine-tune\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="file"; filename="{filename}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()
    return head, tail


def stream_body(path: Path, head: bytes, tail: bytes) -> Iterator[bytes]:
    """The multipart body, read from disk in chunks: never more than one chunk in memory."""
    yield head
    with path.open("rb") as fh:
        while chunk := fh.read(CLIENT_CHUNK):
            yield chunk
    yield tail


def until_committed(
    what: str, send: Callable[[], httpx.Response], expect: int, racy: int
) -> httpx.Response:
    """Send a setup request, retrying briefly while it answers `racy`.

    The API's request session (`api.deps.get_session`) is a FastAPI yield-dependency with the
    default "request" scope, so its `commit()` runs only after the response has been sent: a
    client that uses a new tenant or key right away can race the commit (404 / 401).
    """
    for attempt in range(50):
        resp = send()
        if resp.status_code != racy:
            break
        time.sleep(0.02 * (attempt + 1))
    else:
        raise BenchError(f"{what}: still {racy} after retries: {resp.text[:500]}")
    if attempt:
        print(f"  note: {what} answered {racy} {attempt}x before the commit landed", flush=True)
    if resp.status_code != expect:
        raise BenchError(f"{what}: {resp.status_code} {resp.text[:1000]}")
    return resp


def new_tenant(client: httpx.Client) -> tuple[str, dict[str, str]]:
    admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
    resp = client.post("/admin/tenants", json={"name": "bench"}, headers=admin)
    if resp.status_code != 201:
        raise BenchError(f"creating a tenant: {resp.status_code} {resp.text[:500]}")
    tenant_id: str = resp.json()["id"]
    resp = until_committed(
        "creating a key",
        lambda: client.post(f"/admin/tenants/{tenant_id}/keys", headers=admin),
        expect=201,
        racy=404,
    )
    return tenant_id, {"Authorization": f"Bearer {resp.json()['key']}"}


def upload(client: httpx.Client, auth: dict[str, str], path: Path) -> httpx.Response:
    boundary = "bench-" + uuid.uuid4().hex
    head, tail = multipart_parts(path.name, boundary)
    length = len(head) + path.stat().st_size + len(tail)
    headers = {
        **auth,
        "Content-Type": f"multipart/form-data; boundary={boundary}",
        "Content-Length": str(length),
    }
    return client.post("/v1/files", content=stream_body(path, head, tail), headers=headers)


# --------------------------------------------------------------------------- runs


@dataclass
class Result:
    backend: str
    seconds: float
    nbytes: int
    rss_baseline: int | None = None
    rss_peak: int | None = None
    rss_after: int | None = None
    api_cpu: float | None = None
    ok: bool = True
    error: str = ""

    @property
    def growth(self) -> int | None:
        if self.rss_baseline is None or self.rss_peak is None:
            return None
        return self.rss_peak - self.rss_baseline


def check_response(resp: httpx.Response, data: Dataset) -> dict[str, object]:
    if resp.status_code != 200:
        raise BenchError(f"upload answered {resp.status_code}: {resp.text[:1000]}")
    body: dict[str, object] = resp.json()
    expected = {
        "bytes": data.size,
        "rows": data.rows,
        "sha256": data.sha256,
        "purpose": "fine-tune",
    }
    wrong = {k: (body.get(k), v) for k, v in expected.items() if body.get(k) != v}
    if wrong:
        raise BenchError(f"the stored file does not match (got, expected): {wrong}")
    return body


def run_backend(backend: str, data: Dataset, work: Path) -> Result:
    work.mkdir(parents=True, exist_ok=True)
    max_upload = data.size + 16 * MIB
    with contextlib.ExitStack() as stack:
        extra: dict[str, str] = {}
        s3: MotoS3 | None = None
        bucket = ""
        if backend == "s3":
            s3 = stack.enter_context(moto_server(log=work / "moto.log"))
            bucket = s3.new_bucket("bench")
            extra = s3.env(bucket)
        api = stack.enter_context(api_server(work, extra, max_upload))
        timeout = httpx.Timeout(connect=10.0, read=1800.0, write=1800.0, pool=10.0)
        client = stack.enter_context(httpx.Client(base_url=api.base_url, timeout=timeout))
        tenant_id, auth = new_tenant(client)

        # Warm-up: a one-row upload first, so lazy imports and first-use allocations (the thread
        # pool, the S3 client's connection pool, ...) are part of the baseline, not the growth.
        warm = work / "warmup.jsonl"
        warm.write_bytes(b'{"prompt": "warm", "completion": "up"}\n')
        until_committed("warm-up upload", lambda: upload(client, auth, warm), expect=200, racy=401)

        pid = api.proc.pid
        cpu_before = proc_cpu(pid)
        moto_pid = s3.pid if s3 is not None else None
        moto_before = proc_cpu(moto_pid) if moto_pid else 0.0
        with RssSampler(pid) as sampler:
            start = time.perf_counter()
            try:
                resp = upload(client, auth, data.path)
            except httpx.HTTPError as exc:
                raise BenchError(
                    f"upload failed: {type(exc).__name__}: {exc}\n{log_tail(api.log)}"
                ) from exc
            seconds = time.perf_counter() - start
        api_cpu = proc_cpu(pid) - cpu_before
        moto_cpu = proc_cpu(moto_pid) - moto_before if moto_pid else None
        result = Result(
            backend=backend,
            seconds=seconds,
            nbytes=data.size,
            rss_baseline=sampler.baseline,
            rss_peak=sampler.peak,
            rss_after=rss_bytes(pid),
            api_cpu=api_cpu,
        )
        try:
            body = check_response(resp, data)
            key = f"files/{tenant_id}/{body['id']}.jsonl"
            if s3 is not None:
                stored = s3.object_size(bucket, key)
            else:
                stored = (work / "var" / "objects" / key).stat().st_size
            if stored != data.size:
                raise BenchError(f"the stored object holds {stored} bytes, not {data.size}")
        except (BenchError, OSError) as exc:
            result.ok, result.error = False, str(exc)
        print(
            f"  {backend}: {seconds:.2f}s wall, API process CPU {api_cpu:.2f}s"
            + (f", moto process CPU {moto_cpu:.2f}s" if moto_cpu is not None else "")
            + f", {sampler.samples} RSS samples, "
            f"VmHWM {'reset' if sampler.hwm_reset else 'unavailable'}",
            flush=True,
        )
        return result


# --------------------------------------------------------------------------- report


def fmt_mib(value: int | None) -> str:
    return "-" if value is None else f"{value / MIB:.1f} MiB"


def print_table(copy: Result, copy_fsync: Result, results: list[Result]) -> None:
    copy_rate = copy.nbytes / copy.seconds
    header = (
        "backend",
        "seconds",
        "MB/s",
        "vs copy",
        "RSS baseline",
        "RSS peak",
        "growth",
        "RSS after",
        "API CPU s",
        "<64 MiB",
    )
    rows = []
    for r in (copy, copy_fsync, *results):
        rate = r.nbytes / r.seconds
        growth = r.growth
        if not r.ok:
            verdict = "FAILED"
        elif growth is None:
            verdict = "-"
        else:
            verdict = "pass" if growth < RSS_TARGET_BYTES else "FAIL"
        rows.append(
            (
                r.backend,
                f"{r.seconds:.2f}",
                f"{rate / MB:.1f}",
                f"{rate / copy_rate:.3f}x",
                fmt_mib(r.rss_baseline),
                fmt_mib(r.rss_peak),
                fmt_mib(growth),
                fmt_mib(r.rss_after),
                "-" if r.api_cpu is None else f"{r.api_cpu:.1f}",
                verdict,
            )
        )
    widths = [max(len(str(row[i])) for row in (header, *rows)) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        padded = [cells[0].ljust(widths[0])]
        padded += [c.rjust(w) for c, w in zip(cells[1:], widths[1:], strict=True)]
        return "| " + " | ".join(padded) + " |"

    print(line(header))
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for row in rows:
        print(line(row))


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--size-mib", type=int, default=1024, help="file size (default 1024)")
    parser.add_argument(
        "--backend",
        choices=("embedded", "s3", "all"),
        default="all",
        help="which backend(s) to run (default all)",
    )
    parser.add_argument(
        "--tmp-dir", type=Path, default=None, help="where to make the temporary folder"
    )
    args = parser.parse_args(argv)
    if args.size_mib <= 0:
        parser.error("--size-mib must be positive")
    backends = ["embedded", "s3"] if args.backend == "all" else [args.backend]
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    failures: list[Result] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-upload-", dir=args.tmp_dir) as tmp:
            work = Path(tmp)
            size = args.size_mib * MIB
            print(f"generating {args.size_mib} MiB of JSONL in {work} ...", flush=True)
            started = time.perf_counter()
            data = generate_jsonl(work / "dataset.jsonl", size)
            print(
                f"  {data.size} bytes, {data.rows} rows, sha256 {data.sha256[:16]}..., "
                f"{time.perf_counter() - started:.1f}s",
                flush=True,
            )
            print("timing shutil.copyfile of the same bytes ...", flush=True)
            copy = Result(
                "plain copy (copyfile)", time_copy(data.path, work / "copy", fsync=False), size
            )
            copy_fsync = Result(
                "plain copy + fsync", time_copy(data.path, work / "copy", fsync=True), size
            )
            results: list[Result] = []
            for backend in backends:
                print(f"uploading through the API on {backend} ...", flush=True)
                try:
                    result = run_backend(backend, data, work / backend)
                except (BenchError, StackError) as exc:
                    result = Result(backend, float("nan"), size, ok=False, error=str(exc))
                results.append(result)
                # Free the backend's disk (the folder store's copy) before the next run.
                shutil.rmtree(work / backend, ignore_errors=True)
            print()
            print(
                f"file {data.size / MIB:.0f} MiB ({data.size / MB:.1f} MB), {data.rows} rows; "
                f"MB = 10^6 bytes; 'vs copy' = throughput / plain copyfile throughput; "
                f"RSS of the uvicorn process (target: growth < {RSS_TARGET_BYTES // MIB} MiB)"
            )
            print_table(copy, copy_fsync, results)
            failures = [r for r in results if not r.ok]
            for r in failures:
                print(f"\n{r.backend} FAILED: {r.error}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\ninterrupted; child processes stopped and temporary files removed", file=sys.stderr)
        return 130
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
