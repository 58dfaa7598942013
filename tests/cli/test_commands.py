"""`qlora` against a scripted API (httpx.MockTransport): how flags become request bodies, how
each API error is told, how `jobs watch` resumes a dropped stream and turns the job's end
into its exit code, how an adapter archive is unpacked. The installed command against the
real service is `test_installed.py`."""

from __future__ import annotations

import io
import json
import socket
import tarfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from typer.testing import CliRunner

from qlora_cli import main
from qlora_cli.events import parse_sse
from qlora_cli.exit_codes import ExitCode
from qlora_cli.transfer import TransferError, unpack_adapter
from shared.jobs import service as job_service
from shared.jobs.schemas import JobCreate

KEY = "qlsk-unit-test-secret-key-0123456789"
Handler = Callable[[httpx.Request], httpx.Response]


@pytest.fixture
def api(monkeypatch: pytest.MonkeyPatch) -> Callable[[Handler], list[httpx.Request]]:
    """`api(handler)` routes the CLI's requests to `handler`; returns the requests seen."""

    def install(handler: Handler) -> list[httpx.Request]:
        seen: list[httpx.Request] = []

        def record(request: httpx.Request) -> httpx.Response:
            request.read()
            seen.append(request)
            return handler(request)

        monkeypatch.setattr(main, "TRANSPORT", httpx.MockTransport(record))
        return seen

    return install


def cli(*args: str, key: str | None = KEY) -> Any:
    runner = CliRunner()
    base = ["--api-url", "http://api.test"] + (["--api-key", key] if key else [])
    return runner.invoke(main.app, [*base, *args], catch_exceptions=False)


def job(status: str = "queued", **extra: Any) -> dict[str, Any]:
    return {
        "id": "ftjob-1",
        "object": "fine_tuning.job",
        "status": status,
        "model": "tiny-llama",
        "gpu_class": "cpu",
        "progress": {"step": 0, "total_steps": None, "loss": None},
        "adapter_id": "ftadapter-1" if status == "succeeded" else None,
        "fine_tuned_model": "ft:tiny-llama:org:x:ftadapter-1" if status == "succeeded" else None,
        "error": {"code": "out_of_memory", "message": "too big"} if status == "failed" else None,
        **extra,
    }


def error(status: int, code: str, message: str, **extra: Any) -> httpx.Response:
    body = {"error": {"message": message, "type": "x", "param": None, "code": code, **extra}}
    return httpx.Response(status, json=body)


# ------------------------------------------------------------------------- request mapping


