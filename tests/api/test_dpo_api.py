"""Preference files and DPO jobs through the API, without a worker (both stacks): per-line
upload errors for broken preference rows, method dpo admitted with a preference file only,
reported as OpenAI reports it, and estimated with chosen + rejected sequences."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest

from tests.api.test_jobs_api import TINY_CONFIG
from tests.conftest import Stack

CHAT_MODEL = {**TINY_CONFIG, "qlora_chat_template": True}
GOOD = {
    "input": {
        "messages": [
            {"role": "system", "content": "Be kind."},
            {"role": "user", "content": "Say hi"},
        ],
        "tools": [{"type": "function", "function": {"name": "wave", "parameters": {}}}],
    },
    "preferred_output": [{"role": "assistant", "content": "Hello there!"}],
    "non_preferred_output": [{"role": "assistant", "content": "No."}],
}
CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}


def broken(change: Any) -> dict[str, Any]:
    row = copy.deepcopy(GOOD)
    change(row)
    return row


# (row, words the line's reason must contain)
BROKEN_ROWS: list[tuple[dict[str, Any], list[str]]] = [
    (broken(lambda r: r.pop("non_preferred_output")), ["missing", "non_preferred_output"]),
    (broken(lambda r: r.pop("preferred_output")), ["missing", "preferred_output"]),
    (broken(lambda r: r.pop("input")), ["missing", "input"]),
    (broken(lambda r: r.update(preferred_output=[])), ["preferred_output", "exactly one"]),
    (
        broken(lambda r: r["non_preferred_output"][0].update(content="  ")),
        ["non_preferred_output[0].content", "empty"],
    ),
    (
        broken(lambda r: r["preferred_output"][0].update(role="user")),
        ["preferred_output[0].role", "assistant"],
    ),
    (
        broken(lambda r: r["preferred_output"][0].update(content=["a"])),
        ["preferred_output[0].content", "string"],
    ),
    (broken(lambda r: r["input"].update(messages=[])), ["input.messages", "non-empty"]),
    (
        broken(lambda r: r["input"]["messages"][1].update(role="robot")),
        ["input.messages[1].role"],
    ),
    (
        broken(lambda r: r["input"]["messages"].append({"role": "assistant", "content": "x"})),
        ["input.messages[2]", "user"],
    ),
    (broken(lambda r: r["input"].update(tools="wave")), ["input.tools"]),
    (
        broken(lambda r: r.update(non_preferred_output=r["preferred_output"])),
        ["same answer"],
    ),
    (broken(lambda r: r.update(score=1)), ["unexpected", "score"]),
    (broken(lambda r: r.update(input="Say hi")), ["input"]),
]


def test_broken_preference_rows_are_refused_line_by_line(stack: Stack) -> None:
    _, headers, _ = stack.new_tenant()
    lines = [GOOD] + [row for row, _ in BROKEN_ROWS] + [GOOD]
    body = b"".join(json.dumps(r).encode() + b"\n" for r in lines)
    resp = stack.client.post(
        "/v1/files",
        files={"file": ("p.jsonl", body)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert resp.status_code == 400, resp.text
    error = resp.json()["error"]
    assert (error["code"], error["param"], error["type"]) == (
        "invalid_file",
        "file",
        "invalid_request_error",
    )
    reported = {entry["line"]: entry["reason"] for entry in error["lines"]}
    assert sorted(reported) == list(range(2, len(BROKEN_ROWS) + 2))  # not lines 1 and last
    for line, (_, words) in enumerate(BROKEN_ROWS, start=2):
        for word in words:
            assert word in reported[line], (line, reported[line])


def test_preference_rows_do_not_mix_with_chat_rows(stack: Stack) -> None:
    _, headers, _ = stack.new_tenant()
    body = (json.dumps(GOOD) + "\n" + json.dumps(CHAT) + "\n").encode()
    resp = stack.client.post(
        "/v1/files",
        files={"file": ("p.jsonl", body)},
        data={"purpose": "fine-tune"},
        headers=headers,
    )
    assert resp.status_code == 400
    (entry,) = resp.json()["error"]["lines"]
    assert entry["line"] == 2 and "preference" in entry["reason"]


@pytest.fixture
def files(stack: Stack) -> tuple[dict[str, str], dict[str, str]]:
    """A tenant's headers and its uploaded preference and chat files (a chat-capable model)."""
    stack.client.post(
        "/admin/models",
        headers=stack.admin,
        json={"name": "tiny-chat", "source": "org/tiny-chat", "config": CHAT_MODEL},
    )
    _, headers, _ = stack.new_tenant()
    ids = {}
    for name, row in (("preference", GOOD), ("chat", CHAT)):
        resp = stack.client.post(
            "/v1/files",
            files={"file": (f"{name}.jsonl", (json.dumps(row) + "\n").encode() * 3)},
            data={"purpose": "fine-tune"},
            headers=headers,
        )
        assert resp.status_code == 200, resp.text
        assert resp.json()["format"] == name
        ids[name] = resp.json()["id"]
    return headers, ids


