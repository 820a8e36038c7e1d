"""The verdicts of the grader's live step, on stand-in runs (the real live runs are in
tests/experiments/test_cli.py and tests/solutions/test_exercise_loop.py)."""

from __future__ import annotations

import pytest

import live.run
from live.run import LiveRunError
from sim.model import Simulation
from solutions.impl import simulate
from solutions.grading import _live_least_connections, _live_rate_limiter
from tests.solutions.mutants import NoCap


def stand_in(monkeypatch, make) -> None:
    """Replace the live run by ``make(scenario)``: what the processes would have reported."""
    monkeypatch.setattr(live.run, "run_live", lambda scenario, **kw: make(scenario))


def test_least_connections_that_behaves_like_round_robin_fails(monkeypatch) -> None:
    stand_in(monkeypatch, lambda s: simulate(s.replace(strategy="round_robin"), "solution"))
    result = _live_least_connections("solution")
    assert not result.passed
    assert "under half of round robin's" in result.message


def test_least_connections_that_behaves_like_the_reference_passes(monkeypatch) -> None:
    stand_in(monkeypatch, lambda s: simulate(s, "solution"))
    assert _live_least_connections("solution").passed


def test_a_bucket_that_refuses_too_little_live_fails(monkeypatch) -> None:
    stand_in(monkeypatch, lambda s: Simulation(s, limiter_cls=NoCap).run().results())
    result = _live_rate_limiter("solution")
    assert not result.passed
    assert "they must agree within 3% of the requests" in result.message


def test_failed_requests_fail_the_step_and_say_how_many(monkeypatch) -> None:
    def with_a_crash(s):
        data = s.to_dict()
        data["nodes"][1]["faults"] = [{"start_s": 4, "end_s": 8, "down": True}]
        return simulate(type(s).from_mapping(data), "solution")
    stand_in(monkeypatch, with_a_crash)
    result = _live_least_connections("solution")
    assert not result.passed
    assert "requests failed (server" in result.message and "testbed live run" in result.message


@pytest.mark.parametrize("step", [_live_least_connections, _live_rate_limiter])
def test_a_run_that_cannot_be_carried_out_fails_with_the_reason(monkeypatch, step) -> None:
    def boom(scenario, **kw):
        raise LiveRunError("balancer (pid 1) exited with status 1 during the run")
    monkeypatch.setattr(live.run, "run_live", boom)
    result = step("solution")
    assert not result.passed
    assert "could not be carried out: balancer (pid 1) exited" in result.message


def test_a_generator_that_fell_behind_does_not_decide_the_step(monkeypatch) -> None:
    # The step judges what the system did; how well this machine's load generator kept up is the run's own
    # warning (and `testbed live run`'s exit status 4), never a failed exercise.
    def behind(s):
        r = simulate(s, "solution")
        r["generator"] = {"kept_up": False, "problems": ["its own delay moved the p99 latency by 9.0 ms of 60.0"]}
        return r
    stand_in(monkeypatch, behind)
    assert _live_least_connections("solution").passed