def test_jobs_create_maps_flags_onto_the_job_schema(api: Any) -> None:
    seen = api(lambda r: httpx.Response(200, json=job()))
    result = cli(
        "jobs", "create", "--model", "tiny-llama", "--training-file", "file-a",
        "--validation-file", "file-b", "--epochs", "2", "--batch-size", "4",
        "--learning-rate-multiplier", "0.5", "--rank", "8", "--alpha", "16", "--dropout", "0.1",
        "--max-seq-length", "128", "--max-steps", "30", "--target-modules", "q_proj,v_proj",
        "--suffix", "mine", "--seed", "7", "--qlora", "packing=false",
        "--qlora", "lr_scheduler=linear", "--metadata", "team=nlp",
        "--idempotency-key", "abc",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    (request,) = seen
    assert request.method == "POST" and request.url.path == "/v1/fine_tuning/jobs"
    assert request.headers["Idempotency-Key"] == "abc"
    assert request.headers["Authorization"] == f"Bearer {KEY}"
    body = json.loads(request.content)
    assert body == {
        "model": "tiny-llama",
        "training_file": "file-a",
        "validation_file": "file-b",
        "method": {
            "type": "supervised",
            "supervised": {
                "hyperparameters": {
                    "n_epochs": 2,
                    "batch_size": 4,
                    "learning_rate_multiplier": 0.5,
                }
            },
        },
        "qlora": {
            "rank": 8,
            "alpha": 16.0,
            "dropout": 0.1,
            "max_seq_length": 128,
            "max_steps": 30,
            "target_modules": ["q_proj", "v_proj"],
            "packing": False,
            "lr_scheduler": "linear",
        },
        "suffix": "mine",
        "seed": 7,
        "metadata": {"team": "nlp"},
    }
    # The service's own schema takes it, and every flag lands in the spec it trains with.
    spec = job_service.build_spec(JobCreate.model_validate(body))
    assert (spec.rank, spec.alpha, spec.dropout, spec.num_epochs, spec.batch_size) == (
        8, 16, 0.1, 2, 4,
    )  # fmt: skip
    assert spec.learning_rate == pytest.approx(1e-4) and spec.packing is False
    assert spec.target_modules == ["q_proj", "v_proj"] and spec.seed == 7
    assert "created" in result.stdout and "ftjob-1" in result.stdout


def test_dpo_is_passed_through_and_the_api_answer_is_shown(api: Any) -> None:
    seen = api(lambda r: error(400, "invalid_value", "method.type: Input should be 'supervised'"))
    result = cli(
        "jobs", "create", "--model", "m", "--training-file", "f", "--method", "dpo",
        "--beta", "0.2",
    )  # fmt: skip
    assert result.exit_code == ExitCode.ERROR
    assert json.loads(seen[0].content)["method"] == {
        "type": "dpo",
        "dpo": {"hyperparameters": {"beta": 0.2}},
    }
    assert "invalid_value" in result.stderr and "method.type" in result.stderr


def test_a_malformed_pair_is_refused_before_any_request(api: Any) -> None:
    seen = api(lambda r: httpx.Response(200, json=job()))
    result = cli("jobs", "create", "--model", "m", "--training-file", "f", "--qlora", "rank")
    assert result.exit_code == ExitCode.ERROR and not seen
    assert "--qlora takes KEY=VALUE" in result.stderr


def test_estimate_posts_the_job_body(api: Any) -> None:
    answer = {
        "object": "estimate",
        "model": "tiny-llama",
        "gpu_class": "cpu",
        "queue": "cpu",
        "fits": True,
        "total_bytes": 3 * 2**20,
        "parts": {"base_weights_bytes": 2**20},
        "trainable_params": 12345,
        "qlora": {},
    }
    seen = api(lambda r: httpx.Response(200, json=answer))
    result = cli("estimate", "--model", "tiny-llama", "--training-file", "f", "--rank", "4")
    assert result.exit_code == 0, result.output
    assert seen[0].url.path == "/v1/estimates"
    assert json.loads(seen[0].content)["qlora"] == {"rank": 4}
    assert "fits" in result.stdout and "3.0 MiB" in result.stdout and "12,345" in result.stdout
    raw = cli("estimate", "--model", "tiny-llama", "--training-file", "f", "--json")
    assert json.loads(raw.stdout) == answer


def test_jobs_list_filters_by_status_across_pages(api: Any) -> None:
    pages = {
        None: {"data": [job("running", id="j3"), job("failed", id="j2")], "has_more": True},
        "j2": {"data": [job("running", id="j1")], "has_more": False},
    }
    seen = api(lambda r: httpx.Response(200, json=pages[r.url.params.get("after")]))
    result = cli("jobs", "list", "--status", "running", "--json")
    assert result.exit_code == 0
    assert [j["id"] for j in json.loads(result.stdout)["data"]] == ["j3", "j1"]
    assert len(seen) == 2


# ---------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("status", "code", "label"),
    [
        (400, "invalid_value", "invalid request"),
        (401, "invalid_api_key", "not authenticated"),
        (403, "model_not_deletable", "not allowed"),
        (404, "not_found", "not found"),
        (409, "job_not_cancellable", "conflict"),
        (413, "file_too_large", "too large"),
        (429, "rate_limit_exceeded", "rate limited"),
        (500, "internal_error", "service error"),
        (503, "store_unavailable", "service error"),
    ],
)
def test_each_api_error_is_one_line_with_its_code(
    api: Any, status: int, code: str, label: str
) -> None:
    # The message even echoes the key: it must not reach the terminal.
    api(lambda r: error(status, code, f"the reason ({KEY})"))
    result = cli("jobs", "cancel", "ftjob-1")
    assert result.exit_code == ExitCode.ERROR
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error: {label} ({status} {code})"), lines[0]
    assert "the reason" in lines[0]
    assert KEY not in result.output and "[redacted]" in lines[0]
    assert result.stdout == ""


