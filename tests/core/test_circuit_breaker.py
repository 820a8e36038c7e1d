"""CircuitBreaker: literal-time unit tests, the full (state, signal) sweep, and a
stateful machine that drives the breaker beside a tiny reference model."""

from __future__ import annotations

import itertools
from collections import deque

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from core._validate import ConfigError
from core.circuit_breaker import (
    TRANSITIONS, CircuitBreaker, CircuitOpen, InvalidTransition, Signal, State, next_state,
)

C, O, H = State.CLOSED, State.OPEN, State.HALF_OPEN


def tripped(now: float = 0.0, **kw) -> CircuitBreaker:
    cb = CircuitBreaker(failure_threshold=2, recovery_timeout_s=5.0, **kw)
    for _ in range(2):
        cb.record_failure(cb.acquire(now=now), now=now)
    assert cb.state is O
    return cb


def test_trips_after_consecutive_failures_only() -> None:
    cb = CircuitBreaker(failure_threshold=3)
    for outcome in ["f", "f", "s", "f", "f"]:
        p = cb.acquire(now=0.0)
        (cb.record_failure if outcome == "f" else cb.record_success)(p, now=0.0)
    assert cb.state is C  # the success reset the count
    cb.record_failure(cb.acquire(now=1.0), now=1.0)
    assert cb.state is O


def test_open_refuses_until_the_recovery_timeout_then_half_opens() -> None:
    cb = tripped(now=10.0)
    with pytest.raises(CircuitOpen) as info:
        cb.acquire(now=14.0)
    assert info.value.retry_after_s == pytest.approx(1.0) and info.value.state is O
    assert cb.try_acquire(now=14.9) is None
    assert cb.retry_after(now=14.9) == pytest.approx(0.1)
    assert cb.try_acquire(now=15.0) is not None
    assert cb.state is H
    assert cb.status(now=15.0)["transitions"][-1] == {"from": "OPEN", "to": "HALF_OPEN",
                                                       "signal": "cool_down_elapsed", "at": 15.0}


def test_half_open_admits_exactly_the_probe_limit() -> None:
    cb = tripped(half_open_max_calls=2, success_threshold=2)
    probes = [cb.try_acquire(now=5.0) for _ in range(4)]
    assert [p is not None for p in probes] == [True, True, False, False]
    cb.record_success(probes[0], now=5.1)
    assert cb.state is H
    assert cb.try_acquire(now=5.1) is None  # still only two probes per half-open period
    cb.record_success(probes[1], now=5.2)
    assert cb.state is C


def test_a_probe_failure_reopens_for_another_timeout() -> None:
    cb = tripped()
    probe = cb.acquire(now=5.0)
    cb.record_failure(probe, now=6.0)
    assert cb.state is O
    assert cb.retry_after(now=6.0) == pytest.approx(5.0)
    assert cb.try_acquire(now=10.9) is None
    assert cb.try_acquire(now=11.0) is not None


def test_released_probe_frees_its_slot() -> None:
    cb = tripped()
    probe = cb.acquire(now=5.0)
    assert cb.try_acquire(now=5.0) is None
    cb.release(probe, now=5.1)  # e.g. the probe got a 404: says nothing about health
    assert cb.state is H
    assert cb.try_acquire(now=5.2) is not None


def test_stale_success_cannot_close_the_breaker() -> None:
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout_s=1.0)
    slow = cb.acquire(now=0.0)            # admitted while CLOSED
    cb.record_failure(cb.acquire(now=0.0), now=0.0)
    assert cb.state is O
    assert cb.try_acquire(now=1.0) is not None and cb.state is H  # a probe is out
    cb.record_success(slow, now=1.1)      # the slow call finally succeeds
    assert cb.state is H                  # ... and must not count as the probe
    assert cb.status(now=1.1)["counts"]["stale"] == 1


def test_stale_failure_does_not_reopen() -> None:
    cb2 = CircuitBreaker(failure_threshold=1, recovery_timeout_s=1.0)
    early = cb2.acquire(now=0.0)
    cb2.force_open(now=0.0)
    cb2.reset(now=0.5)
    cb2.record_failure(early, now=0.6)
    assert cb2.state is C


def test_failure_rate_policy_trips_on_a_window() -> None:
    cb = CircuitBreaker(failure_threshold=100, failure_rate_threshold=0.5, window_size=10, minimum_calls=6)
    pattern = ["f", "s"] * 2 + ["f"]  # 3 of 5 fail, below minimum_calls
    for outcome in pattern:
        p = cb.acquire(now=0.0)
        (cb.record_failure if outcome == "f" else cb.record_success)(p, now=0.0)
    assert cb.state is C
    cb.record_success(cb.acquire(now=0.0), now=0.0)  # 3 of 6 = 50%, but the last call succeeded
    assert cb.state is C
    cb.record_failure(cb.acquire(now=0.0), now=0.0)  # 4 of 7
    assert cb.state is O


