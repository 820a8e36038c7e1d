"""Hung backends: the stall rule on its own and through the balancer's books (literal times)."""

from __future__ import annotations

import math
import random

import pytest

from core._validate import ConfigError
from core.balancer_state import BalancerState
from core.circuit_breaker import State
from core.outlier import StallClock, Stalled, StallRule
from core.scenario import BalancerSpec
from core.strategies import NoHealthyBackend, RoundRobinStrategy
from solutions.least_connections_solution import LeastConnectionsSolution


def books(n: int = 2, strategy=RoundRobinStrategy, rule: StallRule | None = StallRule(0.5, 10.0),
          **spec) -> BalancerState:
    state = BalancerState(BalancerSpec(**spec), strategy(rng=random.Random(1)))
    state.stall_rule = rule
    for i in range(n):
        state.add(f"n{i + 1}", f"http://127.0.0.1:{5001 + i}")
    return state


# -- the rule -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ewma, threshold", [(None, 5.0), (0.001, 0.5), (0.05, 0.5), (0.2, 2.0), (3.0, 30.0)])
def test_the_threshold_is_the_floor_or_factor_ewmas_and_cautious_before_any_answer(ewma, threshold) -> None:
    assert StallRule(0.5, 10.0).threshold_s(ewma) == pytest.approx(threshold)


@pytest.mark.parametrize("kwargs", [{"floor_s": 0}, {"floor_s": -1}, {"floor_s": math.inf}, {"factor": 0.5}])
def test_bad_rules_name_the_field(kwargs) -> None:
    with pytest.raises(ConfigError, match=next(iter(kwargs))):
        StallRule(**kwargs)


def test_the_clock_never_goes_back() -> None:
    clock = StallClock()
    clock.mark(5.0)
    clock.mark(4.0)  # a now from the past counts as no time passing
    assert clock.since == 5.0 and clock.silent_s(4.0) == 0.0 and clock.silent_s(5.5) == 0.5


# -- through the books ------------------------------------------------------------------------------------
def hang(state: BalancerState, backend: str, *, at: float, requests: int = 3) -> list:
    """Send ``requests`` attempts to ``backend`` at ``at`` (the others excluded); none is answered."""
    others = [b for b in state.backends if b != backend]
    return [state.pick(now=at, exclude=others) for _ in range(requests)]


def test_a_silent_backend_holding_requests_is_ejected_at_the_next_pick_of_it() -> None:
    state = books()
    n1 = state.backends["n1"]
    # A healthy history: answers in 10 ms, so the EWMA is 0.01 and the threshold the 0.5 s floor.
    for t in (0.0, 0.1, 0.2):
        state.answered(state.pick(now=t, exclude=["n2"]), status=200, elapsed_s=0.01, now=t + 0.01)
    hang(state, "n1", at=1.0)
    assert state.pick(now=1.5, exclude=["n2"]).backend is n1  # 0.5 s of silence: not yet
    assert n1.ejector.state is State.CLOSED
    # Round robin gives n1 one of the next two picks: it is judged, ejected, and n2 gets both.
    assert [state.pick(now=1.51).backend.id for _ in range(2)] == ["n2", "n2"]
    assert n1.ejector.state is State.OPEN and not n1.available(1.51) and n1.stall.stalls == 1
    [event] = state.drain_stalls()
    assert event == Stalled("n1", 1.51, pytest.approx(0.51), 0.5, 4)  # 3 hung + the one picked at 1.5
    assert all(state.pick(now=1.6 + i / 100).backend.id == "n2" for i in range(5))  # out of rotation


def test_a_slow_backend_that_answers_is_not_stalled() -> None:
    state = books(1)
    n1 = state.backends["n1"]
    t = 0.0
    for _ in range(20):  # one answer every 0.8 s, each taking 0.8 s: slow, but never silent for 10 EWMAs
        attempt = state.pick(now=t)
        state.pick(now=t + 0.4)  # a second request waits behind it
        state.answered(attempt, status=200, elapsed_s=0.8, now=t + 0.8)
        t += 0.8
        state.tick(now=t + 0.79)
    assert n1.ejector.state is State.CLOSED and n1.stall.stalls == 0


def test_an_answer_or_going_idle_restarts_the_clock() -> None:
    state = books(1)
    n1 = state.backends["n1"]
    a, b = state.pick(now=0.0), state.pick(now=0.0)
    state.answered(a, status=500, elapsed_s=0.4, now=0.4)  # a 500 is an answer: the backend is alive
    state.tick(now=5.3)  # 4.9 s since that answer, below the 5 s used before any latency is known
    assert n1.ejector.state is State.CLOSED
    state.answered(b, status=200, elapsed_s=5.3, now=5.3)  # idle now; EWMA 5.3 s
    state.pick(now=100.0)  # busy again: silence counts from here, not from the last answer
    state.tick(now=100.4)
    assert n1.ejector.state is State.CLOSED


