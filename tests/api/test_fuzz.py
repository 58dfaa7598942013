"""Property-based fuzz of the tenant API on both stacks, with two tenants.

For random job bodies, random list/read query parameters and ids, and random uploads: no
answer is a 5xx, every 4xx carries `error.code`, tenant B never sees tenant A's objects (404),
and a refused upload leaves no row and no object behind. Examples are bounded so the file runs
in well under a minute."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.api.test_bounds import TINY_CONFIG
from tests.api.test_files import file_rows, jsonl, stored_objects
from tests.conftest import Stack

pytestmark = pytest.mark.slow

FUZZ = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=True,  # the same examples every run: a failure here is reproducible
)
ROW = {"prompt": "2+2=", "completion": "4"}

# ----------------------------------------------------------------------------- strategies

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(10**30), max_value=10**30)
    | st.sampled_from([0, -1, 2**31, 2**63, 10**400])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["auto", "tiny", "", "\x00", "\u202e", "file-", "../x", "a" * 300])
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
JOB_KEYS = [
    "model",
    "training_file",
    "validation_file",
    "hyperparameters",
    "method",
    "suffix",
    "seed",
    "metadata",
    "integrations",
    "qlora",
]
QLORA_KEYS = [
    "rank",
    "alpha",
    "dropout",
    "max_seq_length",
    "learning_rate",
    "max_steps",
    "target_modules",
    "batch_size",
    "num_epochs",
    "lr_scheduler",
    "seed",
]


@st.composite
def job_bodies(draw: st.DrawFn, file_id: str) -> Any:
    """Mostly plausible bodies with one or more fields gone wrong, sometimes anything at all."""
    if draw(st.integers(0, 9)) == 0:
        return draw(json_values)
    body: dict[str, Any] = {"model": "tiny", "training_file": file_id}
    for key in draw(st.lists(st.sampled_from(JOB_KEYS), max_size=4, unique=True)):
        if key == "qlora":
            body[key] = draw(st.dictionaries(st.sampled_from(QLORA_KEYS), json_values, max_size=3))
        elif key == "hyperparameters":
            body[key] = draw(
                st.dictionaries(
                    st.sampled_from(["n_epochs", "batch_size", "learning_rate_multiplier", "x"]),
                    json_values,
                    max_size=3,
                )
            )
        elif key == "metadata":
            body[key] = draw(
                st.dictionaries(
                    st.text(max_size=70), json_values | st.text(max_size=600), max_size=18
                )
            )
        else:
            body[key] = draw(json_values)
    return body


ids = st.text(max_size=80).filter(
    lambda s: not any("\ud800" <= c <= "\udfff" for c in s)
) | st.sampled_from(
    ["file-", "ftjob-", "ftevent-1", "ftevent--1", "ftevent-" + "9" * 400, "%00", "..", "0"]
)
params = st.dictionaries(
    st.sampled_from(["limit", "after", "purpose", "x"]),
    ids | st.integers(-(10**30), 10**30).map(str),
    max_size=3,
)


def dump(value: Any) -> bytes:
    return json.dumps(value, allow_nan=True).encode()


# ----------------------------------------------------------------------------- helpers


def check(resp: Any) -> None:
    assert resp.status_code < 500, (resp.request.method, resp.request.url, resp.text)
    if resp.status_code >= 400:
        error = resp.json()["error"]
        assert isinstance(error["code"], str) and error["code"] and error["message"], resp.text
        expected = "requests" if resp.status_code == 429 else "invalid_request_error"
        assert error["type"] == expected and "param" in error, resp.text


@pytest.fixture
def tenants(stack: Stack) -> dict[str, Any]:
    """Tenant A with a file and a job, tenant B with nothing."""
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny", "source": "org/tiny", "config": TINY_CONFIG},
    )
    a_id, a, _ = stack.new_tenant("a")
    b_id, b, _ = stack.new_tenant("b")
    resp = stack.client.post(
        "/v1/files",
        headers=a,
        data={"purpose": "fine-tune"},
        files={"file": ("a.jsonl", jsonl(ROW, ROW))},
    )
    file_id = resp.json()["id"]
    job = stack.client.post(
        "/v1/fine_tuning/jobs", headers=a, json={"model": "tiny", "training_file": file_id}
    )
    assert job.status_code == 200, job.text
    return {"a": a, "a_id": a_id, "b": b, "b_id": b_id, "file": file_id, "job": job.json()["id"]}


def assert_b_sees_nothing_of_a(stack: Stack, t: dict[str, Any]) -> None:
    b = t["b"]
    for path in (
        f"/v1/files/{t['file']}",
        f"/v1/files/{t['file']}/content",
        f"/v1/fine_tuning/jobs/{t['job']}",
        f"/v1/fine_tuning/jobs/{t['job']}/events",
        f"/v1/fine_tuning/jobs/{t['job']}/checkpoints",
    ):
        assert stack.client.get(path, headers=b).status_code == 404, path
    assert stack.client.get("/v1/files", headers=b).json()["data"] == []
    assert stack.client.get("/v1/fine_tuning/jobs", headers=b).json()["data"] == []
    assert stack.client.get(f"/v1/files?after={t['file']}", headers=b).status_code == 404


# ----------------------------------------------------------------------------- properties


def test_fuzz_job_bodies(stack: Stack, tenants: dict[str, Any]) -> None:
    created: list[str] = []

    @settings(FUZZ, max_examples=120)
    @given(body=job_bodies(tenants["file"]), as_b=st.booleans())
    def run(body: Any, as_b: bool) -> None:
        headers = {**(tenants["b"] if as_b else tenants["a"]), "content-type": "application/json"}
        resp = stack.client.post("/v1/fine_tuning/jobs", content=dump(body), headers=headers)
        check(resp)
        if resp.status_code == 200:
            assert not as_b, "tenant B trained on tenant A's file"
            created.append(resp.json()["id"])
            stack.client.post(f"/v1/fine_tuning/jobs/{created[-1]}/cancel", headers=tenants["a"])

    run()
    for job_id in created:
        assert (
            stack.client.get(f"/v1/fine_tuning/jobs/{job_id}", headers=tenants["b"]).status_code
            == 404
        )
    assert_b_sees_nothing_of_a(stack, tenants)


def test_fuzz_raw_bodies(stack: Stack, tenants: dict[str, Any]) -> None:
    @settings(FUZZ, max_examples=60)
    @given(
        body=st.binary(max_size=300)
        | st.sampled_from(
            [b"[" * 5000, b'{"seed": ' + b"9" * 5000 + b"}", b"\xef\xbb\xbf{}", b'{"model": NaN}']
        ),
        path=st.sampled_from(["/v1/fine_tuning/jobs", "/v1/files", "/v1/estimates"]),
    )
    def run(body: bytes, path: str) -> None:
        resp = stack.client.post(
            path, content=body, headers={**tenants["a"], "content-type": "application/json"}
        )
        check(resp)

    run()


def test_fuzz_reads(stack: Stack, tenants: dict[str, Any]) -> None:
    @settings(FUZZ, max_examples=150)
    @given(
        template=st.sampled_from(
            [
                "/v1/files",
                "/v1/files/{id}",
                "/v1/files/{id}/content",
                "/v1/fine_tuning/jobs",
                "/v1/fine_tuning/jobs/{id}",
                "/v1/fine_tuning/jobs/{id}/events",
                "/v1/fine_tuning/jobs/{id}/checkpoints",
                "/v1/fine_tuning/jobs/{id}/metrics",
                "/v1/adapters/{id}",
                "/v1/adapters",
            ]
        ),
        some_id=ids | st.sampled_from(["<file>", "<job>"]),
        query=params,
        as_b=st.booleans(),
    )
    def run(template: str, some_id: str, query: dict[str, str], as_b: bool) -> None:
        real = {"<file>": tenants["file"], "<job>": tenants["job"]}
        some_id = real.get(some_id, some_id)
        for key, value in list(query.items()):
            query[key] = real.get(value, value)
        path = template.replace("{id}", quote(some_id, safe=""))
        headers = tenants["b"] if as_b else tenants["a"]
        resp = stack.client.get(path, params=query, headers=headers)
        check(resp)
        if as_b and some_id in real.values() and "{id}" in template:
            assert resp.status_code in (404, 400), (path, resp.text)
        if as_b and resp.status_code == 200 and "data" in resp.json():
            assert resp.json()["data"] == [], (path, query)

    run()
    assert_b_sees_nothing_of_a(stack, tenants)


def test_fuzz_uploads(stack: Stack, tenants: dict[str, Any]) -> None:
    before_rows = file_rows(stack, tenants["a_id"])
    before_objects = stored_objects(stack, tenants["a_id"])
    accepted: list[str] = []
    lines = (
        json_values.map(dump)
        | st.builds(lambda v: dump({"text": v}), json_values)
        | st.builds(lambda v: dump({"messages": v}), json_values)
        | st.binary(max_size=60)
        | st.just(dump(ROW))
    )

    @settings(FUZZ, max_examples=80)
    @given(
        content=st.lists(lines, max_size=6).map(lambda ls: b"\n".join(ls))
        | st.binary(max_size=400),
        filename=st.text(min_size=0, max_size=300).filter(
            lambda s: not any("\ud800" <= c <= "\udfff" for c in s)
        ),
        purpose=st.sampled_from(["fine-tune", "batch", "", "fine-tune\x00"]),
    )
    def run(content: bytes, filename: str, purpose: str) -> None:
        rows = file_rows(stack, tenants["a_id"])
        resp = stack.client.post(
            "/v1/files",
            headers=tenants["a"],
            data={"purpose": purpose},
            files={"file": (filename, content, "application/jsonl")},
        )
        check(resp)
        if resp.status_code == 200:
            accepted.append(resp.json()["id"])
            got = stack.client.get(f"/v1/files/{accepted[-1]}/content", headers=tenants["a"])
            assert got.content == content
        else:
            assert file_rows(stack, tenants["a_id"]) == rows, resp.text

    run()
    assert file_rows(stack, tenants["a_id"]) == before_rows + len(accepted)
    assert len(stored_objects(stack, tenants["a_id"])) == len(before_objects) + len(accepted)
    assert stored_objects(stack, tenants["b_id"]) == []
    for file_id in accepted:
        assert stack.client.get(f"/v1/files/{file_id}", headers=tenants["b"]).status_code == 404
    assert_b_sees_nothing_of_a(stack, tenants)
