"""Backpressure: a bound on the requests inside one node.

Theory of operation
-------------------
A node holds requests in service (one per worker) and requests waiting for a
worker. Without a bound, overload turns into an ever longer queue and every
request gets slow; with one, the node refuses the excess at once, cheaply, and
the requests it does take stay fast. That is the M/M/c/K queue: K =
``max_in_flight`` places in the node in all.

:meth:`BackpressureGate.try_acquire` admits a request while fewer than
``max_in_flight`` are inside and refuses the next one; :meth:`release` is called
once per admitted request when it leaves (done, failed or cancelled). Releasing
more than was admitted is a driver bug and raises rather than going negative.
No time is involved, so nothing here takes ``now``.
"""

from __future__ import annotations

from dataclasses import dataclass

from core._validate import integer

__all__ = ["BackpressureGate", "GateStats", "ReleaseWithoutAcquire"]


class ReleaseWithoutAcquire(RuntimeError):
    """:meth:`BackpressureGate.release` was called with nothing admitted."""


@dataclass(frozen=True, slots=True)
class GateStats:
    """What ``GET /queue-stats`` shows.

    ``utilization_percent`` is ``current / max_in_flight * 100``;
    ``rejection_rate`` is ``rejected / (accepted + rejected)`` (0 with no requests).
    """

    current: int
    max_in_flight: int
    utilization_percent: float
    accepted: int
    rejected: int
    rejection_rate: float
    peak: int

    def as_dict(self) -> dict[str, int | float]:
        return {
            "current": self.current,
            "max": self.max_in_flight,
            "utilization_percent": self.utilization_percent,
            "accepted": self.accepted,
            "rejected": self.rejected,
            "rejection_rate": self.rejection_rate,
            "peak": self.peak,
        }


class BackpressureGate:
    """Admit at most ``max_in_flight`` (>= 1) requests at a time."""

    __slots__ = ("max_in_flight", "current", "accepted", "rejected", "peak")

    def __init__(self, max_in_flight: int) -> None:
        self.max_in_flight = integer("max_in_flight", max_in_flight, ge=1)
        self.current = 0
        self.accepted = 0
        self.rejected = 0
        self.peak = 0

    def try_acquire(self) -> bool:
        """Admit one request if there is room; count the decision either way."""
        if self.current >= self.max_in_flight:
            self.rejected += 1
            return False
        self.current += 1
        self.accepted += 1
        if self.current > self.peak:
            self.peak = self.current
        return True

    def release(self) -> None:
        """One admitted request has left the node."""
        if self.current <= 0:
            raise ReleaseWithoutAcquire("release() called with no admitted request in flight")
        self.current -= 1

    def stats(self) -> GateStats:
        decided = self.accepted + self.rejected
        return GateStats(
            current=self.current,
            max_in_flight=self.max_in_flight,
            utilization_percent=100.0 * self.current / self.max_in_flight,
            accepted=self.accepted,
            rejected=self.rejected,
            rejection_rate=self.rejected / decided if decided else 0.0,
            peak=self.peak,
        )