def test_rate_window_slides() -> None:
    cb = CircuitBreaker(failure_threshold=100, failure_rate_threshold=0.5, window_size=4, minimum_calls=4)
    for outcome in ["f", "s", "s", "s", "s", "s", "f"]:
        p = cb.acquire(now=0.0)
        (cb.record_failure if outcome == "f" else cb.record_success)(p, now=0.0)
    assert cb.status(now=0.0)["window"] == {"calls": 4, "failures": 1, "failure_rate": 0.25}
    assert cb.state is C


def test_backwards_clock_is_no_time_passing() -> None:
    cb = tripped(now=100.0)
    assert cb.try_acquire(now=50.0) is None
    assert cb.retry_after(now=50.0) == pytest.approx(5.0)
    assert cb.try_acquire(now=105.0) is not None


def test_operator_force_open_and_reset() -> None:
    cb = CircuitBreaker()
    cb.force_open(now=1.0)
    assert cb.state is O and cb.next_deadline() == 6.0
    cb.reset(now=2.0)
    assert cb.state is C and cb.next_deadline() is None


def test_status_and_events() -> None:
    cb = tripped(now=1.0, name="downstream")
    cb.try_acquire(now=6.0)
    status = cb.status(now=6.0)
    assert status["state"] == "HALF_OPEN" and status["name"] == "downstream"
    assert status["counts"] == {"successes": 0, "failures": 2, "rejected": 0, "stale": 0}
    assert [t["to"] for t in status["transitions"]] == ["OPEN", "HALF_OPEN"]
    events = cb.drain_events()
    assert [(e.old, e.new, e.at) for e in events] == [(C, O, 1.0), (O, H, 6.0)]
    assert cb.drain_events() == []


@pytest.mark.parametrize("kwargs, field", [
    ({"failure_threshold": 0}, "failure_threshold"),
    ({"recovery_timeout_s": 0}, "recovery_timeout_s"),
    ({"recovery_timeout_s": -1}, "recovery_timeout_s"),
    ({"half_open_max_calls": 0}, "half_open_max_calls"),
    ({"half_open_max_calls": 1, "success_threshold": 2}, "success_threshold"),
    ({"failure_rate_threshold": 0}, "failure_rate_threshold"),
    ({"failure_rate_threshold": 1.5}, "failure_rate_threshold"),
    ({"window_size": 5, "minimum_calls": 6}, "minimum_calls"),
])
def test_bad_configuration_names_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        CircuitBreaker(**kwargs)


# -- the transition table, exhaustively -----------------------------------------
EXPECTED = {
    (C, Signal.TRIP): O, (O, Signal.COOL_DOWN_ELAPSED): H, (H, Signal.PROBES_PASSED): C,
    (H, Signal.PROBE_FAILED): O, (C, Signal.FORCE_OPEN): O, (O, Signal.FORCE_OPEN): O,
    (H, Signal.FORCE_OPEN): O, (C, Signal.RESET): C, (O, Signal.RESET): C, (H, Signal.RESET): C,
}


@pytest.mark.parametrize("state, signal", list(itertools.product(State, Signal)),
                         ids=lambda x: x.name)
def test_every_state_signal_pair(state: State, signal: Signal) -> None:
    if (state, signal) in EXPECTED:
        assert next_state(state, signal) is EXPECTED[state, signal]
    else:
        with pytest.raises(InvalidTransition):
            next_state(state, signal)
    assert dict(TRANSITIONS) == EXPECTED


def in_state(state: State) -> CircuitBreaker:
    """A breaker (threshold 1, timeout 1 s) brought into ``state`` through its public API at t=0..1."""
    cb = CircuitBreaker(failure_threshold=1, recovery_timeout_s=1.0)
    if state is not C:
        cb.record_failure(cb.acquire(now=0.0), now=0.0)
    if state is H:
        cb.status(now=1.0)
    assert cb.state is state
    return cb


# Each public input, applied at t=0.5 (before the recovery timeout; later for "time"),
# and the state it must lead to.
INPUTS = {
    "success": {C: C, O: O, H: C},
    "failure": {C: O, O: O, H: O},
    "time": {C: C, O: H, H: H},
    "force_open": {C: O, O: O, H: O},
    "reset": {C: C, O: C, H: C},
}


@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("signal", list(INPUTS))
def test_every_state_input_pair_through_the_public_api(state: State, signal: str) -> None:
    cb = in_state(state)
    now = 0.5
    if signal in ("success", "failure"):
        permit = cb.try_acquire(now=now)
        if permit is None:
            assert state is O
        else:
            (cb.record_success if signal == "success" else cb.record_failure)(permit, now=now)
    elif signal == "time":
        cb.status(now=100.0)
    else:
        getattr(cb, signal)(now=now)
    assert cb.state is INPUTS[signal][state]


