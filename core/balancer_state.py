"""A balancer's book of its backends, sans-I/O: pick, and what each answer does to the books.

Theory of operation
-------------------
This is the one place that keeps a balancer's per-backend state; the SimPy
model and the aiohttp balancer (``live/balancer.py``) both drive it and only
move time and bytes. Each backend has requests in flight through this
balancer (``active``), a :class:`~core.health.HealthTracker` fed by active
checks and by refused connections, a :class:`~core.latency.PeakEwma` of its
response time, and an *ejector*: a :class:`~core.circuit_breaker.CircuitBreaker`
fed by every answer, which takes a backend that keeps failing out of rotation
for ``ejection_time_s`` and then lets one probe decide.

:meth:`BalancerState.pick` hands the strategy one immutable
:class:`~core.strategies.Backend` snapshot per backend (healthy = health
tracker says so, not excluded, ejector admits) and returns an
:class:`Attempt`: the backend, counted in flight, with the ejector's permit.
Every attempt is settled exactly once, by one of:

* :meth:`refused`: the connection failed before anything was sent: a failed
  check for the health tracker and a failure for the ejector. It answers
  whether to try once more elsewhere (:meth:`may_retry`: once, idempotent
  methods only, when ``retry_connect_failures``);
* :meth:`answered`: the backend answered ``status`` after ``elapsed_s``
  (a timeout is 504, a broken exchange 502: the balancer's own answers);
  :func:`~core.health.counts_as_failure` decides what the ejector hears;
* :meth:`abandoned`: the client went away, or the request could not be sent
  for a reason that is not the backend's: the permit goes back unjudged.

What feeds the latency EWMA, the one rule: the elapsed time of answers with a
2xx or 3xx status. A refusal (429, 503) is fast because no work was done; fed
to ``least_response_time`` it would make a refusing backend look like the
fastest and draw more traffic to it. Failures never feed it.

Hung backends (:mod:`core.outlier`). Each backend's :class:`~core.outlier.StallClock`
moves on every answer from it and when it goes from idle to busy; a backend
holding requests that has been silent longer than ``stall_rule`` allows is
ejected through its ejector. The backend just picked is judged on each pick
(O(1): the pick goes elsewhere), every backend on the driver's :meth:`tick`.
``stall_rule`` None turns this off; a backend without an ejector
(``eject_after_failures`` 0) is never ejected. Stalls come out as
:class:`~core.outlier.Stalled` events (:meth:`drain_stalls`).

Active checks (:class:`~core.health.CheckSchedule`): membership changes keep
the schedule in step, :meth:`due_checks` says whose check is due. The
simulator checks every backend at once each interval and does not use it.

Settling twice raises (a driver bug). Time comes in as ``now``.
"""

from __future__ import annotations

from typing import Any, Iterable

from core.circuit_breaker import CircuitBreaker, Permit, State
from core.events import EventLog
from core.health import CheckSchedule, HealthTracker, counts_as_failure, default_health_timeout_s
from core.latency import PeakEwma
from core.outlier import NOT_AN_ANSWER, StallClock, Stalled, StallRule
from core.registry_follower import RegistryFollower
from core.scenario import BalancerSpec
from core.strategies import Backend, Strategy

__all__ = ["Attempt", "AttemptSettled", "BackendEntry", "BalancerState", "IDEMPOTENT", "feeds_latency"]

#: Methods a balancer may send twice (RFC 9110 9.2.2).
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"})


def feeds_latency(status: int) -> bool:
    """Whether an answer's elapsed time feeds the latency EWMA: 2xx and 3xx only (see the module docstring)."""
    return 200 <= status < 400


class AttemptSettled(RuntimeError):
    """An attempt was settled a second time: a driver bug."""


class BackendEntry:
    """The balancer's truth about one backend. ``driver`` is the driver's own (the live one keeps
    recent latencies and the last check's result there)."""

    __slots__ = ("id", "url", "weight", "active", "requests", "errors", "health", "latency", "ejector", "stall",
                 "last_sent", "driver")

    def __init__(self, backend_id: str, url: str, weight: int, spec: BalancerSpec) -> None:
        self.id, self.url, self.weight = backend_id, url, weight
        self.active = 0
        self.requests = 0
        self.errors = 0
        self.last_sent: float | None = None  # when the last attempt on it was picked
        self.stall = StallClock()
        self.health = HealthTracker(spec.unhealthy_after)
        self.latency = PeakEwma()
        self.ejector = (CircuitBreaker(spec.eject_after_failures, spec.ejection_time_s, name=f"lb:{backend_id}")
                        if spec.eject_after_failures else None)
        self.driver: Any = None

    def available(self, now: float) -> bool:
        """Healthy by its checks and not ejected: whether it may get traffic now."""
        return self.health.healthy and (self.ejector is None or self.ejector.available(now=now))


class Attempt:
    """One request sent (or about to be sent) to ``backend``; ``number`` 1 is the first try."""

    __slots__ = ("backend", "permit", "number", "settled")

    def __init__(self, backend: BackendEntry, permit: Permit | None, number: int) -> None:
        self.backend = backend
        self.permit = permit
        self.number = number
        self.settled = False


