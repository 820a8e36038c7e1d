"""The balancer's books: picking, retrying, what each answer does, settling (literal times)."""

from __future__ import annotations

import random

import pytest

from core.balancer_state import AttemptSettled, BalancerState, feeds_latency
from core.circuit_breaker import State
from core.scenario import BalancerSpec
from core.strategies import NoHealthyBackend, RoundRobinStrategy
from solutions.least_connections_solution import LeastConnectionsSolution


def books(n: int = 2, strategy=RoundRobinStrategy, **spec) -> BalancerState:
    state = BalancerState(BalancerSpec(**spec), strategy(rng=random.Random(1)))
    for i in range(n):
        state.add(f"n{i + 1}", f"http://127.0.0.1:{5001 + i}")
    return state


def test_a_pick_counts_the_request_in_flight_until_it_is_settled() -> None:
    state = books(2, LeastConnectionsSolution)
    a = state.pick(now=0.0)
    b = state.pick(now=0.0)
    assert {a.backend.id, b.backend.id} == {"n1", "n2"}  # least connections spreads them
    assert a.backend.active == 1 and a.backend.requests == 1
    state.answered(a, status=200, elapsed_s=0.01, now=0.01)
    assert a.backend.active == 0 and state.total_requests == 2


def test_a_refused_connection_marks_it_unhealthy_and_is_retried_once_for_idempotent_methods() -> None:
    state = books(2, unhealthy_after=1)
    first = state.pick(now=0.0)
    state.refused(first, now=0.0)
    assert not first.backend.health.healthy and first.backend.errors == 1
    assert state.may_retry(first, "GET") and not state.may_retry(first, "POST")
    second = state.pick(now=0.0, exclude=(first.backend.id,), number=2)
    assert second.backend.id != first.backend.id
    state.refused(second, now=0.0)
    assert not state.may_retry(second, "GET")  # once only
    with pytest.raises(NoHealthyBackend):
        state.pick(now=0.0)
    assert not books(1, retry_connect_failures=False).may_retry(first, "GET")


@pytest.mark.parametrize("status, fed", [(200, True), (204, True), (304, True), (404, False), (429, False),
                                         (500, False), (503, False), (504, False)])
def test_only_successful_answers_feed_the_latency_ewma(status: int, fed: bool) -> None:
    assert feeds_latency(status) is fed
    state = books(1)
    attempt = state.pick(now=0.0)
    state.answered(attempt, status=status, elapsed_s=0.004, now=1.0)
    assert (attempt.backend.latency.value is not None) is fed


def test_failures_eject_and_a_successful_probe_brings_it_back() -> None:
    state = books(2, eject_after_failures=2, ejection_time_s=5.0)
    n1 = state.backends["n1"]
    for now in (0.0, 0.1):
        state.answered(state.pick(now=now, exclude=("n2",)), status=500, elapsed_s=0.01, now=now)
    assert n1.ejector.state is State.OPEN and not n1.available(1.0)
    assert all(state.pick(now=1.0 + i).backend.id == "n2" for i in range(4))  # out of rotation
    probe = state.pick(now=5.2, exclude=("n2",))  # ejection time over: one probe
    assert probe.backend is n1 and not n1.available(5.2)  # and only one at a time
    state.answered(probe, status=200, elapsed_s=0.01, now=5.3)
    assert n1.ejector.state is State.CLOSED and n1.available(5.3)


def test_an_abandoned_probe_gives_its_permit_back_unjudged() -> None:
    """However a probe's request ends (a client gone, a local error), the ejector must not stay half-open."""
    state = books(1, eject_after_failures=1, ejection_time_s=1.0)
    n1 = state.backends["n1"]
    state.answered(state.pick(now=0.0), status=502, elapsed_s=0.0, now=0.0)
    probe = state.pick(now=1.5)
    with pytest.raises(NoHealthyBackend):
        state.pick(now=1.5)  # the probe holds the only permit
    state.abandoned(probe, now=1.6)
    assert n1.active == 0
    state.answered(state.pick(now=1.7), status=200, elapsed_s=0.01, now=1.8)
    assert n1.ejector.state is State.CLOSED


def test_settling_twice_raises_but_abandoning_a_settled_attempt_is_the_catch_all() -> None:
    state = books(1)
    attempt = state.pick(now=0.0)
    state.answered(attempt, status=200, elapsed_s=0.01, now=0.01)
    state.abandoned(attempt, now=0.02)  # the driver's finally: nothing left to do
    assert attempt.backend.active == 0
    with pytest.raises(AttemptSettled):
        state.answered(attempt, status=200, elapsed_s=0.01, now=0.02)
    with pytest.raises(AttemptSettled):
        state.refused(attempt, now=0.02)


def test_membership_changes_and_health_checks() -> None:
    state = books(2, unhealthy_after=2)
    n1 = state.backends["n1"]
    state.checked(n1, False)
    assert n1.health.healthy
    state.checked(n1, False)
    assert not n1.available(0.0)
    assert all(state.pick(now=0.0).backend.id == "n2" for _ in range(3))
    state.remove("n2")
    with pytest.raises(NoHealthyBackend):
        state.pick(now=0.0)
    fresh = state.add("n1", "http://127.0.0.1:6001", weight=4)  # back at another address: fresh books
    assert fresh.health.healthy and fresh.weight == 4 and state.pick(now=0.0).backend is fresh


def test_the_check_schedule_follows_membership_and_a_held_backend_waits_for_its_check() -> None:
    state = books(2)
    n1, n2 = state.backends["n1"], state.backends["n2"]
    assert state.due_checks(now=0.0) == [n1, n2]  # checked at once
    fresh = state.add("n1", "http://127.0.0.1:6001")  # moved: a fresh entry replaces the old in the schedule
    state.hold(fresh)
    n3 = state.add("n3", "http://127.0.0.1:6003")
    state.remove("n2")
    assert state.due_checks(now=0.05) == [fresh, n3]
    assert not fresh.available(0.05)
    assert all(state.pick(now=0.05).backend is n3 for _ in range(3))  # the held one gets nothing
    state.checked(fresh, True)
    assert fresh.available(0.1)
    due = [e for t in range(1, 11) for e in state.due_checks(now=0.1 * t + 0.001)]
    assert sorted(e.id for e in due) == ["n1", "n3"]  # once each per interval; n2 has left


def test_the_books_remember_when_a_backend_last_got_a_request() -> None:
    state = books(2)
    assert state.backends["n1"].last_sent is None
    state.pick(now=3.0, exclude=("n2",))
    state.pick(now=4.0, exclude=("n1",))
    assert state.backends["n1"].last_sent == 3.0 and state.backends["n2"].last_sent == 4.0
