"""Circuit breaker: fail fast while a dependency is unhealthy.

Theory of operation
-------------------
The breaker guards calls to something that can fail (the node's own handler, a
downstream service, a backend of the balancer). It is in one of three states:

``CLOSED``
    Calls go through. Outcomes are counted; the breaker *trips* to ``OPEN``
    after ``failure_threshold`` consecutive failures or, when
    ``failure_rate_threshold`` is set, once the failure rate over the last
    ``window_size`` calls reaches it with at least ``minimum_calls`` seen
    (the resilience4j count-based window).
``OPEN``
    Calls are refused at once. After ``recovery_timeout_s`` the breaker moves
    to ``HALF_OPEN`` by itself.
``HALF_OPEN``
    Exactly ``half_open_max_calls`` probe calls are let through; the rest are
    refused. ``success_threshold`` probe successes close the breaker, any probe
    failure opens it again for another ``recovery_timeout_s``.

Every move goes through :data:`TRANSITIONS`, an explicit table from
``(state, signal)`` to the next state; a pair missing from the table is a bug
and raises :class:`InvalidTransition`. The one move that time triggers is in
:meth:`CircuitBreaker._advance`, beside the table's users.

Stale completions. A call admitted in one state may finish after the breaker
has moved on: a slow success admitted while CLOSED must not close a breaker
that has since opened, nor count as a probe. So admission returns a
:class:`Permit` that records the breaker's *generation* (bumped on every
transition), outcomes are reported with the permit, and an outcome whose
generation is not the current one is counted as stale and otherwise ignored.
Every permit must be reported exactly once: ``record_success``,
``record_failure``, or ``release`` for an outcome that says nothing about the
dependency's health (a 4xx, a cancelled call).

Time comes in as ``now`` (seconds, any origin); a ``now`` earlier than one
already seen counts as no time passing. Nothing here reads a clock.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from core._validate import ConfigError, integer, number
from core.errors import DataError
from core.events import EventLog

__all__ = [
    "CircuitBreaker", "CircuitOpen", "InvalidTransition", "Permit", "Signal", "State",
    "StateChange", "TRANSITIONS", "next_state",
]


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class Signal(enum.Enum):
    """What moves the breaker. The first four come from outcomes and time, the last two from an operator."""

    TRIP = "trip"                          # CLOSED: the failure policy fired
    COOL_DOWN_ELAPSED = "cool_down_elapsed"  # OPEN: recovery_timeout_s has passed
    PROBES_PASSED = "probes_passed"        # HALF_OPEN: success_threshold probes succeeded
    PROBE_FAILED = "probe_failed"          # HALF_OPEN: a probe failed
    FORCE_OPEN = "force_open"              # operator: open now (restarts the recovery timer)
    RESET = "reset"                        # operator: close now, forget the counts


_C, _O, _H = State.CLOSED, State.OPEN, State.HALF_OPEN

#: The whole state machine. A (state, signal) pair that is not here cannot happen.
TRANSITIONS: Mapping[tuple[State, Signal], State] = MappingProxyType({
    (_C, Signal.TRIP): _O,
    (_O, Signal.COOL_DOWN_ELAPSED): _H,
    (_H, Signal.PROBES_PASSED): _C,
    (_H, Signal.PROBE_FAILED): _O,
    (_C, Signal.FORCE_OPEN): _O,
    (_O, Signal.FORCE_OPEN): _O,
    (_H, Signal.FORCE_OPEN): _O,
    (_C, Signal.RESET): _C,
    (_O, Signal.RESET): _C,
    (_H, Signal.RESET): _C,
})


class InvalidTransition(DataError, RuntimeError):
    """A signal arrived in a state whose row of the table has no entry for it."""

    def __init__(self, state: State, signal: Signal) -> None:
        super().__init__(f"no transition from {state.name} on {signal.name}")
        self.state = state
        self.signal = signal


def next_state(state: State, signal: Signal) -> State:
    """Look ``(state, signal)`` up in :data:`TRANSITIONS`."""
    try:
        return TRANSITIONS[state, signal]
    except KeyError:
        raise InvalidTransition(state, signal) from None


@dataclass(frozen=True, slots=True)
class Permit:
    """Leave to make one call; report its outcome with this very object.

    The breaker hands out one permit object per generation and kind, and
    recognises current permits by identity: a permit built by hand is stale.
    """

    generation: int
    probe: bool


@dataclass(frozen=True, slots=True)
class StateChange:
    """The breaker ``name`` moved from ``old`` to ``new`` at time ``at`` on ``signal``."""

    name: str
    old: State
    new: State
    signal: Signal
    at: float

    def as_dict(self) -> dict[str, Any]:
        return {"from": self.old.name, "to": self.new.name, "signal": self.signal.value, "at": self.at}


class CircuitOpen(DataError):
    """A call was refused; ``retry_after_s`` is a hint for when to try again."""

    def __init__(self, name: str, state: State, retry_after_s: float) -> None:
        super().__init__(f"circuit {name!r} is {state.name}; retry after {retry_after_s:.3f}s")
        self.name = name
        self.state = state
        self.retry_after_s = retry_after_s


class CircuitBreaker:
    """A three-state circuit breaker driven by reported outcomes and ``now``.

    Parameters (validated on construction):
    ``failure_threshold`` consecutive failures that trip it (>= 1);
    ``recovery_timeout_s`` seconds OPEN before probing (> 0);
    ``half_open_max_calls`` probes admitted per HALF_OPEN period (>= 1);
    ``success_threshold`` probe successes that close it (1..half_open_max_calls);
    ``failure_rate_threshold`` optional second trip policy, a fraction in (0, 1];
    ``window_size`` calls in its sliding window (>= 1);
    ``minimum_calls`` calls the window needs before the rate counts (1..window_size);
    ``history`` how many recent state changes :meth:`status` lists.
    """

    def __init__(
        self,
        failure_threshold: int = 3,
        recovery_timeout_s: float = 5.0,
        half_open_max_calls: int = 1,
        success_threshold: int = 1,
        *,
        failure_rate_threshold: float | None = None,
        window_size: int = 20,
        minimum_calls: int = 10,
        name: str = "circuit",
        history: int = 20,
    ) -> None:
        self.failure_threshold = integer("failure_threshold", failure_threshold, ge=1)
        self.recovery_timeout_s = number("recovery_timeout_s", recovery_timeout_s, gt=0)
        self.half_open_max_calls = integer("half_open_max_calls", half_open_max_calls, ge=1)
        self.success_threshold = integer("success_threshold", success_threshold, ge=1)
        if self.success_threshold > self.half_open_max_calls:
            raise ConfigError(
                "success_threshold", f"an integer >= 1 and <= half_open_max_calls ({self.half_open_max_calls})",
                success_threshold)
        self.failure_rate_threshold = (
            None if failure_rate_threshold is None
            else number("failure_rate_threshold", failure_rate_threshold, gt=0, le=1))
        self.window_size = integer("window_size", window_size, ge=1)
        self.minimum_calls = integer("minimum_calls", minimum_calls, ge=1, le=self.window_size)
        self.name = name
        history = integer("history", history, ge=1)

        self._state = State.CLOSED
        self._generation = 0
        self._now = float("-inf")
        self._opened_at = float("-inf")
        # Permits are immutable and identical within a generation, so one per kind is reused.
        self._permit = Permit(0, probe=False)
        # The same object while CLOSED, None otherwise: the hot path is one test.
        self._closed_permit: Permit | None = self._permit
        # CLOSED bookkeeping
        self._consecutive_failures = 0
        self._window: deque[bool] = deque(maxlen=self.window_size)  # True = failure
        self._window_failures = 0
        # HALF_OPEN bookkeeping
        self._probes_admitted = 0
        self._probes_in_flight = 0
        self._probe_successes = 0
        # lifetime counters
        self.successes = 0
        self.failures = 0
        self.rejected = 0
        self.stale = 0
        self._history: deque[StateChange] = deque(maxlen=history)
        self._events: EventLog[StateChange] = EventLog()

    # -- admission -----------------------------------------------------------
    @property
    def state(self) -> State:
        """The state as of the latest ``now`` seen (call :meth:`status` to advance time)."""
        return self._state

    def try_acquire(self, *, now: float) -> Permit | None:
        """A permit for one call at ``now``, or None if the breaker refuses it."""
        if now > self._now:
            self._now = now
        if self._closed_permit is not None:
            return self._closed_permit
        state = self._state
        if state is State.OPEN:
            self._advance(now)
            state = self._state
        if state is State.HALF_OPEN and self._probes_admitted < self.half_open_max_calls:
            self._probes_admitted += 1
            self._probes_in_flight += 1
            return self._permit
        self.rejected += 1
        return None

    def available(self, *, now: float) -> bool:
        """Whether :meth:`try_acquire` at ``now`` would admit a call, without taking a permit.

        A balancer asks this of every backend before picking one, then acquires
        only from the one it picked.
        """
        if self._closed_permit is not None:
            return True
        self._advance(now)
        return self._state is State.CLOSED or (
            self._state is State.HALF_OPEN and self._probes_admitted < self.half_open_max_calls)

    def acquire(self, *, now: float) -> Permit:
        """Like :meth:`try_acquire` but raise :class:`CircuitOpen` on a refusal."""
        permit = self.try_acquire(now=now)
        if permit is None:
            raise CircuitOpen(self.name, self._state, self.retry_after(now=now))
        return permit

    # -- outcomes ------------------------------------------------------------
    # Outcomes need no time-triggered move: only OPEN moves by time, and OPEN
    # hands out no permits, so an outcome reported while OPEN is always stale.
    # Permits are cached per generation, so "current" is an identity test.
    def record_success(self, permit: Permit, *, now: float) -> None:
        """The call made under ``permit`` succeeded."""
        if now > self._now:
            self._now = now
        if permit is self._closed_permit:
            self.successes += 1
            self._consecutive_failures = 0
            if self.failure_rate_threshold is not None:
                self._push_outcome(False)
            return
        if permit is not self._permit:
            self.stale += 1
            return
        # A current permit other than the CLOSED one is a HALF_OPEN probe.
        self.successes += 1
        self._probes_in_flight -= 1
        self._probe_successes += 1
        if self._probe_successes >= self.success_threshold:
            self._fire(Signal.PROBES_PASSED, self._now)

    def record_failure(self, permit: Permit, *, now: float) -> None:
        """The call made under ``permit`` failed."""
        if now > self._now:
            self._now = now
        if permit is not self._permit:
            self.stale += 1
            return
        self.failures += 1
        if permit.probe:
            self._probes_in_flight -= 1
            self._fire(Signal.PROBE_FAILED, self._now)
            return
        self._consecutive_failures += 1
        tripped = self._consecutive_failures >= self.failure_threshold
        if self.failure_rate_threshold is not None:
            self._push_outcome(True)
            tripped = tripped or self._rate_exceeded()
        if tripped:
            self._fire(Signal.TRIP, self._now)

    def release(self, permit: Permit, *, now: float) -> None:
        """The call under ``permit`` ended with an outcome that says nothing about health.

        A probe's slot is given back, so another probe may be admitted.
        """
        if now > self._now:
            self._now = now
        if permit is not self._permit:
            self.stale += 1
            return
        if permit.probe:
            self._probes_in_flight -= 1
            self._probes_admitted -= 1

    # -- operator ------------------------------------------------------------
    def force_open(self, *, now: float) -> None:
        """Open now; the recovery timer starts from ``now``."""
        self._advance(now)
        self._fire(Signal.FORCE_OPEN, self._now)

    def reset(self, *, now: float) -> None:
        """Close now and forget the failure counts."""
        self._advance(now)
        self._fire(Signal.RESET, self._now)

    # -- reporting -----------------------------------------------------------
    def retry_after(self, *, now: float) -> float:
        """Seconds a refused caller should wait: the rest of the OPEN period; while
        HALF_OPEN with every probe slot taken, one recovery timeout (the probes
        either close the breaker sooner or open it for that long)."""
        self._advance(now)
        if self._state is State.OPEN:
            return max(0.0, self._opened_at + self.recovery_timeout_s - self._now)
        if self._state is State.HALF_OPEN and self._probes_admitted >= self.half_open_max_calls:
            return self.recovery_timeout_s
        return 0.0

    def next_deadline(self) -> float | None:
        """When time alone will next move the breaker (OPEN -> HALF_OPEN), or None."""
        if self._state is State.OPEN:
            return self._opened_at + self.recovery_timeout_s
        return None

    def drain_events(self, *, now: float | None = None) -> list[StateChange]:
        """State changes since the last drain, oldest first; with ``now``, time is moved there first, so a
        move that was due by then (OPEN -> HALF_OPEN) is among them, dated at its deadline."""
        if now is not None:
            self._advance(now)
        return self._events.drain()

    def status(self, *, now: float) -> dict[str, Any]:
        """Everything ``GET /circuit-status`` shows, as of ``now``."""
        self._advance(now)
        window = len(self._window)
        return {
            "name": self.name,
            "state": self._state.name,
            "generation": self._generation,
            "retry_after_s": self.retry_after(now=now),
            "opened_at": self._opened_at if self._opened_at != float("-inf") else None,
            "next_transition_at": self.next_deadline(),
            "consecutive_failures": self._consecutive_failures,
            "window": {
                "calls": window,
                "failures": self._window_failures,
                "failure_rate": self._window_failures / window if window else 0.0,
            },
            "half_open": {
                "admitted": self._probes_admitted,
                "in_flight": self._probes_in_flight,
                "successes": self._probe_successes,
            },
            "counts": {
                "successes": self.successes,
                "failures": self.failures,
                "rejected": self.rejected,
                "stale": self.stale,
            },
            "config": {
                "failure_threshold": self.failure_threshold,
                "recovery_timeout_s": self.recovery_timeout_s,
                "half_open_max_calls": self.half_open_max_calls,
                "success_threshold": self.success_threshold,
                "failure_rate_threshold": self.failure_rate_threshold,
                "window_size": self.window_size,
                "minimum_calls": self.minimum_calls,
            },
            "transitions": [change.as_dict() for change in self._history],
        }

    # -- the machinery -------------------------------------------------------
    def _advance(self, now: float) -> None:
        """Move the clock to ``now`` (never backwards) and apply the time-triggered move.

        The only move time makes on its own: OPEN for ``recovery_timeout_s`` becomes
        HALF_OPEN, dated at the deadline rather than at whenever we noticed.
        """
        if now > self._now:
            self._now = now
        if self._state is State.OPEN:
            deadline = self._opened_at + self.recovery_timeout_s
            if self._now >= deadline:
                self._fire(Signal.COOL_DOWN_ELAPSED, deadline)

    def _fire(self, signal: Signal, at: float) -> None:
        """Apply one transition from the table and set up the new state's bookkeeping."""
        old = self._state
        new = next_state(old, signal)
        self._state = new
        self._generation += 1
        self._permit = Permit(self._generation, probe=new is State.HALF_OPEN)
        self._closed_permit = self._permit if new is State.CLOSED else None
        self._consecutive_failures = 0
        self._window.clear()
        self._window_failures = 0
        self._probes_admitted = self._probes_in_flight = self._probe_successes = 0
        if new is State.OPEN:
            self._opened_at = at
        change = StateChange(self.name, old, new, signal, at)
        self._history.append(change)
        self._events.emit(change)

    def _push_outcome(self, failed: bool) -> None:
        window = self._window
        if len(window) == window.maxlen and window[0]:
            self._window_failures -= 1
        window.append(failed)
        if failed:
            self._window_failures += 1

    def _rate_exceeded(self) -> bool:
        calls = len(self._window)
        assert self.failure_rate_threshold is not None
        return calls >= self.minimum_calls and self._window_failures >= self.failure_rate_threshold * calls