class BalancerState:
    """Backends by id, the strategy that picks among them, and the books; see the module docstring."""

    def __init__(self, spec: BalancerSpec, strategy: Strategy) -> None:
        self.spec = spec
        self.strategy = strategy
        self.backends: dict[str, BackendEntry] = {}
        #: The hung-backend rule; the floor is the default health-check timeout. A driver may replace it.
        self.stall_rule: StallRule | None = StallRule(default_health_timeout_s(spec.health_check_interval_s))
        self.checks: CheckSchedule[BackendEntry] = CheckSchedule(spec.health_check_interval_s)
        self._stalls: EventLog[Stalled] = EventLog()
        #: Set by a driver that follows a registry: the cap, who was left out, who was refused.
        self.follower: RegistryFollower | None = None

    # -- membership -------------------------------------------------------------
    def add(self, backend_id: str, url: str = "", weight: int = 1) -> BackendEntry:
        """A backend joins (or comes back at another address: a fresh entry)."""
        old = self.backends.get(backend_id)
        if old is not None:
            self.checks.remove(old)
        entry = self.backends[backend_id] = BackendEntry(backend_id, url, weight, self.spec)
        self.checks.add(entry)
        return entry

    def remove(self, backend_id: str) -> None:
        entry = self.backends.pop(backend_id, None)
        if entry is not None:
            self.checks.remove(entry)

    def hold(self, entry: BackendEntry) -> None:
        """Keep ``entry`` out of rotation until its first active check passes (a backend a registry named)."""
        entry.health.hold()

    def checked(self, entry: BackendEntry, ok: bool) -> None:
        """An active health check of ``entry`` passed or failed (an entry that has left since is no one's)."""
        entry.health.observe(ok)

    def due_checks(self, *, now: float) -> list[BackendEntry]:
        """The backends whose active check is due at ``now`` (:class:`~core.health.CheckSchedule`)."""
        return self.checks.due(now=now)

    # -- hung backends ------------------------------------------------------------
    def tick(self, *, now: float) -> None:
        """The driver's periodic look at every backend: eject the stalled ones (see :mod:`core.outlier`)."""
        if self.stall_rule is None:
            return
        for entry in self.backends.values():
            if entry.active:
                self._eject_if_stalled(entry, now)

    def drain_stalls(self) -> list[Stalled]:
        """Stalls found since the last drain, oldest first."""
        return self._stalls.drain()

    def _eject_if_stalled(self, entry: BackendEntry, now: float) -> bool:
        """Eject ``entry`` if it holds requests and has been silent too long; say whether it did."""
        rule, ejector = self.stall_rule, entry.ejector
        if rule is None or ejector is None or ejector.state is not State.CLOSED:
            return False
        silent_s = entry.stall.silent_s(now)
        threshold_s = rule.threshold_s(entry.latency.value)
        if silent_s <= threshold_s:
            return False
        ejector.force_open(now=now)
        entry.stall.stalls += 1
        self._stalls.emit(Stalled(entry.id, now, silent_s, threshold_s, entry.active))
        return True

    # -- the request path ---------------------------------------------------------
    def pick(self, *, now: float, exclude: Iterable[str] = (), number: int = 1) -> Attempt:
        """The strategy's pick among the available backends; NoHealthyBackend if there is none.

        A pick that falls on a stalled backend ejects it and picks again (see :mod:`core.outlier`)."""
        while True:
            chosen = self.strategy.select_node([
                Backend(b.id, b.url, b.active, b.weight, b.id not in exclude and b.available(now), b.latency.value)
                for b in self.backends.values()])
            entry = self.backends[chosen.id]
            if not (entry.active and self._eject_if_stalled(entry, now)):
                break
        permit = entry.ejector.try_acquire(now=now) if entry.ejector is not None else None
        if not entry.active:
            entry.stall.mark(now)  # idle -> busy: silence counts from here
        entry.active += 1
        entry.requests += 1
        entry.last_sent = now
        return Attempt(entry, permit, number)

    def may_retry(self, attempt: Attempt, method: str = "GET") -> bool:
        """After a refused connection: try once more elsewhere?"""
        return self.spec.retry_connect_failures and attempt.number == 1 and method in IDEMPOTENT

    def refused(self, attempt: Attempt, *, now: float) -> None:
        """The connection failed before anything was sent."""
        entry = self._settle(attempt)
        entry.errors += 1
        entry.health.observe(False)
        if entry.ejector is not None and attempt.permit is not None:
            entry.ejector.record_failure(attempt.permit, now=now)

    def answered(self, attempt: Attempt, *, status: int, elapsed_s: float, now: float) -> None:
        """The exchange ended with ``status`` after ``elapsed_s`` (504: timed out; 502: broken)."""
        entry = self._settle(attempt)
        if status not in NOT_AN_ANSWER:
            entry.stall.mark(now)
        failed = counts_as_failure(status)
        if failed:
            entry.errors += 1
        elif feeds_latency(status):
            entry.latency.observe(elapsed_s, now=now)
        ejector = entry.ejector
        if ejector is not None and attempt.permit is not None:
            if failed:
                ejector.record_failure(attempt.permit, now=now)
            else:
                ejector.record_success(attempt.permit, now=now)

    def abandoned(self, attempt: Attempt, *, now: float) -> None:
        """The attempt ended for a reason that says nothing about the backend."""
        if attempt.settled:
            return  # abandoning is the driver's "whatever happened" path: settled already is fine
        entry = self._settle(attempt)
        if entry.ejector is not None and attempt.permit is not None:
            entry.ejector.release(attempt.permit, now=now)

    def _settle(self, attempt: Attempt) -> BackendEntry:
        if attempt.settled:
            raise AttemptSettled(f"attempt on {attempt.backend.id} settled twice")
        attempt.settled = True
        attempt.backend.active -= 1
        return attempt.backend

    # -- what the stats show ------------------------------------------------------
    @property
    def total_requests(self) -> int:
        return sum(b.requests for b in self.backends.values())