# -- stateful: the breaker beside a reference model -----------------------------
class Model:
    """The breaker's rules, written as plainly as possible."""

    def __init__(self, threshold, timeout, max_probes, successes_needed, rate, window, min_calls):
        self.threshold, self.timeout, self.max_probes = threshold, timeout, max_probes
        self.successes_needed, self.rate, self.min_calls = successes_needed, rate, min_calls
        self.window: deque[bool] = deque(maxlen=window)
        self.state, self.gen, self.now, self.opened_at = C, 0, 0.0, 0.0
        self.fails = self.admitted = self.probe_ok = 0

    def move(self, state: State, at: float) -> None:
        self.state, self.gen = state, self.gen + 1
        self.fails = self.admitted = self.probe_ok = 0
        self.window.clear()
        if state is O:
            self.opened_at = at

    def tick(self, now: float) -> None:
        self.now = max(self.now, now)
        if self.state is O and self.now >= self.opened_at + self.timeout:
            self.move(H, self.opened_at + self.timeout)

    def admit(self, now: float) -> tuple[int, bool] | None:
        self.tick(now)
        if self.state is C:
            return (self.gen, False)
        if self.state is H and self.admitted < self.max_probes:
            self.admitted += 1
            return (self.gen, True)
        return None

    def outcome(self, permit: tuple[int, bool], ok: bool | None, now: float) -> None:
        self.tick(now)
        gen, probe = permit
        if gen != self.gen:
            return
        if ok is None:
            if probe:
                self.admitted -= 1
        elif probe:
            self.probe_ok += ok
            if not ok:
                self.move(O, self.now)
            elif self.probe_ok >= self.successes_needed:
                self.move(C, self.now)
        else:
            self.fails = 0 if ok else self.fails + 1
            if self.rate is not None:
                self.window.append(not ok)
            rate_trip = (self.rate is not None and not ok and len(self.window) >= self.min_calls
                         and sum(self.window) >= self.rate * len(self.window))
            if self.fails >= self.threshold or rate_trip:
                self.move(O, self.now)


class BreakerMachine(RuleBasedStateMachine):
    @initialize(threshold=st.integers(1, 4), timeout=st.sampled_from([0.5, 1.0, 5.0]),
                max_probes=st.integers(1, 3), data=st.data(),
                rate=st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0])),
                window=st.integers(1, 8))
    def setup(self, threshold, timeout, max_probes, data, rate, window) -> None:
        needed = data.draw(st.integers(1, max_probes))
        min_calls = data.draw(st.integers(1, window))
        kw = dict(failure_rate_threshold=rate, window_size=window, minimum_calls=min_calls)
        self.cb = CircuitBreaker(threshold, timeout, max_probes, needed, **kw)
        self.model = Model(threshold, timeout, max_probes, needed, rate, window, min_calls)
        self.now = 0.0
        self.outstanding: list[tuple[object, tuple[int, bool]]] = []

    @rule(dt=st.sampled_from([0.0, 0.1, 0.5, 1.0, 5.0]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule(back=st.sampled_from([0.1, 1.0, 10.0]))
    def clock_steps_back(self, back: float) -> None:
        """One call with an earlier ``now``; later calls use the real time again."""
        self.check_admit(self.now - back)

    @rule()
    def acquire(self) -> None:
        self.check_admit(self.now)

    def check_admit(self, now: float) -> None:
        permit, expected = self.cb.try_acquire(now=now), self.model.admit(now)
        assert (permit is None) == (expected is None), f"admitted {permit}, model says {expected}"
        if permit is not None:
            assert permit.probe == expected[1]
            self.outstanding.append((permit, expected))

    @precondition(lambda self: self.outstanding)
    @rule(i=st.integers(0, 50), outcome=st.sampled_from(["success", "failure", "release"]))
    def finish(self, i: int, outcome: str) -> None:
        permit, mine = self.outstanding.pop(i % len(self.outstanding))
        before = self.cb.state
        stale = mine[0] != self.model.gen
        getattr(self.cb, {"success": "record_success", "failure": "record_failure",
                          "release": "release"}[outcome])(permit, now=self.now)
        self.model.outcome(mine, {"success": True, "failure": False, "release": None}[outcome], self.now)
        if stale:
            assert self.cb.state is before, "a stale permit moved the breaker"

    @invariant()
    def same_state_as_model(self) -> None:
        if hasattr(self, "cb"):
            assert self.cb.state is self.model.state

    @invariant()
    def half_open_never_admits_more_than_the_limit(self) -> None:
        if hasattr(self, "cb"):
            status = self.cb.status(now=self.now)
            self.model.tick(self.now)
            assert status["half_open"]["admitted"] <= self.cb.half_open_max_calls
            assert status["state"] == self.model.state.name


TestBreakerAgainstModel = BreakerMachine.TestCase
