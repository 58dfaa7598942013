"""`bench/soak.py`'s accounting: events lost and repeated, turns at the worker, overhead, and
what fails the soak (a lost event, a second completion, a job that never ends, no job at all)."""

from __future__ import annotations

import math

from bench.soak import (
    FaultRecord,
    JobRecord,
    account_events,
    failures,
    report_table,
    summarize,
    turn_times,
)


def job(job_id: str, submit: float, final: float, **fields: object) -> JobRecord:
    record = JobRecord(job_id, submit, final, "succeeded", attempt=1)
    for name, value in fields.items():
        setattr(record, name, value)
    return record


def test_lost_events_are_stored_ones_never_received_and_repeats_are_counted() -> None:
    lost, dupes = account_events([1, 2, 2, 4, 4, 4], [1, 2, 3, 4, 5])
    assert lost == [3, 5] and dupes == 3
    assert account_events([7, 8], [7, 8]) == ([], 0)


def test_a_turn_starts_at_the_submit_or_at_the_previous_jobs_end_whichever_is_later() -> None:
    jobs = [
        job("a", submit=0.0, final=10.0),
        job("b", submit=0.5, final=18.0),  # queued behind a: its turn starts at 10
        job("c", submit=30.0, final=35.0),  # the worker was idle: from its submit
        job("d", submit=31.0, final=math.nan),  # never finished: no turn
    ]
    assert turn_times(jobs) == {"a": 10.0, "b": 8.0, "c": 5.0}


def test_summary_counts_outcomes_faults_and_overhead() -> None:
    jobs = [
        job("a", 0.0, 10.0, stored=[1, 2, 3], received=[1, 2, 3], engine_s=8.0),
        job("b", 1.0, 20.0, stored=[4, 5], received=[4, 4, 5], engine_s=5.0, attempt=2),
        job(
            "c", 2.0, 25.0, stored=[6], received=[6], status="failed", error_code="boom", attempt=3
        ),
    ]
    faults = [
        FaultRecord(20.0, "store", True, "3 of 9 connections faulted"),
        FaultRecord(40.0, "database", True, "2 worker connections terminated"),
        FaultRecord(60.0, "worker", False, "no worker running"),
    ]
    report = summarize("services", jobs, faults, minutes=1, fault_every_s=20, orphans=0, wall_s=70)
    assert (report.succeeded, report.failed, report.other_final) == (2, {"boom": 1}, {})
    assert report.attempts == {1: 1, 2: 1, 3: 1} and report.attempts_max == 3
    assert report.faults == {"store": 1, "database": 1, "worker": 0}
    assert (report.events_lost, report.duplicate_events) == (0, 1)
    assert math.isclose(report.overhead_one_attempt_median, 0.2)  # (10 - 8) / 10
    assert math.isclose(report.overhead_all, 1 - 13 / 20)  # turns 10 + 10, engine 8 + 5
    assert failures(report) == []
    assert report.slowest_job == "c" and report.slowest_job_s == 23.0
    assert "duplicate completions (must be 0)" in report_table([report])
    assert "slowest job" in report_table([report])


def test_a_lost_event_or_a_second_completion_fails_the_soak() -> None:
    lost = summarize(
        "embedded",
        [job("a", 0.0, 5.0, stored=[1, 2], received=[1], engine_s=4.0)],
        [],
        minutes=1,
        fault_every_s=20,
        orphans=0,
        wall_s=60,
    )
    assert lost.events_lost == 1 and lost.lost_by_job == {"a": [2]}
    twice = summarize(
        "embedded",
        [job("a", 0.0, 5.0, succeeded_transitions=2, adapters=1, engine_s=4.0)],
        [],
        minutes=1,
        fault_every_s=20,
        orphans=0,
        wall_s=60,
    )
    nothing = summarize("embedded", [], [], minutes=1, fault_every_s=20, orphans=0, wall_s=60)
    assert len(failures(lost)) == 1 and "events lost" in failures(lost)[0]
    assert len(failures(twice)) == 1 and "completed twice" in failures(twice)[0]
    assert failures(nothing) == ["embedded: no job completed"]
    stuck = summarize(
        "services",
        [
            job("a", 0.0, 5.0, engine_s=4.0),
            job("b", 1.0, math.nan, status="unfinished"),  # its slot gave up in the drain
        ],
        [],
        minutes=1,
        fault_every_s=20,
        orphans=0,
        wall_s=60,
    )
    assert stuck.other_final == {"unfinished": 1}
    assert failures(stuck) == ["services: 1 jobs did not end within the drain"]
