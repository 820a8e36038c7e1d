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

:meth:`BalancerState.pick` returns an :class:`Attempt`: the backend the
strategy picked among the *available* ones (health tracker says healthy, not
excluded, ejector admits), counted in flight, with the ejector's permit. It
asks the strategy one of two ways:

* **fast path** (the strategy declares one, see "Fast paths" in
  :mod:`core.strategies`): the strategy's :class:`~core.pick_index.Picker`
  over a :class:`~core.pick_index.PickIndex` that this object keeps up to
  date. Every method here that changes a backend (:meth:`add`,
  :meth:`remove`, :meth:`hold`, :meth:`checked`, :meth:`pick`'s count and
  permit, :meth:`refused`, :meth:`answered`, :meth:`abandoned`, a stall
  ejection, a new ``weight``) tells the index, which moves the backend in or
  out of the available list only when its availability changes and re-ranks
  it for the picker (``O(1)`` or ``O(log n)``); ejections that end by time
  are re-checked when due, at the start of a pick. A pick costs ``O(1)``
  (round robin, random, power of two) or ``O(log n)`` (the others),
  whatever the number of backends. This is why backends must change only
  through these methods: a driver that moved a backend's health tracker or
  ejector itself would leave the index behind (``weight`` is the one field
  a driver sets directly, and it tells the index).
* **snapshots** (any other strategy: a student's, a third party's): one
  immutable :class:`~core.strategies.Backend` per backend to
  ``select_node``, ``O(n)`` per pick.

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

State changes for a timeline (:mod:`core.timeline`): :meth:`drain_events`
hands out every backend's health flips (``up`` <-> ``down``, at the ``now``
of the check or refusal that flipped it) and its ejector's transitions, as
:class:`~core.events.TimelineEvent` values, oldest first per source.

Active checks (:class:`~core.health.CheckSchedule`): membership changes keep
the schedule in step, :meth:`due_checks` says whose check is due. The
simulator checks every backend at once each interval and does not use it.