def test_json_mode_prints_the_error_body_for_scripts(api: Any) -> None:
    api(lambda r: error(404, "not_found", "no such job"))
    result = cli("--json", "jobs", "get", "ftjob-x")
    assert result.exit_code == ExitCode.ERROR
    assert json.loads(result.stdout)["error"]["code"] == "not_found"


def test_rate_limit_names_the_wait(api: Any) -> None:
    api(
        lambda r: httpx.Response(
            429,
            headers={"Retry-After": "30"},
            json={"error": {"message": "too many", "code": "too_many_streams", "param": None}},
        )
    )
    result = cli("jobs", "list")
    assert "retry after 30 s" in result.stderr


def test_a_refused_upload_lists_its_bad_lines(api: Any, tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n{"x": 1}\n')
    lines = [{"line": 2, "reason": "not valid JSON"}, {"line": 3, "reason": "unknown format"}]
    seen = api(
        lambda r: error(
            400, "invalid_file", "invalid JSONL (25 problem(s)); line 2: not valid JSON",
            lines=lines,
        )
    )  # fmt: skip
    result = cli("files", "upload", str(bad))
    assert result.exit_code == ExitCode.ERROR
    out = result.stderr.splitlines()
    assert out[0].startswith("error: invalid request (400 invalid_file")
    assert out[1:] == [
        "  line 2: not valid JSON",
        "  line 3: unknown format",
        "  ... and 23 more",
    ]
    # The file went as a multipart part, whole, with its purpose.
    body = seen[0].content
    assert seen[0].headers["content-type"].startswith("multipart/form-data; boundary=")
    assert int(seen[0].headers["content-length"]) == len(body)
    assert bad.read_bytes() in body and b'name="purpose"\r\n\r\nfine-tune\r\n' in body
    assert b'filename="bad.jsonl"' in body


def test_connection_refused_is_its_own_exit_code(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again: nothing listens there
    monkeypatch.setattr(main, "TRANSPORT", None)
    result = CliRunner().invoke(
        main.app, ["--api-url", f"http://user:pw@127.0.0.1:{port}", "jobs", "list"]
    )
    assert result.exit_code == ExitCode.UNREACHABLE
    assert f"cannot reach the API at http://127.0.0.1:{port}: connection refused" in result.stderr
    assert "pw" not in result.stderr


# ----------------------------------------------------------------------------------- watch


def sse(*events: tuple[int, dict[str, Any]], done: str | None = None) -> bytes:
    out = ""
    for seq, event in events:
        out += f"id: {seq}\nevent: {event.get('type', 'message')}\ndata: {json.dumps(event)}\n\n"
        out += ": keepalive\n\n"
    if done is not None:
        out += f"event: done\ndata: {json.dumps({'status': done})}\n\n"
    return out.encode()


def ev(seq: int, message: str, **data: Any) -> tuple[int, dict[str, Any]]:
    kind = "metrics" if "loss" in data or "eval_loss" in data else "message"
    return seq, {
        "id": f"ftevent-{seq}",
        "created_at": 1_800_000_000,
        "level": "info",
        "message": message,
        "type": kind,
        "data": data or None,
    }


class Broken(httpx.SyncByteStream):
    """Some bytes, then the connection drops."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __iter__(self) -> Iterator[bytes]:
        yield self.data
        raise httpx.ReadError("connection reset by peer")


def test_watch_resumes_with_last_event_id_and_exits_with_the_outcome(api: Any) -> None:
    first = sse(
        ev(5, "Job started", status="running", **{"from": "queued"}),
        ev(7, "Step 1/4", step=1, total_steps=4, loss=2.5, tokens_per_second=900.0,
           eta_seconds=12.0),
    )  # fmt: skip
    second = sse(ev(9, "Step 4/4", step=4, total_steps=4, loss=1.0))  # ends without `done`
    third = sse(ev(12, "Job succeeded", status="succeeded", **{"from": "running"}), done="ok")
    streams = iter(
        [
            httpx.Response(200, stream=Broken(first)),
            httpx.Response(503, json={"error": {"code": "store_unavailable", "message": "x"}}),
            httpx.Response(200, content=second),
            httpx.Response(200, content=third.replace(b'"ok"', b'"succeeded"')),
        ]
    )

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            assert request.headers["accept"] == "text/event-stream"
            return next(streams)
        return httpx.Response(200, json=job("succeeded", trained_tokens=1000))

    seen = api(handler)
    result = cli("jobs", "watch", "ftjob-1")
    assert result.exit_code == ExitCode.OK, result.output
    resumes = [r.headers.get("last-event-id") for r in seen if r.url.path.endswith("/events")]
    assert resumes == [None, "7", "7", "9"]
    assert result.stderr.count("reconnecting") == 3
    assert "Job started" in result.stderr and "Job succeeded" in result.stderr
    assert "Step 1/4" not in result.stderr  # metrics feed the bar, not the log
    assert "step 4/4" in result.stderr and "loss 1.0000" in result.stderr
    assert "succeeded" in result.stdout and "ftadapter-1" in result.stdout


@pytest.mark.parametrize(
    ("status", "code"),
    [
        ("failed", ExitCode.JOB_FAILED),
        ("cancelled", ExitCode.JOB_CANCELLED),
        ("expired", ExitCode.JOB_OTHER),
    ],
)
def test_watch_exit_code_is_the_jobs_outcome(api: Any, status: str, code: ExitCode) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(200, content=sse(ev(3, "created"), done=status))
        return httpx.Response(200, json=job(status))

    api(handler)
    result = cli("jobs", "watch", "ftjob-1")
    assert result.exit_code == code
    assert status in result.stdout
    if status == "failed":
        assert "out_of_memory: too big" in result.stdout


def test_watch_json_prints_one_event_per_line_then_the_job(api: Any) -> None:
    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("/events"):
            return httpx.Response(
                200, content=sse(ev(3, "a"), ev(4, "b", step=1, loss=1.0), done="cancelled")
            )
        return httpx.Response(200, json=job("cancelled"))

    api(handler)
    result = cli("jobs", "watch", "ftjob-1", "--json")
    assert result.exit_code == ExitCode.JOB_CANCELLED
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [x["object"] if "object" in x else x["id"] for x in lines] == [
        "ftevent-3",
        "ftevent-4",
        "fine_tuning.job",
    ]


def test_parse_sse_joins_data_lines_and_skips_comments() -> None:
    lines = [": hi", "id: 4", "event: metrics", "data: {\"a\":", "data: 1}", "", "event: done",
             "data: {}", ""]  # fmt: skip
    messages = list(parse_sse(lines))
    assert [(m.id, m.event, m.data) for m in messages] == [
        ("4", "metrics", '{"a":\n1}'),
        (None, "done", "{}"),
    ]


# -------------------------------------------------------------------------------- adapters


def archive(entries: dict[str, bytes], *, link: str | None = None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in entries.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type = tarfile.SYMTYPE
            info.linkname = "/etc/passwd"
            tar.addfile(info)
    return buf.getvalue()


ADAPTER = {
    "adapter/adapter_config.json": b'{"peft_type": "LORA"}',
    "adapter/adapter_model.safetensors": b"weights",
}


def test_adapter_download_unpacks_into_the_folder_itself(api: Any, tmp_path: Path) -> None:
    data = archive(ADAPTER)
    api(lambda r: httpx.Response(200, content=data, headers={"content-length": str(len(data))}))
    out = tmp_path / "out"
    result = cli("adapters", "download", "ftadapter-1", "--out", str(out), "--json")
    assert result.exit_code == 0, result.output
    assert (out / "adapter_config.json").read_bytes() == b'{"peft_type": "LORA"}'
    assert json.loads(result.stdout)["files"] == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    again = cli("adapters", "download", "ftadapter-1", "--out", str(out))
    assert again.exit_code == ExitCode.ERROR and "--force" in again.stderr
    assert cli("adapters", "download", "ftadapter-1", "--out", str(out), "--force").exit_code == 0


@pytest.mark.parametrize(
    "entries",
    [
        {**ADAPTER, "adapter/../../evil": b"x"},
        {**ADAPTER, "/abs/evil": b"x"},
        {"adapter/README.md": b"no config"},
    ],
)
def test_a_malformed_archive_is_refused(tmp_path: Path, entries: dict[str, bytes]) -> None:
    path = tmp_path / "a.tar.gz"
    path.write_bytes(archive(entries))
    with pytest.raises(TransferError):
        unpack_adapter(path, tmp_path / "out")
    assert not (tmp_path / "evil").exists()


def test_a_link_in_the_archive_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "a.tar.gz"
    path.write_bytes(archive(ADAPTER, link="adapter/link"))
    with pytest.raises(TransferError, match="non-file"):
        unpack_adapter(path, tmp_path / "out")


JOB = "/v1/fine_tuning/jobs/ftjob-1"


@pytest.mark.parametrize(
    ("args", "method", "path", "params"),
    [
        (["files", "list", "--purpose", "x"], "GET", "/v1/files", {"limit": "100", "purpose": "x"}),
        (["files", "get", "file-1"], "GET", "/v1/files/file-1", {}),
        (["files", "delete", "file-1"], "DELETE", "/v1/files/file-1", {}),
        (["jobs", "get", "ftjob-1"], "GET", JOB, {}),
        (["jobs", "list", "--limit", "5"], "GET", "/v1/fine_tuning/jobs", {"limit": "5"}),
        (["jobs", "cancel", "ftjob-1"], "POST", f"{JOB}/cancel", {}),
        (["jobs", "pause", "ftjob-1"], "POST", f"{JOB}/pause", {}),
        (["jobs", "resume", "ftjob-1"], "POST", f"{JOB}/resume", {}),
        (["jobs", "events", "ftjob-1"], "GET", f"{JOB}/events", {"limit": "20"}),
        (["jobs", "checkpoints", "ftjob-1"], "GET", f"{JOB}/checkpoints", {"limit": "10"}),
        (["adapters", "list", "--limit", "3"], "GET", "/v1/adapters", {"limit": "3"}),
        (["adapters", "delete", "a-1"], "DELETE", "/v1/adapters/a-1", {}),
        (["models", "list"], "GET", "/v1/models", {}),
    ],
)  # fmt: skip
def test_each_command_calls_its_endpoint_and_prints_raw_json(
    api: Any, args: list[str], method: str, path: str, params: dict[str, str]
) -> None:
    answer = {"id": "x", "object": "list", "data": [], "has_more": False, "status": "queued"}
    seen = api(lambda r: httpx.Response(200, json=answer))
    shown = cli(*args)
    assert shown.exit_code == 0, shown.output
    raw = cli(*args, "--json")
    assert raw.exit_code == 0, raw.output
    assert [(r.method, r.url.path, dict(r.url.params)) for r in seen] == [
        (method, path, params)
    ] * 2
    if args[:2] == ["jobs", "list"]:
        assert json.loads(raw.stdout)["data"] == []  # the pages, joined
    else:
        assert json.loads(raw.stdout) == answer
