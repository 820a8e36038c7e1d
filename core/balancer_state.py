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

Settling twice raises (a driver bug). Time comes in as ``now``.
"""

from __future__ import annotations

from typing import Any, Iterable

from core.circuit_breaker import CircuitBreaker, Permit
from core.health import HealthTracker, counts_as_failure
from core.latency import PeakEwma
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

    __slots__ = ("id", "url", "weight", "active", "requests", "errors", "health", "latency", "ejector", "driver")

    def __init__(self, backend_id: str, url: str, weight: int, spec: BalancerSpec) -> None:
        self.id, self.url, self.weight = backend_id, url, weight
        self.active = 0
        self.requests = 0
        self.errors = 0
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

    # -- membership -------------------------------------------------------------
    def add(self, backend_id: str, url: str = "", weight: int = 1) -> BackendEntry:
        """A backend joins (or comes back at another address: a fresh entry)."""
        entry = self.backends[backend_id] = BackendEntry(backend_id, url, weight, self.spec)
        return entry

    def remove(self, backend_id: str) -> None:
        self.backends.pop(backend_id, None)

    def checked(self, entry: BackendEntry, ok: bool) -> None:
        """An active health check of ``entry`` passed or failed (an entry that has left since is no one's)."""
        entry.health.observe(ok)

    # -- the request path ---------------------------------------------------------
    def pick(self, *, now: float, exclude: Iterable[str] = (), number: int = 1) -> Attempt:
        """The strategy's pick among the available backends; NoHealthyBackend if there is none."""
        chosen = self.strategy.select_node([
            Backend(b.id, b.url, b.active, b.weight, b.id not in exclude and b.available(now), b.latency.value)
            for b in self.backends.values()])
        entry = self.backends[chosen.id]
        permit = entry.ejector.try_acquire(now=now) if entry.ejector is not None else None
        entry.active += 1
        entry.requests += 1
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