Settling twice raises (a driver bug). Time comes in as ``now``.
"""

from __future__ import annotations

from typing import Any, Iterable

from core.circuit_breaker import CircuitBreaker, Permit, State
from core.events import EventLog, TimelineEvent, breaker_events
from core.health import CheckSchedule, HealthTracker, counts_as_failure, default_health_timeout_s
from core.latency import PeakEwma
from core.outlier import NOT_AN_ANSWER, StallClock, Stalled, StallRule
from core.pick_index import GONE, PickIndex
from core.registry_follower import RegistryFollower
from core.scenario import BalancerSpec
from core.strategies import Backend, NoHealthyBackend, Strategy, fast_picker

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
    recent latencies and the last check's result there). ``index``, ``index_pos`` and
    ``index_due`` are the pick index's (:mod:`core.pick_index`), kept in the entry as
    HAProxy keeps its tree node in the server."""

    __slots__ = ("id", "url", "_weight", "active", "requests", "errors", "health", "latency", "ejector", "stall",
                 "last_sent", "driver", "index", "index_pos", "index_due")

    def __init__(self, backend_id: str, url: str, weight: int, spec: BalancerSpec) -> None:
        self.id, self.url, self._weight = backend_id, url, weight
        self.index: PickIndex[BackendEntry] | None = None
        self.index_pos = GONE
        self.index_due: float | None = None
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

    @property
    def weight(self) -> int:
        """Its capacity in workers (>= 1); a driver may set it (a backend's ``/health`` says)."""
        return self._weight

    @weight.setter
    def weight(self, value: int) -> None:
        self._weight = value
        if self.index is not None:
            self.index.refresh(self)

    def available(self, now: float) -> bool:
        """Healthy by its checks and not ejected: whether it may get traffic now."""
        return self.health.healthy and (self.ejector is None or self.ejector.available(now=now))

    def recheck_at(self) -> float | None:
        """When time alone may make it available again: its ejection's end (None: only an event can)."""
        ejector = self.ejector
        return ejector.next_deadline() if ejector is not None and self.health.healthy else None


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
        picker = fast_picker(strategy)
        #: The strategy's fast path over the books (None: it has none; snapshots per pick).
        self.index: PickIndex[BackendEntry] | None = PickIndex(picker) if picker is not None else None
        self.backends: dict[str, BackendEntry] = {}
        #: The hung-backend rule; the floor is the default health-check timeout. A driver may replace it.
        self.stall_rule: StallRule | None = StallRule(default_health_timeout_s(spec.health_check_interval_s))
        self.checks: CheckSchedule[BackendEntry] = CheckSchedule(spec.health_check_interval_s)
        self._stalls: EventLog[Stalled] = EventLog()
        self._health_changes: EventLog[TimelineEvent] = EventLog()
        #: Set by a driver that follows a registry: the cap, who was left out, who was refused.
        self.follower: RegistryFollower | None = None

    # -- membership -------------------------------------------------------------
    def add(self, backend_id: str, url: str = "", weight: int = 1) -> BackendEntry:
        """A backend joins (or comes back at another address: a fresh entry)."""
        old = self.backends.get(backend_id)
        if old is not None:
            self._forget(old)
        entry = self.backends[backend_id] = BackendEntry(backend_id, url, weight, self.spec)
        self.checks.add(entry)
        if self.index is not None:
            entry.index = self.index
            self.index.enter(entry)
        return entry

    def remove(self, backend_id: str) -> None:
        entry = self.backends.pop(backend_id, None)
        if entry is not None:
            self._forget(entry)

    def _forget(self, entry: BackendEntry) -> None:
        self.checks.remove(entry)
        if self.index is not None:
            self.index.exit(entry)
            entry.index = None

    def hold(self, entry: BackendEntry, *, now: float | None = None) -> None:
        """Keep ``entry`` out of rotation until its first active check passes (a backend a registry named)."""
        was = entry.health.healthy
        entry.health.hold()
        self._health_seen(entry, was, now)
        self._changed(entry)

    def checked(self, entry: BackendEntry, ok: bool, *, now: float | None = None) -> None:
        """An active health check of ``entry`` passed or failed (an entry that has left since is no one's),
        at ``now`` (None: a flip it causes is not timed, and not listed by :meth:`drain_events`)."""
        was = entry.health.healthy
        entry.health.observe(ok)
        self._health_seen(entry, was, now)
        self._changed(entry)

    def _health_seen(self, entry: BackendEntry, was: bool, now: float | None) -> None:
        if entry.health.healthy != was and now is not None:
            self._health_changes.emit(TimelineEvent(now, entry.id, "health", "up" if was else "down",
                                                    "down" if was else "up"))

    def drain_events(self, *, now: float | None = None) -> list[TimelineEvent]:
        """Health flips and ejector transitions since the last drain (see the module docstring); with ``now``,
        ejections whose time was up by then have moved on first (OPEN -> HALF_OPEN, dated at the deadline)."""
        out = self._health_changes.drain()
        for entry in self.backends.values():
            ejector = entry.ejector
            if ejector is not None:
                changes = ejector.drain_events(now=now)
                if changes:
                    out.extend(breaker_events(entry.id, "ejector", changes))
                    if now is not None:
                        self._changed(entry, now)
        return out

    def _changed(self, entry: BackendEntry, now: float | None = None) -> None:
        """Tell the pick index (if any) that ``entry`` may have changed, at ``now`` (None: no time passed)."""
        if self.index is not None:
            self.index.refresh(entry, now)

    @property
    def fast_path(self) -> bool:
        """Whether picks go through the strategy's fast path (else through snapshots)."""
        return self.index is not None

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
        self._changed(entry, now)
        entry.stall.stalls += 1
        self._stalls.emit(Stalled(entry.id, now, silent_s, threshold_s, entry.active))
        return True

    # -- the request path ---------------------------------------------------------
    def pick(self, *, now: float, exclude: Iterable[str] = (), number: int = 1) -> Attempt:
        """The strategy's pick among the available backends; NoHealthyBackend if there is none.

        A pick that falls on a stalled backend ejects it and picks again (see :mod:`core.outlier`)."""
        index = self.index
        if index is None:
            entry = self._pick_from_snapshots(now, exclude)
        else:
            index.settle(now)
            backends = self.backends
            excluded = tuple(e for e in dict.fromkeys(map(backends.get, exclude))
                             if e is not None and e.index_pos >= 0) if exclude else ()
            while True:
                found = index.pick(excluded)
                if found is None:
                    raise NoHealthyBackend(len(backends))
                entry = found
                if not (entry.active and self._eject_if_stalled(entry, now)):
                    break
        permit = entry.ejector.try_acquire(now=now) if entry.ejector is not None else None
        if not entry.active:
            entry.stall.mark(now)  # idle -> busy: silence counts from here
        entry.active += 1
        entry.requests += 1
        entry.last_sent = now
        if index is not None:
            index.refresh(entry, now)
        return Attempt(entry, permit, number)

    def _pick_from_snapshots(self, now: float, exclude: Iterable[str]) -> BackendEntry:
        """The strategy's ``select_node`` over one snapshot per backend, ``O(n)``."""
        while True:
            chosen = self.strategy.select_node([
                Backend(b.id, b.url, b.active, b.weight, b.id not in exclude and b.available(now), b.latency.value)
                for b in self.backends.values()])
            entry = self.backends[chosen.id]
            if not (entry.active and self._eject_if_stalled(entry, now)):
                return entry

    def may_retry(self, attempt: Attempt, method: str = "GET") -> bool:
        """After a refused connection: try once more elsewhere?"""
        return self.spec.retry_connect_failures and attempt.number == 1 and method in IDEMPOTENT

    def refused(self, attempt: Attempt, *, now: float) -> None:
        """The connection failed before anything was sent."""
        entry = self._settle(attempt)
        entry.errors += 1
        was = entry.health.healthy
        entry.health.observe(False)
        self._health_seen(entry, was, now)
        if entry.ejector is not None and attempt.permit is not None:
            entry.ejector.record_failure(attempt.permit, now=now)
        self._changed(entry, now)

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
        self._changed(entry, now)

    def abandoned(self, attempt: Attempt, *, now: float) -> None:
        """The attempt ended for a reason that says nothing about the backend."""
        if attempt.settled:
            return  # abandoning is the driver's "whatever happened" path: settled already is fine
        entry = self._settle(attempt)
        if entry.ejector is not None and attempt.permit is not None:
            entry.ejector.release(attempt.permit, now=now)
        self._changed(entry, now)

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
