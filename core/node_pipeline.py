"""A node's request path, sans-I/O: rate limiter -> client bulkhead -> backpressure gate -> breaker -> FIFO workers.

Theory of operation
-------------------
This is the one place that wires a node's middleware together; the SimPy model
(``sim/model.py``) and the aiohttp node (``live/node.py``) both drive it and
only move time and bytes. A request goes through, in order:

1. the per-client :class:`~core.rate_limiter.TokenBucket` (``429
   rate_limited``, with ``Retry-After`` and ``RateLimit-*``); the live node
   applies it to ``GET /health`` too (:meth:`NodePipeline.limit`);
2. the :class:`~core.bulkhead.ClientBulkhead`: at most ``max_per_client``
   requests of one client inside the node (``429 client_bulkhead``, counted
   as backpressure: it is the same shedding, per client);
3. the :class:`~core.backpressure.BackpressureGate` over the requests inside
   the node, in service plus waiting (``429 backpressure``);
4. the node's :class:`~core.circuit_breaker.CircuitBreaker` (``503
   circuit_open``); a refusal here gives the places taken in 2 and 3 back at once;
5. ``workers`` service slots, first come first served: the request starts now
   or waits in a FIFO queue.

Adding a stage is adding it here: a core module, its key in
:class:`~core.scenario.NodeSpec`, and a few lines below; both drivers get it.

:meth:`NodePipeline.admit` answers with a :class:`Rejected` (outcome, status,
error code, message and headers: what the response must say) or with a
:class:`Ticket`, whose ``started`` says whether it holds a worker yet. Every
admitted ticket is settled exactly once, by :meth:`complete` (its service
ended, ``failed`` or not: the breaker hears of it, the places in the
bulkhead and the gate and the worker are given back) or :meth:`abandon` (the client went away: the breaker
hears nothing, since that says nothing about health). Both return the queued
ticket that takes the freed worker, if any: the driver starts its service.

:meth:`crash` is a node process dying: every ticket inside is lost (returned,
for the driver to fail) and the node comes back as a fresh process, with fresh
middleware state. Tickets from before the crash are void: settling one is a
no-op. Settling a ticket twice is a driver bug and raises.

Time comes in as ``now`` (seconds, any origin). The class of the rate limiter
is injected, so the student's :meth:`TokenBucket.is_allowed` runs here when the
command line chose it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Protocol

from core.backpressure import BackpressureGate
from core.bulkhead import ClientBulkhead
from core.circuit_breaker import CircuitBreaker, Permit
from core.rate_limiter import RateLimitDecision, TokenBucket, retry_after
from core.results import Outcome
from core.scenario import NodeSpec

__all__ = ["NodePipeline", "RateLimiter", "Rejected", "Ticket", "TicketSettled"]


class RateLimiter(Protocol):
    """What the pipeline needs of a rate limiter: :class:`TokenBucket` (the exercise's class) is one."""

    rate_per_s: float

    def acquire(self, client_id: str, *, now: float) -> RateLimitDecision: ...


class TicketSettled(RuntimeError):
    """A ticket was completed or abandoned a second time: a driver bug."""


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refusal, with everything its response carries."""

    outcome: Outcome
    status: int
    code: str
    message: str
    retry_after_s: float
    headers: dict[str, str] = field(default_factory=dict)


class Ticket:
    """One admitted request inside the node. ``payload`` is the driver's (a simulated request, a future)."""

    __slots__ = ("client", "payload", "permit", "started", "generation", "settled", "headers")

    def __init__(self, client: str, payload: Any, permit: Permit | None, generation: int,
                 headers: dict[str, str]) -> None:
        self.client = client
        self.payload = payload
        self.permit = permit
        self.started = False
        self.generation = generation
        self.settled = False
        self.headers = headers  # the rate limiter's RateLimit-* for the response, if it limits


_NO_HEADERS: dict[str, str] = {}


class NodePipeline:
    """A node's middleware and worker slots; see the module docstring."""

    def __init__(self, spec: NodeSpec,
                 limiter_cls: Callable[[float, float | None], RateLimiter] = TokenBucket) -> None:
        self.spec = spec
        self.workers = spec.workers
        self._limiter_cls = limiter_cls
        self.generation = 0
        self._fresh()

    def _fresh(self) -> None:
        """The state a node process starts with (at start, and after each crash)."""
        spec = self.spec
        self.limiter: RateLimiter | None = (self._limiter_cls(spec.rate_limit_per_s, spec.rate_limit_burst)
                                            if spec.rate_limit_per_s else None)
        self.bulkhead = ClientBulkhead(spec.max_per_client) if spec.max_per_client else None
        self.gate = BackpressureGate(spec.backpressure) if spec.backpressure else None
        b = spec.circuit_breaker
        self.breaker = (CircuitBreaker(b.failure_threshold, b.recovery_timeout_s, b.half_open_max_calls,
                                       b.success_threshold, name=spec.id) if b else None)
        self.busy = 0
        self.queue: deque[Ticket] = deque()
        self.in_service: set[Ticket] = set()

    # -- admission -------------------------------------------------------------
    def limit(self, client: str, *, now: float) -> Rejected | dict[str, str]:
        """Step 1 alone (the live node's ``GET /health``): a refusal, or the headers an allowed response carries."""
        limiter = self.limiter
        if limiter is None:
            return _NO_HEADERS
        decision = limiter.acquire(client, now=now)
        headers = decision.headers()
        if decision.allowed:
            return headers
        return Rejected(Outcome.RATE_LIMITED, 429, "rate_limited",
                        f"rate limit of {limiter.rate_per_s:g} requests/s per client exceeded; "
                        f"retry in {decision.retry_after_s:.3f} s", decision.retry_after_s, headers)

    def admit(self, client: str, *, now: float, payload: Any = None) -> Rejected | Ticket:
        """Steps 1 to 5 for a request of ``client`` arriving at ``now``."""
        headers = self.limit(client, now=now)
        if isinstance(headers, Rejected):
            return headers
        bulkhead = self.bulkhead
        if bulkhead is not None and not bulkhead.try_acquire(client):
            return Rejected(Outcome.BACKPRESSURE, 429, "client_bulkhead",
                            f"client {client!r} already has {bulkhead.max_per_client} requests inside this node "
                            "(its per-client limit); try again when one is done", 1.0, {"Retry-After": retry_after(1.0)})
        gate = self.gate
        if gate is not None and not gate.try_acquire():
            if bulkhead is not None:
                bulkhead.release(client)
            return Rejected(Outcome.BACKPRESSURE, 429, "backpressure",
                            f"the node holds its limit of {gate.max_in_flight} requests; try again shortly", 1.0,
                            {"Retry-After": retry_after(1.0)})
        permit = None
        breaker = self.breaker
        if breaker is not None:
            permit = breaker.try_acquire(now=now)
            if permit is None:
                self._release_places(client)  # refused after all: its places go back
                retry = breaker.retry_after(now=now)
                return Rejected(Outcome.CIRCUIT_OPEN, 503, "circuit_open",
                                f"the circuit breaker is {breaker.state.name}; failing fast", retry,
                                {"Retry-After": retry_after(retry)})
        ticket = Ticket(client, payload, permit, self.generation, headers)
        if self.busy < self.workers:
            self._start(ticket)
        else:
            self.queue.append(ticket)
        return ticket

    def _start(self, ticket: Ticket) -> None:
        self.busy += 1
        ticket.started = True
        self.in_service.add(ticket)

    # -- settling --------------------------------------------------------------
    def complete(self, ticket: Ticket, *, failed: bool, now: float) -> Ticket | None:
        """``ticket``'s service ended at ``now``; return the queued ticket that starts in its place."""
        if not self._settle(ticket):
            return None
        if self.breaker is not None and ticket.permit is not None:
            (self.breaker.record_failure if failed else self.breaker.record_success)(ticket.permit, now=now)
        return self._leave(ticket)

    def abandon(self, ticket: Ticket, *, now: float) -> Ticket | None:
        """The client of ``ticket`` went away (queued or in service); nothing is said about health."""
        if not self._settle(ticket):
            return None
        if self.breaker is not None and ticket.permit is not None:
            self.breaker.release(ticket.permit, now=now)
        if not ticket.started:
            self.queue.remove(ticket)
            self._release_places(ticket.client)
            return None
        return self._leave(ticket)

    def _settle(self, ticket: Ticket) -> bool:
        if ticket.generation != self.generation:
            return False  # from before a crash: already lost with the process
        if ticket.settled:
            raise TicketSettled(f"ticket of client {ticket.client!r} settled twice")
        ticket.settled = True
        return True

    def _leave(self, ticket: Ticket) -> Ticket | None:
        self.busy -= 1
        self.in_service.discard(ticket)
        self._release_places(ticket.client)
        if self.queue:
            nxt = self.queue.popleft()
            self._start(nxt)
            return nxt
        return None

    def _release_places(self, client: str) -> None:
        """The request of ``client`` left: its places in the bulkhead and the gate go back."""
        if self.bulkhead is not None:
            self.bulkhead.release(client)
        if self.gate is not None:
            self.gate.release()

    def crash(self) -> list[Ticket]:
        """The node process died: return what it held (in service, then queued); start afresh."""
        lost = [*self.in_service, *self.queue]
        for ticket in lost:
            ticket.settled = True
        self.generation += 1
        self._fresh()
        return lost

    # -- what the status endpoints show ----------------------------------------
    @property
    def waiting(self) -> int:
        return len(self.queue)