@pytest.mark.parametrize("status, is_answer", [(200, True), (404, True), (500, True), (503, True),
                                               (502, False), (504, False)])
def test_the_balancers_own_502_and_504_are_not_answers(status: int, is_answer: bool) -> None:
    state = books(1, eject_after_failures=100)
    n1 = state.backends["n1"]
    held = state.pick(now=0.0)
    state.answered(state.pick(now=0.0), status=status, elapsed_s=1.0, now=1.0)
    assert n1.active == 1 and held.backend is n1
    state.tick(now=5.5)  # 5.5 s since the pick, 4.5 s since the status at 1.0; no EWMA: 5 s threshold
    assert (n1.ejector.state is State.CLOSED) is is_answer


def test_the_tick_finds_a_backend_the_strategy_stopped_picking() -> None:
    """Least connections avoids a backend that piles up requests, so no pick ever judges it again."""
    state = books(2, LeastConnectionsSolution)
    n1 = state.backends["n1"]
    for t in (0.0, 0.1):
        state.answered(state.pick(now=t, exclude=["n2"]), status=200, elapsed_s=0.01, now=t + 0.01)
    hang(state, "n1", at=1.0, requests=5)
    for i in range(50):  # n2 answers everything at once; least connections never picks n1 (5 in flight)
        attempt = state.pick(now=1.0 + i / 50)
        assert attempt.backend.id == "n2"
        state.answered(attempt, status=200, elapsed_s=0.001, now=1.0 + i / 50)
    assert n1.ejector.state is State.CLOSED
    state.tick(now=2.0)
    assert n1.ejector.state is State.OPEN and [e.backend for e in state.drain_stalls()] == ["n1"]


def test_only_a_closed_ejector_is_judged_and_a_probe_that_answers_brings_it_back() -> None:
    state = books(1, ejection_time_s=5.0)
    n1 = state.backends["n1"]
    state.answered(state.pick(now=0.0), status=200, elapsed_s=0.01, now=0.01)
    hang(state, "n1", at=1.0)
    state.tick(now=2.0)
    assert n1.ejector.state is State.OPEN and n1.stall.stalls == 1
    state.tick(now=3.0)  # still silent, already out: not ejected again (which would restart its time)
    assert n1.ejector.status(now=3.0)["opened_at"] == 2.0 and n1.stall.stalls == 1
    probe = state.pick(now=7.1)  # ejection time over: one probe, while the old requests still hang
    assert n1.ejector.state is State.HALF_OPEN
    with pytest.raises(NoHealthyBackend):
        state.pick(now=7.2)
    state.tick(now=7.5)  # half-open: the probe decides, not the stall rule
    assert n1.ejector.state is State.HALF_OPEN
    state.answered(probe, status=200, elapsed_s=0.5, now=7.6)
    assert n1.ejector.state is State.CLOSED
    state.tick(now=8.0)  # old requests still out, but the backend answered 0.4 s ago
    assert n1.ejector.state is State.CLOSED and n1.stall.stalls == 1


@pytest.mark.parametrize("how", ["rule off", "no ejector"])
def test_no_rule_or_no_ejector_means_no_stall_ejection(how: str) -> None:
    state = books(1, rule=None) if how == "rule off" else books(1, eject_after_failures=0)
    n1 = state.backends["n1"]
    hang(state, "n1", at=0.0)
    state.tick(now=100.0)
    assert state.pick(now=100.0).backend is n1 and n1.stall.stalls == 0 and not state.drain_stalls()


def test_timeouts_count_as_failures_for_the_ejector() -> None:
    """Consecutive 504s (the balancer's own timeouts) eject a backend as any 5xx does."""
    state = books(1, rule=None, eject_after_failures=3)
    n1 = state.backends["n1"]
    for t in (30.0, 30.1, 30.2):
        state.answered(state.pick(now=t - 30.0), status=504, elapsed_s=30.0, now=t)
    assert n1.ejector.state is State.OPEN


def test_a_clock_that_goes_back_ejects_nothing() -> None:
    state = books(1)
    n1 = state.backends["n1"]
    state.answered(state.pick(now=10.0), status=200, elapsed_s=0.01, now=10.01)
    hang(state, "n1", at=10.0)
    state.tick(now=9.0)
    state.pick(now=2.0)
    assert n1.ejector.state is State.CLOSED and n1.stall.since == 10.01
