"""Rows to tokens to batches: completion-only labels, truncation, packing, data order.

* Rows are read with `shared.dataset_format.detect_row_format`, the upload validator's rules;
  a file must hold one format.
* `chat` rows (tools, tool calls and results, content parts, weights) are rendered with the
  base model's chat template, which decides the trained tokens (`worker.training.chat`):
  assistant turns with weight 1, their end-of-turn token included. `prompt`/`completion`
  rows are `prompt + completion` tokenized together (with the tokenizer's BOS) and EOS; only
  the completion and EOS are trained. Alpaca rows use the Alpaca prompt and train on
  `output`. `text` rows train on every token.
* A row the template cannot render is reported with its line, all such rows at once, when
  the rows are tokenized: before the base model loads and before any step.
* Every sequence is cut to `max_seq_length` tokens; truncated rows are counted, rows left with
  no trained token are dropped and counted.
* The data order of an epoch is a pure function of `(seed, epoch)`, so a resumed run replays it.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from shared.dataset_format import DatasetFormat, RowError, detect_row_format, parse_row
from worker.training.chat import RenderError, chat_sequences, completion_sequence

IGNORE_INDEX = -100
ALPACA_PROMPT = (
    "Below is an instruction that describes a task{with_input}. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n{input_block}### Response:\n"
)
# Length-grouped batching sorts windows of this many batches by length.
LENGTH_GROUP_BATCHES = 64
# Unrenderable rows: how many reasons, and line numbers per reason, an error message lists
# (a tenant sees about 500 characters of it).
REPORTED_REASONS = 3
REPORTED_LINES = 8


class Tokenizer(Protocol):
    """The slice of a transformers tokenizer the engine uses."""

    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None

    def __call__(self, text: str, **kwargs: Any) -> Any: ...

    def apply_chat_template(self, conversation: Any, **kwargs: Any) -> Any: ...

    def get_chat_template(self, chat_template: str | None = ..., tools: Any = ...) -> str: ...


class DataError(ValueError):
    """A dataset file the engine cannot train on; the message names the line."""


class Row(dict[str, Any]):
    """A row as read from a file, remembering where it was, so that a problem found later
    (the chat template cannot render it) names the line."""

    source: str = ""
    line: int = 0


@dataclass(frozen=True)
class Example:
    """One tokenized row: `trained[t]` says whether token t is a prediction target."""

    input_ids: list[int]
    trained: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)

    def target_count(self) -> int:
        """Tokens with a loss: trained tokens that have a previous token to predict them."""
        return sum(self.trained[1:])


@dataclass(frozen=True)
class TokenizedSplit:
    examples: list[Example]
    truncated_rows: int
    dropped_rows: int


@dataclass(frozen=True)
class Batch:
    """A micro-batch ready for the model. `targets[b, t]` is the token to predict at t."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    targets: torch.Tensor
    real_tokens: int
    processed_tokens: int
    target_tokens: int

    def to(self, device: torch.device) -> Batch:
        mask = None if self.attention_mask is None else self.attention_mask.to(device)
        return Batch(
            input_ids=self.input_ids.to(device),
            position_ids=self.position_ids.to(device),
            attention_mask=mask,
            targets=self.targets.to(device),
            real_tokens=self.real_tokens,
            processed_tokens=self.processed_tokens,
            target_tokens=self.target_tokens,
        )


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Read a JSONL file of one row format; raises DataError naming the bad line. The rows
    are `Row`s: they remember their file and line."""
    rows: list[dict[str, Any]] = []
    first: DatasetFormat | None = None
    with Path(path).open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:  # the same rules as the upload check: strict JSON, then one row format
                row = parse_row(line)
                fmt = detect_row_format(row)
            except RowError as exc:
                raise DataError(f"{path}:{number}: {exc.reason}") from exc
            if first is None:
                first = fmt
            elif fmt is not first:
                raise DataError(f"{path}:{number}: {fmt.value} row in a {first.value} file")
            located = Row(row)
            located.source, located.line = str(path), number
            rows.append(located)
    if not rows:
        raise DataError(f"{path}: no rows")
    return rows


def _ids(tokenizer: Tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _eos(tokenizer: Tokenizer) -> list[int]:
    return [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]


def row_examples(row: dict[str, Any], tokenizer: Tokenizer) -> list[Example]:
    """Tokens and trained-mask of one valid row (not yet truncated): one example, or for a
    chat whose template rewrites earlier turns, one per such turn. Raises `RenderError` when
    the chat template cannot render the row."""
    fmt = detect_row_format(row)
    if fmt is DatasetFormat.CHAT:
        return [Example(ids, trained) for ids, trained in chat_sequences(tokenizer, row)]
    if fmt is DatasetFormat.TEXT:
        ids = _ids(tokenizer, row["text"], special=True) + _eos(tokenizer)
        return [Example(ids, [True] * len(ids))]
    if fmt is DatasetFormat.COMPLETION:
        prompt, completion = row["prompt"], row["completion"]
    elif fmt is DatasetFormat.ALPACA:
        extra = row.get("input") or ""
        prompt = ALPACA_PROMPT.format(
            with_input=", paired with an input that provides further context" if extra else "",
            instruction=row["instruction"],
            input_block=f"### Input:\n{extra}\n\n" if extra else "",
        )
        completion = row["output"]
    else:
        raise DataError(f"{fmt.value} rows are not supervised training rows")
    return [Example(*completion_sequence(tokenizer, prompt, completion))]


def tokenize_row(row: dict[str, Any], tokenizer: Tokenizer) -> Example:
    """The one example of a row that renders as one sequence (see `row_examples`)."""
    examples = row_examples(row, tokenizer)
    if len(examples) != 1:
        raise ValueError(f"the row renders as {len(examples)} sequences; use row_examples")
    return examples[0]


def _unrenderable(problems: dict[str, list[tuple[str, int]]]) -> DataError:
    """One error for every row the template cannot render: lines grouped by reason."""
    count = sum(len(places) for places in problems.values())
    parts = []
    for reason, places in list(problems.items())[:REPORTED_REASONS]:
        by_source: dict[str, list[int]] = {}
        for source, line in places:
            by_source.setdefault(source, []).append(line)
        wheres = []
        for source, lines in by_source.items():
            shown = ", ".join(str(n) for n in lines[:REPORTED_LINES])
            more = f" (+{len(lines) - REPORTED_LINES} more)" if len(lines) > REPORTED_LINES else ""
            noun = "line" if len(lines) == 1 else "lines"
            wheres.append(f"{source}: {noun} {shown}{more}" if source else f"{noun} {shown}{more}")
        parts.append(f"{'; '.join(wheres)}: {reason}")
    others = sum(len(places) for places in list(problems.values())[REPORTED_REASONS:])
    if others:
        parts.append(f"{others} more row(s) for other reasons")
    return DataError(f"{count} row(s) cannot be rendered: " + "; ".join(parts))


def tokenize_rows(
    rows: Sequence[dict[str, Any]], tokenizer: Tokenizer, max_seq_length: int
) -> TokenizedSplit:
    """Tokenize and truncate; examples without any trained token left are dropped. Rows the
    chat template cannot render are all reported in one `DataError`, by line (a row read by
    `read_rows` knows its file and line; others are numbered from 1)."""
    examples: list[Example] = []
    truncated = dropped = 0
    problems: dict[str, list[tuple[str, int]]] = {}
    for index, row in enumerate(rows):
        try:
            row_parts = row_examples(row, tokenizer)
        except RenderError as exc:
            place = (row.source, row.line) if isinstance(row, Row) else ("", index + 1)
            problems.setdefault(exc.reason, []).append(place)
            continue
        for example in row_parts:
            if len(example) > max_seq_length:
                truncated += 1
                example = Example(
                    example.input_ids[:max_seq_length], example.trained[:max_seq_length]
                )
            if example.target_count() == 0:
                dropped += 1
                continue
            examples.append(example)
    if problems:
        raise _unrenderable(problems)
    return TokenizedSplit(examples, truncated, dropped)


def split_rows(
    rows: list[dict[str, Any]], fraction: float, seed: int
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Deterministic (seeded) held-out split: returns (train, validation)."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(f"validation-split:{seed}").shuffle(order)
    n_val = min(len(rows) - 1, max(1, round(fraction * len(rows))))
    held = set(order[:n_val])
    train = [r for i, r in enumerate(rows) if i not in held]
    return train, [rows[i] for i in sorted(held)]


def epoch_batches(
    lengths: Sequence[int],
    batch_size: int,
    seed: int,
    epoch: int,
    *,
    packing: bool,
    max_tokens: int | None = None,
) -> list[list[int]]:
    """Example indices of every micro-batch of `epoch`, a pure function of its arguments.

    Packed batches are consecutive chunks of a seeded permutation: `batch_size` examples, or
    with `max_tokens` as many as fit that many tokens (a batch closes when the next example
    would overflow it; every example is at most `max_tokens` long). Padded batches are
    length-grouped: windows of `LENGTH_GROUP_BATCHES` batches are sorted by length before
    chunking (so a batch pads little), then the batch order is shuffled.
    """
    rng = random.Random(f"data-order:{seed}:{epoch}")
    order = list(range(len(lengths)))
    rng.shuffle(order)
    if packing and max_tokens is not None:
        return token_budget_batches(order, lengths, max_tokens)
    if packing:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * LENGTH_GROUP_BATCHES
    batches: list[list[int]] = []
    for start in range(0, len(order), window):
        group = sorted(order[start : start + window], key=lambda i: -lengths[i])
        batches.extend(group[i : i + batch_size] for i in range(0, len(group), batch_size))
    rng.shuffle(batches)
    return batches


def token_budget_batches(
    order: Sequence[int], lengths: Sequence[int], max_tokens: int
) -> list[list[int]]:
    """Consecutive runs of `order` holding at most `max_tokens` tokens each (greedy, in
    order, so the data order stays the seeded permutation's)."""
    batches: list[list[int]] = []
    current: list[int] = []
    filled = 0
    for i in order:
        if lengths[i] > max_tokens:
            raise ValueError(f"an example of {lengths[i]} tokens exceeds max_tokens_per_batch")
        if current and filled + lengths[i] > max_tokens:
            batches.append(current)
            current, filled = [], 0
        current.append(i)
        filled += lengths[i]
    if current:
        batches.append(current)
    return batches


def steps_per_epoch(n_examples: int, batch_size: int, accumulation: int) -> int:
    return math.ceil(math.ceil(n_examples / batch_size) / accumulation)


def _targets(example: Example) -> list[int]:
    ids, trained = example.input_ids, example.trained
    return [ids[t + 1] if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [
        IGNORE_INDEX
    ]


def collate(examples: Sequence[Example], *, packing: bool, pad_id: int) -> Batch:
    """Packed: one row, positions restarting per example, no attention mask (the model
    derives per-example causal attention from position_ids). Padded: right padding with an
    attention mask."""
    real = sum(len(e) for e in examples)
    n_targets = sum(e.target_count() for e in examples)
    if packing:
        ids = [t for e in examples for t in e.input_ids]
        positions = [p for e in examples for p in range(len(e))]
        targets = [t for e in examples for t in _targets(e)]
        return Batch(
            input_ids=torch.tensor([ids]),
            position_ids=torch.tensor([positions]),
            attention_mask=None,
            targets=torch.tensor([targets]),
            real_tokens=real,
            processed_tokens=real,
            target_tokens=n_targets,
        )
    width = max(len(e) for e in examples)
    rows, masks, tgts = [], [], []
    for e in examples:
        pad = width - len(e)
        rows.append(e.input_ids + [pad_id] * pad)
        masks.append([1] * len(e) + [0] * pad)
        tgts.append(_targets(e) + [IGNORE_INDEX] * pad)
    input_ids = torch.tensor(rows)
    return Batch(
        input_ids=input_ids,
        position_ids=torch.arange(width).expand_as(input_ids).contiguous(),
        attention_mask=torch.tensor(masks),
        targets=torch.tensor(tgts),
        real_tokens=real,
        processed_tokens=width * len(examples),
        target_tokens=n_targets,
    )
