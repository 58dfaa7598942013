"""`POST /v1/adapters/{id}/merge` through real processes: a finished tiny job's adapter merged
on a worker, its parity report, the archive downloaded, unpacked and loaded without PEFT."""

from __future__ import annotations

import io
import json
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.jobs.conftest import ServiceStack, addition_rows, stop

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def adapter(stack: ServiceStack) -> Iterator[dict[str, Any]]:
    """A succeeded short job's adapter, with a worker left running for the merges."""
    proc = stack.start_worker()
    headers = stack.new_tenant("merger")
    file_id = stack.upload(headers, addition_rows(40, seed=1))
    job = stack.submit(headers, file_id, max_steps=2, checkpoint_steps=None)
    done = stack.wait_for(headers, job["id"], lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", json.dumps(done)
    yield {"headers": headers, "adapter_id": done["adapter_id"]}
    stop(proc)


def wait_merge(c: httpx.Client, merge_id: str, timeout: float = 180) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        merge: dict[str, Any] = c.get(f"/v1/merges/{merge_id}").json()
        if merge["status"] in ("succeeded", "failed") or time.monotonic() > deadline:
            return merge
        time.sleep(0.3)


def test_merge_runs_on_a_worker_and_downloads_as_a_plain_model(
    stack: ServiceStack, adapter: dict[str, Any], tmp_path: Path
) -> None:
    adapter_id = adapter["adapter_id"]
    with stack.http(adapter["headers"]) as c:
        created = c.post(f"/v1/adapters/{adapter_id}/merge", json={"dtype": "float16"})
        assert created.status_code == 202, created.text
        merge = created.json()
        assert merge["id"].startswith("merge-") and merge["object"] == "adapter.merge"
        assert merge["adapter_id"] == adapter_id and merge["dtype"] == "float16"
        assert merge["status"] in ("queued", "running") and merge["parity"] is None
        # The same request while it is queued or running returns it.
        again = c.post(f"/v1/adapters/{adapter_id}/merge", json={"dtype": "float16"})
        assert again.status_code == 202 and again.json()["id"] == merge["id"]
        early = c.get(f"/v1/merges/{merge['id']}/download")
        assert early.status_code in (200, 409)  # 409 merge_not_ready unless already done

        done = wait_merge(c, merge["id"])
        assert done["status"] == "succeeded", json.dumps(done) + stack.tail_logs()
        assert done["error"] is None and done["finished_at"] >= done["created_at"]
        parity = done["parity"]
        assert parity["merged_dtype"] == "float16" and parity["rows"] > 0 and parity["tokens"] > 0
        assert parity["rows_source"] == "training_file_held_out"
        assert parity["reference"]["quant_type"] == "nf4"
        assert (
            0 <= parity["max_abs_logit_diff"] < 0.1 * parity["adapter_effect"]["max_abs_logit_diff"]
        )
        listed = c.get(f"/v1/adapters/{adapter_id}/merges").json()
        assert [m["id"] for m in listed["data"]] == [merge["id"]]
        assert c.post(f"/v1/adapters/{adapter_id}/merge", json={}).json()["dtype"] == "bfloat16"

        archive = c.get(f"/v1/merges/{merge['id']}/download")
        assert archive.status_code == 200
        redirect = c.get(f"/v1/merges/{merge['id']}/download", params={"redirect": True})
        assert redirect.status_code == 307
        assert httpx.get(redirect.headers["location"]).content == archive.content

    with tarfile.open(fileobj=io.BytesIO(archive.content)) as tar:
        tar.extractall(tmp_path, filter="data")
    folder = tmp_path / "model"
    names = {p.name for p in folder.iterdir()}
    assert {"model.safetensors", "config.json", "tokenizer.json", "parity.json"} <= names
    assert not any(n.startswith("adapter_") for n in names)
    assert json.loads((folder / "parity.json").read_text()) == parity
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["torch_dtype"] == "float16"

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert model.dtype == torch.float16
    ids = tokenizer("3+4=", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=ids).logits).all()


def test_merge_requests_are_validated_and_tenant_scoped(
    stack: ServiceStack, adapter: dict[str, Any]
) -> None:
    adapter_id = adapter["adapter_id"]
    with stack.http(adapter["headers"]) as c:
        bad = c.post(f"/v1/adapters/{adapter_id}/merge", json={"dtype": "int4"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "dtype"
        extra = c.post(f"/v1/adapters/{adapter_id}/merge", json={"dtype": "float16", "x": 1})
        assert extra.status_code == 400
        assert c.post("/v1/adapters/ftadapter-nope/merge", json={}).status_code == 404
        mine = c.get(f"/v1/adapters/{adapter_id}/merges").json()["data"]
    other = stack.new_tenant("someone-else")
    with stack.http(other) as c:
        assert c.post(f"/v1/adapters/{adapter_id}/merge", json={}).status_code == 404
        assert c.get(f"/v1/adapters/{adapter_id}/merges").status_code == 404
        for merge in mine:
            for path in (f"/v1/merges/{merge['id']}", f"/v1/merges/{merge['id']}/download"):
                resp = c.get(path)
                assert resp.status_code == 404 and "parity" not in resp.text
            assert c.delete(f"/v1/merges/{merge['id']}").status_code == 404


def test_deleting_a_merge_and_the_adapter_removes_their_objects(
    stack: ServiceStack, adapter: dict[str, Any]
) -> None:
    from shared.storage import make_store

    store = make_store(stack.settings)

    def keys_of(merge_id: str) -> list[str]:
        return [k for k in store.list_keys("merged/") if f"/{merge_id}/" in k]

    def gone(merge_id: str) -> bool:
        deadline = time.monotonic() + 15  # post-commit deletion, else the sweeper's
        while keys_of(merge_id) and time.monotonic() < deadline:
            time.sleep(0.3)
        return not keys_of(merge_id)

    adapter_id = adapter["adapter_id"]
    with stack.http(adapter["headers"]) as c:
        merges = c.get(f"/v1/adapters/{adapter_id}/merges").json()["data"]
        first = next(m for m in merges if m["status"] == "succeeded")
        assert keys_of(first["id"])
        assert c.delete(f"/v1/merges/{first['id']}").json()["deleted"] is True
        assert c.get(f"/v1/merges/{first['id']}").status_code == 404
        assert gone(first["id"])
        rest = [m["id"] for m in merges if m["id"] != first["id"]]
        assert rest  # the bfloat16 one
        assert c.delete(f"/v1/adapters/{adapter_id}").status_code == 200
        for merge_id in rest:
            assert c.get(f"/v1/merges/{merge_id}").status_code == 404
            assert gone(merge_id)
