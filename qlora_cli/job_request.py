"""From `jobs create` / `estimate` flags to the body of `POST /v1/fine_tuning/jobs` (and
`POST /v1/estimates`, which takes the same body).

OpenAI's names go where OpenAI puts them: `--epochs`, `--batch-size` and
`--learning-rate-multiplier` are `method.<type>.hyperparameters`; `--seed`, `--suffix` and the
files are top-level. The LoRA and sequence knobs have no OpenAI counterpart and go in the
service's `qlora` extension block (TrainSpec field names), as does any `--qlora KEY=VALUE`.
The CLI checks only what it must to build the body: ranges and combinations are the API's to
judge, so its error (code, param) is what the user sees.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

METHODS = ("supervised", "dpo")


class RequestError(ValueError):
    """A flag that cannot be turned into a request (a malformed KEY=VALUE)."""


def parse_pairs(items: Sequence[str], *, flag: str, json_values: bool) -> dict[str, Any]:
    """`KEY=VALUE` flags. With `json_values` a value that parses as JSON is taken as such
    (`--qlora packing=false`, `--qlora target_modules='["q_proj"]'`), else as a string."""
    pairs: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise RequestError(f"{flag} takes KEY=VALUE, got {item!r}")
        value: Any = raw
        if json_values:
            try:
                value = json.loads(raw)
            except ValueError:
                value = raw
        pairs[key] = value
    return pairs


@dataclass
class JobOptions:
    model: str
    training_file: str
    validation_file: str | None = None
    method: str = "supervised"
    epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None
    beta: float | None = None
    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    max_seq_length: int | None = None
    max_steps: int | None = None
    target_modules: str | None = None
    suffix: str | None = None
    seed: int | None = None
    qlora: list[str] = field(default_factory=list)
    metadata: list[str] = field(default_factory=list)

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model, "training_file": self.training_file}
        if self.validation_file is not None:
            body["validation_file"] = self.validation_file
        hyper: dict[str, Any] = {}
        if self.epochs is not None:
            hyper["n_epochs"] = self.epochs
        if self.batch_size is not None:
            hyper["batch_size"] = self.batch_size
        if self.learning_rate_multiplier is not None:
            hyper["learning_rate_multiplier"] = self.learning_rate_multiplier
        if self.beta is not None:
            hyper["beta"] = self.beta  # DPO's; the API says so if the method does not take it
        if hyper or self.method != "supervised":
            method: dict[str, Any] = {"type": self.method}
            if hyper:
                method[self.method] = {"hyperparameters": hyper}
            body["method"] = method
        qlora: dict[str, Any] = {}
        knobs = {
            "rank": self.rank,
            "alpha": self.alpha,
            "dropout": self.dropout,
            "max_seq_length": self.max_seq_length,
            "max_steps": self.max_steps,
        }
        qlora.update({k: v for k, v in knobs.items() if v is not None})
        if self.target_modules is not None:
            names = [n.strip() for n in self.target_modules.split(",") if n.strip()]
            qlora["target_modules"] = "all-linear" if names == ["all-linear"] else names
        qlora.update(parse_pairs(self.qlora, flag="--qlora", json_values=True))
        if qlora:
            body["qlora"] = qlora
        if self.suffix is not None:
            body["suffix"] = self.suffix
        if self.seed is not None:
            body["seed"] = self.seed
        if self.metadata:
            body["metadata"] = parse_pairs(self.metadata, flag="--metadata", json_values=False)
        return body
