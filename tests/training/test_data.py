"""Rows to examples: completion-only labels, truncation, data order, collation."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from tests.training.helpers import write_jsonl
from worker.training.data import (
    IGNORE_INDEX,
    DataError,
    Example,
    collate,
    epoch_batches,
    read_rows,
    split_rows,
    tokenize_row,
    tokenize_rows,
)
from worker.training.model import load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir: Path) -> Any:
    return load_tokenizer(tiny_model_dir)


def trained_text(tokenizer: Any, example: Example) -> str:
    ids = [t for t, keep in zip(example.input_ids, example.trained, strict=True) if keep]
    return str(tokenizer.decode(ids))


def test_chat_trains_only_assistant_turns(tokenizer: Any) -> None:
    row = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "ANSWER-ONE"},
            {"role": "user", "content": "second question"},
            {"role": "assistant", "content": "ANSWER-TWO"},
        ]
    }
    example = tokenize_row(row, tokenizer)
    assert trained_text(tokenizer, example) == "ANSWER-ONE<|eos|>ANSWER-TWO<|eos|>"
    full = tokenizer.decode(example.input_ids)
    assert full.startswith("<|bos|><|system|>be brief")


def test_completion_trains_only_completion(tokenizer: Any) -> None:
    example = tokenize_row({"prompt": "2+2=", "completion": "4"}, tokenizer)
    assert tokenizer.decode(example.input_ids) == "<|bos|>2+2=4<|eos|>"
    assert trained_text(tokenizer, example) == "4<|eos|>"


def test_alpaca_trains_only_output(tokenizer: Any) -> None:
    row = {"instruction": "Add.", "input": "2 and 2", "output": "four"}
    example = tokenize_row(row, tokenizer)
    assert trained_text(tokenizer, example) == "four<|eos|>"
    assert "### Input:\n2 and 2" in tokenizer.decode(example.input_ids)


def test_text_trains_everything(tokenizer: Any) -> None:
    example = tokenize_row({"text": "abc"}, tokenizer)
    assert all(example.trained)
    assert example.target_count() == len(example) - 1


def test_targets_are_next_tokens_of_trained_positions(tokenizer: Any) -> None:
    example = tokenize_row({"prompt": "ab", "completion": "cd"}, tokenizer)
    batch = collate([example], packing=True, pad_id=tokenizer.pad_token_id)
    targets = batch.targets[0].tolist()
    # <bos> a b | c d <eos>: positions of "b", "c", "d" predict "c", "d", "<eos>"
    ids = example.input_ids
    assert targets == [IGNORE_INDEX, IGNORE_INDEX, ids[3], ids[4], ids[5], IGNORE_INDEX]


def test_truncation_is_counted_and_empty_rows_dropped(tokenizer: Any) -> None:
    rows = [
        {"prompt": "p" * 5, "completion": "c" * 5},  # 12 tokens: fits in 16
        {"prompt": "p" * 5, "completion": "c" * 30},  # truncated, keeps some completion
        {"prompt": "p" * 40, "completion": "c"},  # truncated inside the prompt: dropped
    ]
    split = tokenize_rows(rows, tokenizer, max_seq_length=16)
    assert split.truncated_rows == 2
    assert split.dropped_rows == 1
    assert [len(e) for e in split.examples] == [12, 16]


def test_read_rows_names_the_bad_line(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": "ok"}, {"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError, match=r"d.jsonl:2: prompt_completion row in a text file"):
        read_rows(path)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.jsonl:2: field 'text' must be a string"):
        read_rows(bad)


@pytest.mark.parametrize(
    "line",
    ['{"text": 1' + "0" * 5000 + "}", '{"text": NaN}', '{"text": 1e999}', "[" * 100_000],
)
def test_read_rows_applies_the_upload_checks_strict_json(tmp_path: Path, line: str) -> None:
    """Training reads rows by the upload check's rules: what json.loads would take or choke on
    differently (a 5000-digit integer, NaN, an overflowing float, deep nesting) is a DataError
    naming the line, never another exception."""
    path = tmp_path / "odd.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"odd.jsonl:2: "):
        read_rows(path)


def test_data_order_is_a_function_of_seed_and_epoch() -> None:
    lengths = list(range(1, 41))
    a = epoch_batches(lengths, 4, seed=3, epoch=0, packing=True)
    assert a == epoch_batches(lengths, 4, seed=3, epoch=0, packing=True)
    assert a != epoch_batches(lengths, 4, seed=3, epoch=1, packing=True)
    assert a != epoch_batches(lengths, 4, seed=4, epoch=0, packing=True)
    assert sorted(i for b in a for i in b) == list(range(40))


def test_padded_batches_are_length_grouped() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(64)]
    batches = epoch_batches(lengths, 8, seed=0, epoch=0, packing=False)
    grouped = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    shuffled = epoch_batches(lengths, 8, seed=0, epoch=0, packing=True)
    random_pad = sum(max(lengths[i] for i in b) * len(b) for b in shuffled)
    assert grouped < 0.75 * random_pad
    assert sorted(i for b in batches for i in b) == list(range(64))


def test_token_budget_batches_fill_to_the_budget_in_the_seeded_order() -> None:
    lengths = [(i * 37) % 100 + 1 for i in range(200)]
    budget = 256
    batches = epoch_batches(lengths, 4, seed=0, epoch=0, packing=True, max_tokens=budget)
    order = [i for b in batches for i in b]
    assert sorted(order) == list(range(200))  # every example once
    sizes = [sum(lengths[i] for i in b) for b in batches]
    assert max(sizes) <= budget
    # a batch closes only when the next example would overflow it
    pairs = zip(sizes[:-1], batches[1:], strict=True)
    assert all(size + lengths[nxt[0]] > budget for size, nxt in pairs)
    # the order is the seeded permutation's, the same as the example-count batches'
    assert order == [i for b in epoch_batches(lengths, 4, seed=0, epoch=0, packing=True) for i in b]
    # full batches: on average far more than batch_size examples of these lengths
    assert sum(sizes[:-1]) / (len(sizes) - 1) > 0.8 * budget
    assert epoch_batches(lengths, 4, seed=0, epoch=1, packing=True, max_tokens=budget) != batches
    with pytest.raises(ValueError, match="exceeds max_tokens_per_batch"):
        epoch_batches([300], 4, seed=0, epoch=0, packing=True, max_tokens=budget)


def test_validation_split_is_seeded_and_disjoint() -> None:
    rows = [{"text": str(i)} for i in range(100)]
    train, val = split_rows(rows, 0.1, seed=5)
    assert len(val) == 10 and len(train) == 90
    assert split_rows(rows, 0.1, seed=5) == (train, val)
    assert split_rows(rows, 0.1, seed=6)[1] != val
    assert not {r["text"] for r in val} & {r["text"] for r in train}


def test_collate_packed_and_padded(tokenizer: Any) -> None:
    a = Example([1, 2, 3], [False, True, True])
    b = Example([4, 5], [False, True])
    packed = collate([a, b], packing=True, pad_id=0)
    assert packed.input_ids.tolist() == [[1, 2, 3, 4, 5]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 0, 1]]
    assert packed.attention_mask is None
    assert packed.processed_tokens == packed.real_tokens == 5
    padded = collate([a, b], packing=False, pad_id=0)
    assert padded.input_ids.tolist() == [[1, 2, 3], [4, 5, 0]]
    assert torch.equal(padded.attention_mask, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    assert padded.processed_tokens == 6 and padded.real_tokens == 5
    assert padded.targets.tolist() == [[2, 3, IGNORE_INDEX], [5, IGNORE_INDEX, IGNORE_INDEX]]


def test_unrenderable_rows_are_grouped_by_reason_with_their_lines(tmp_path: Path) -> None:
    """Every row the template refuses is named, grouped by reason; the message stays short."""
    from tests.training.test_templates import GEMMA, byte_tokenizer

    tokenizer = byte_tokenizer(GEMMA, ["<start_of_turn>", "<end_of_turn>"])
    ok = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}
    bad = {"messages": [{"role": "system", "content": "x"}, *ok["messages"]]}
    path = write_jsonl(tmp_path / "t.jsonl", [bad if i % 2 else ok for i in range(30)])
    with pytest.raises(DataError) as info:
        tokenize_rows(read_rows(path), tokenizer, 64)
    assert str(info.value) == (
        f"15 row(s) cannot be rendered: {path}: lines 2, 4, 6, 8, 10, 12, 14, 16 (+7 more): "
        "the base model's chat template refuses the row: System role not supported"
    )
    # rows not read from a file are numbered from 1
    with pytest.raises(DataError, match=r"^1 row\(s\) cannot be rendered: line 2: "):
        tokenize_rows([ok, bad], tokenizer, 64)
