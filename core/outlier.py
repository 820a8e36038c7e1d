"""Passive outlier detection: a backend that holds requests and has stopped answering is taken out.

Theory of operation
-------------------
Active health checks find a hung backend (a stopped process, a deadlocked
event loop, a machine swapping) only when a check times out: up to one health
interval plus the check's timeout after the hang. Meanwhile every request the
strategy sends there waits, up to the balancer's request timeout. The
requests already in flight tell sooner: a backend that holds requests and has
answered none of them for far longer than it usually takes is *stalled*.

Per backend, :class:`StallClock` keeps ``since``: the later of the last answer
from the backend and the moment it last went from idle to busy. Both are O(1)
updates on the request path (a pick, an answer). The backend is stalled at
``now`` when it has requests in flight and ``now - since`` exceeds
:meth:`StallRule.threshold_s`::

    threshold_s = max(floor_s, factor * latency EWMA)   (EWMA unknown yet: factor * floor_s)

* **The EWMA** (:class:`core.latency.PeakEwma`, the same one the strategies
  see) tells slow from silent: a backend answering slowly raises its EWMA with
  its first slow answer (it is peak-sensitive), so it is not stalled; one that
  answers nothing is. With exponential service of mean ``s`` and an EWMA of at
  least ``s``, one busy worker stays silent for ``factor * EWMA`` with
  probability at most ``exp(-factor)``: 4.5e-5 for the default 10, so a false
  ejection is rare (and only as long as ``ejection_time_s``).
* **The floor** is the health check's own timeout: a backend silent for as
  long as a health check may take is treated as one whose check would time
  out, without waiting for the check.
* **No EWMA yet** (nothing answered so far) uses ``factor * floor_s``: a slow
  backend's first requests are not mistaken for a hang; the active check
  covers that case within an interval and a timeout.

What counts as an answer: every answer the backend sent, whatever its status
(a 500 is a live backend saying no). The balancer's own 504 (its request
timeout) and 502 (a broken exchange) are not: they are what silence looks like.

What a stall does: the backend's ejector (a
:class:`~core.circuit_breaker.CircuitBreaker`, see
:mod:`core.balancer_state`) is forced open for ``ejection_time_s``, then a
probe decides, as after consecutive failures (Envoy's outlier detection,
whose consecutive local-origin failures include timeouts, ejects the same
way; Linkerd and Finagle weigh backends by a latency EWMA). Only a backend
whose ejector is CLOSED is judged: an open ejector has already taken it out,
and a half-open one is waiting for its probe, which answers (and so moves
``since``) or fails by itself. Requests already in flight are left alone;
they end when the backend answers or the request timeout fires.

Who calls: :class:`core.balancer_state.BalancerState` checks the backend it
just picked on each pick (O(1)), and every backend on the driver's periodic
tick (:meth:`~core.balancer_state.BalancerState.tick`), because a strategy
such as least connections stops picking a backend that piles up requests and
would never look at it again. Time comes in as ``now``; a ``now`` earlier
than one already seen counts as no time passing.
"""

from __future__ import annotations

from dataclasses import dataclass

from core._validate import number

__all__ = ["NOT_AN_ANSWER", "StallClock", "StallRule", "Stalled"]

#: Statuses the balancer makes up itself (504: its timeout fired; 502: the exchange broke): not answers.
NOT_AN_ANSWER = frozenset({502, 504})


@dataclass(frozen=True)
class StallRule:
    """How long a busy backend may stay silent: ``max(floor_s, factor * EWMA)`` seconds."""

    floor_s: float = 0.5
    factor: float = 10.0

    def __post_init__(self) -> None:
        number("floor_s", self.floor_s, gt=0)
        number("factor", self.factor, ge=1)

    def threshold_s(self, ewma_s: float | None) -> float:
        """Seconds of silence that make a busy backend stalled, given its latency EWMA (None: unknown yet)."""
        if ewma_s is None:
            return self.factor * self.floor_s
        scaled = self.factor * ewma_s
        return scaled if scaled > self.floor_s else self.floor_s


class StallClock:
    """One backend's silence: ``since`` moves on each answer and when it goes from idle to busy."""

    __slots__ = ("since", "stalls")

    def __init__(self) -> None:
        self.since = float("-inf")
        self.stalls = 0  # how many times this backend was found stalled and ejected

    def mark(self, now: float) -> None:
        """An answer came, or the backend went from idle to busy, at ``now``."""
        if now > self.since:
            self.since = now

    def silent_s(self, now: float) -> float:
        """Seconds since the last mark (0 for a ``now`` before it)."""
        return now - self.since if now > self.since else 0.0


@dataclass(frozen=True, slots=True)
class Stalled:
    """Backend ``backend`` held ``in_flight`` requests and answered none for ``silent_s`` (more than
    ``threshold_s``): ejected at ``at``."""

    backend: str
    at: float
    silent_s: float
    threshold_s: float
    in_flight: int
