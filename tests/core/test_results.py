"""Reading live responses back as outcomes, and the summary's counting."""

from __future__ import annotations

import math

import pytest

from core.results import ERROR_CODES, OUTCOME_STATUS, Outcome, RequestLog, outcome_of, summarize


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