def dpo_method(**hyperparameters: Any) -> dict[str, Any]:
    return {"type": "dpo", "dpo": {"hyperparameters": hyperparameters}}


def test_dpo_job_is_admitted_with_a_preference_file_and_reported_as_openai_does(
    stack: Stack, files: tuple[dict[str, str], dict[str, str]]
) -> None:
    headers, ids = files
    body = {
        "model": "tiny-chat",
        "training_file": ids["preference"],
        "method": dpo_method(beta=0.25, batch_size=2, n_epochs=1),
    }
    resp = stack.client.post("/v1/fine_tuning/jobs", json=body, headers=headers)
    assert resp.status_code == 200, resp.text
    job = resp.json()
    assert job["method"]["type"] == "dpo" and set(job["method"]) == {"type", "dpo"}
    reported = job["method"]["dpo"]["hyperparameters"]
    assert (reported["beta"], reported["batch_size"], reported["n_epochs"]) == (0.25, 2, 1)
    assert job["hyperparameters"]["beta"] == 0.25
    assert job["qlora"]["method"] == "dpo" and job["qlora"]["dpo_beta"] == 0.25
    assert job["qlora"]["batch_size"] == 2 and job["qlora"]["num_epochs"] == 1
    assert job["estimate"]["method"] == "dpo" and job["estimate"]["reference_model_bytes"] == 0
    assert "adapter disabled" in job["estimate"]["reference_policy"]
    again = stack.client.get(f"/v1/fine_tuning/jobs/{job['id']}", headers=headers).json()
    assert again["method"] == job["method"]

    # beta left to "auto" is DPO's usual 0.1; a supervised job reports method supervised
    auto = {"model": "tiny-chat", "training_file": ids["preference"], "method": dpo_method()}
    job = stack.client.post("/v1/fine_tuning/jobs", json=auto, headers=headers).json()
    assert job["qlora"]["dpo_beta"] == 0.1
    assert job["method"]["dpo"]["hyperparameters"]["beta"] == 0.1  # "auto", resolved
    sft = {"model": "tiny-chat", "training_file": ids["chat"]}
    job = stack.client.post("/v1/fine_tuning/jobs", json=sft, headers=headers).json()
    assert job["method"]["type"] == "supervised" and job["qlora"]["method"] == "supervised"


def test_method_and_file_must_match(
    stack: Stack, files: tuple[dict[str, str], dict[str, str]]
) -> None:
    headers, ids = files
    cases = [
        ({"training_file": ids["chat"], "method": dpo_method(beta=0.1)}, "training_file"),
        ({"training_file": ids["preference"]}, "training_file"),
        (
            {"training_file": ids["preference"], "method": {"type": "supervised"}},
            "training_file",
        ),
        (
            {"training_file": ids["preference"], "method": {**dpo_method(), "type": "supervised"}},
            "method",
        ),
        ({"training_file": ids["preference"], "method": dpo_method(beta=0)}, "method"),
        (
            {
                "training_file": ids["preference"],
                "method": dpo_method(),
                "qlora": {"method": "dpo"},
            },
            "qlora.method",
        ),
    ]
    for extra, param in cases:
        resp = stack.client.post(
            "/v1/fine_tuning/jobs", json={"model": "tiny-chat", **extra}, headers=headers
        )
        assert resp.status_code == 400, (extra, resp.text)
        error = resp.json()["error"]
        assert error["type"] == "invalid_request_error" and error["param"].startswith(param), (
            extra,
            error,
        )
        if param == "training_file":
            assert "preference" in error["message"]


def test_estimate_counts_chosen_and_rejected_sequences(
    stack: Stack, files: tuple[dict[str, str], dict[str, str]]
) -> None:
    headers, ids = files
    qlora = {"batch_size": 2, "max_seq_length": 256, "compute_dtype": "float32"}
    estimates = {}
    for name, extra in (
        ("dpo", {"training_file": ids["preference"], "method": dpo_method()}),
        ("sft", {"training_file": ids["chat"]}),
    ):
        resp = stack.client.post(
            "/v1/estimates", json={"model": "tiny-chat", "qlora": qlora, **extra}, headers=headers
        )
        assert resp.status_code == 200, resp.text
        estimates[name] = resp.json()
    dpo, sft = estimates["dpo"]["parts"], estimates["sft"]["parts"]
    assert dpo["activation_bytes"] == 2 * sft["activation_bytes"]
    assert dpo["logits_bytes"] == 2 * sft["logits_bytes"]
    assert dpo["quantized_weights_bytes"] == sft["quantized_weights_bytes"]  # one base model
    assert dpo["reference_model_bytes"] == 0
