"""The results CSV: one row per step from the engine's history and the metrics events."""

from __future__ import annotations

import csv
import io

from shared.jobs import results


def test_rows_merge_history_and_events_and_a_repeated_step_keeps_the_later_figure() -> None:
    history = [
        {"step": 1, "loss": 2.5, "lr": 1e-3},
        {"step": 2, "loss": 2.0, "lr": 1e-3},
        {"step": 2, "loss": 1.9, "lr": 1e-3},  # redone after a resume
        {"step": 3, "loss": float("nan"), "lr": 5e-4},
    ]
    events = [
        {"step": 0, "eval_loss": 3.5, "perplexity": 33.1},  # before training: not a row
        {"step": 1, "loss": 2.5, "tokens_per_second": 100.0},
        {"step": 2, "eval_loss": 1.75, "perplexity": 5.75},
        {"step": True, "loss": 9.0},  # not a step
        {"message": "no step at all"},
    ]
    rows = results.build_rows(history, events)
    assert [r["step"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["train_loss"] == "2.5" and rows[0]["tokens_per_second"] == "100.0"
    assert rows[1]["train_loss"] == "1.9" and rows[1]["valid_loss"] == "1.75"
    assert rows[2]["train_loss"] == "" and rows[2]["learning_rate"] == "0.0005"
    parsed = list(csv.DictReader(io.StringIO(results.render_csv(rows).decode())))
    assert tuple(parsed[0]) == results.COLUMNS
    assert parsed[1]["valid_loss"] == "1.75" and parsed[1]["train_mean_token_accuracy"] == ""


def test_an_empty_run_still_has_the_header() -> None:
    assert results.render_csv(results.build_rows([], [])).decode().strip() == ",".join(
        results.COLUMNS
    )
