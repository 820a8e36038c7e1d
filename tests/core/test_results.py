"""Reading live responses back as outcomes, and the summary's counting."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.results import (
    COLUMNS, ERROR_CODES, OUTCOME_STATUS, Outcome, RequestLog, new_summary, outcome_of, results_of, summarize,
)


@pytest.mark.parametrize("status, code, outcome", [
    (200, None, Outcome.OK),
    (429, "rate_limited", Outcome.RATE_LIMITED),
    (429, "backpressure", Outcome.BACKPRESSURE),
    (503, "circuit_open", Outcome.CIRCUIT_OPEN),
    (500, "work_failed", Outcome.SERVER_ERROR),
    (502, "backend_error", Outcome.SERVER_ERROR),
    (502, "backend_unreachable", Outcome.CONNECT_ERROR),
    (503, "no_healthy_backend", Outcome.NO_BACKEND),
    (504, "backend_timeout", Outcome.TIMEOUT),
    # no code we know: the status decides
    (429, None, Outcome.RATE_LIMITED),
    (504, "something_else", Outcome.TIMEOUT),
    (404, "not_found", Outcome.SERVER_ERROR),
    (500, None, Outcome.SERVER_ERROR),
])
def test_outcome_of(status: int, code: str | None, outcome: Outcome) -> None:
    assert outcome_of(status, code) is outcome


def test_every_error_code_reads_back_as_an_outcome_with_its_status() -> None:
    for code, outcome in ERROR_CODES.items():
        assert outcome_of(OUTCOME_STATUS[outcome], code) is outcome
    assert {o for o in Outcome if o is not Outcome.OK} <= set(ERROR_CODES.values())


def test_summary_counts_timeouts_as_errors_and_only_the_window() -> None:
    log = RequestLog()
    log.record(0.5, 0, 0.5, 0.6, Outcome.OK)          # before the warm-up: not counted
    log.record(1.0, 0, 1.0, 1.1, Outcome.OK)
    log.record(2.0, 1, 2.0, 2.3, Outcome.OK)
    log.record(3.0, 1, math.nan, 33.0, Outcome.TIMEOUT)
    log.record(4.0, -1, math.nan, 4.0, Outcome.NO_BACKEND)
    log.record(10.0, 0, 10.0, 10.1, Outcome.OK)       # after the end: not counted
    r = summarize(log, scenario="t", mode="live", seed=0, strategy="round_robin", duration_s=10.0, warmup_s=1.0,
                  node_ids=["a", "b"], node_workers=[1, 1])
    assert r["requests"] == {"sent": 4, "ok": 2, "rate_limited": 0, "backpressure": 0, "circuit_open": 0,
                             "errors": 2}
    assert r["errors_detail"] == {"server": 0, "connect": 0, "no_backend": 1, "timeout": 1, "not_sent": 0}
    assert r["nodes"]["a"]["requests"] == 1 and r["nodes"]["b"]["requests"] == 2
    assert r["latency_ms"]["max"] == pytest.approx(300.0)


def test_requests_the_generator_never_sent_count_as_sent_and_failed_in_the_window() -> None:
    log = RequestLog()
    log.record(2.0, 0, 2.0, 2.1, Outcome.OK)
    r = summarize(log, scenario="t", mode="live", seed=0, strategy="round_robin", duration_s=10.0, warmup_s=1.0,
                  node_ids=["a"], node_workers=[1], not_sent=[0.5, 3.0, 4.0, 9.9, 10.0])
    assert r["requests"]["sent"] == 4 and r["requests"]["ok"] == 1 and r["requests"]["errors"] == 3
    assert r["errors_detail"]["not_sent"] == 3
    assert r["nodes"]["a"]["requests"] == 1 and r["nodes"]["a"]["share"] == 1.0  # the balancer never saw them


def rows_of(chunks: list[dict]) -> dict:
    return {k: np.concatenate([c[k] for c in chunks]) for k in COLUMNS}


def test_a_log_that_does_not_keep_its_rows_holds_one_chunk_at_most_and_hands_every_row_on() -> None:
    handed: list[dict] = []
    log = RequestLog(keep=False, sinks=[handed.append], chunk_rows=3)
    for i in range(8):
        log.record(float(i), i % 2, float(i), i + 0.5, Outcome.OK)
        assert len(log.columns()["arrival"]) < 3  # a full chunk goes at once
    assert len(log) == 8 and [len(c["arrival"]) for c in handed] == [3, 3]
    log.flush()
    log.flush()  # nothing new: nothing handed twice
    assert [len(c["arrival"]) for c in handed] == [3, 3, 2] and len(log) == 8
    rows = rows_of(handed)
    assert rows["arrival"].tolist() == [float(i) for i in range(8)] and rows["node"].tolist() == [0, 1] * 4
    assert {k: v.dtype for k, v in rows.items()} == {k: np.dtype(t) for k, t in COLUMNS.items()}


def test_a_log_that_keeps_its_rows_hands_them_on_in_the_same_chunks_when_flushed() -> None:
    kept: list[dict] = []
    log = RequestLog(sinks=[kept.append], chunk_rows=3)
    for i in range(8):
        log.record(float(i), 0, math.nan, i + 0.5, Outcome.TIMEOUT)
    assert not kept and len(log.columns()["arrival"]) == 8
    log.flush()
    log.record(8.0, 0, math.nan, 8.5, Outcome.OK)
    log.flush()
    assert [len(c["arrival"]) for c in kept] == [3, 3, 2, 1] and len(log.columns()["arrival"]) == 9


def test_chunk_rows_must_be_positive() -> None:
    with pytest.raises(ValueError, match="chunk_rows must be at least 1, got 0"):
        RequestLog(chunk_rows=0)


def test_a_summary_folded_as_the_rows_came_gives_the_logs_results() -> None:
    """What the simulator does (fold each chunk, forget it) and what a live run does (keep the rows,
    summarize at the end) give the same JSON."""
    rng = np.random.default_rng(4)
    summary = new_summary(warmup_s=1.0, duration_s=50.0, nodes=3)
    bounded = RequestLog(keep=False, sinks=[summary.fold], chunk_rows=1000)
    kept = RequestLog(chunk_rows=1000)
    for i in range(12_345):
        arrival = i * 0.004
        row = (arrival, int(rng.integers(-1, 3)), arrival, arrival + float(rng.exponential(0.05)),
               int(rng.choice([Outcome.OK, Outcome.OK, Outcome.SERVER_ERROR])))
        bounded.record(*row)
        kept.record(*row)
    bounded.flush()
    args = dict(scenario="t", mode="sim", seed=0, strategy="round_robin", node_ids=["a", "b", "c"],
                node_workers=[1, 2, 1])
    folded = results_of(summary, **args)
    assert folded == summarize(kept, duration_s=50.0, warmup_s=1.0, **args)
    assert folded["requests"]["sent"] == 12_345 - 250  # the arrivals from 1 s on (i >= 250)
    assert folded["nodes"]["a"]["latency_ms"]["p99"] is not None
