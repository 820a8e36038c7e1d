"""Health of one backend as a balancer sees it, from active checks and passive signals.

Theory of operation
-------------------
The balancer probes each backend's ``/health`` every few seconds (live) or at
the same interval in simulated time. ``unhealthy_after`` consecutive failed
checks take a backend out of rotation; ``healthy_after`` consecutive passing
checks bring it back. A failed connection on real traffic is a passive signal
that counts as a failed check at once, so a crashed node stops receiving
requests without waiting for the next probe (what Envoy calls outlier
detection, in its simplest form). No time is involved: the driver decides when
to check.
"""

from __future__ import annotations

from core._validate import integer

__all__ = ["HealthTracker", "counts_as_failure"]


def counts_as_failure(status: int) -> bool:
    """Whether a response with this HTTP status counts against the backend that sent it.

    5xx do (a 503 from a node's open breaker included); 4xx do not: a 429 is a
    healthy node saying no, a 404 the client's mistake. The live balancer and
    the simulated one both decide with this.
    """
    return status >= 500


class HealthTracker:
    """Healthy until ``unhealthy_after`` failures in a row; healthy again after ``healthy_after`` passes."""

    __slots__ = ("unhealthy_after", "healthy_after", "healthy", "_fails", "_passes", "transitions")

    def __init__(self, unhealthy_after: int = 1, healthy_after: int = 1) -> None:
        self.unhealthy_after = integer("unhealthy_after", unhealthy_after, ge=1)
        self.healthy_after = integer("healthy_after", healthy_after, ge=1)
        self.healthy = True
        self._fails = 0
        self._passes = 0
        self.transitions = 0

    def observe(self, ok: bool) -> bool:
        """Record one check (or one request's connection) result; return whether healthy now."""
        if ok:
            self._fails = 0
            self._passes += 1
            if not self.healthy and self._passes >= self.healthy_after:
                self.healthy = True
                self.transitions += 1
        else:
            self._passes = 0
            self._fails += 1
            if self.healthy and self._fails >= self.unhealthy_after:
                self.healthy = False
                self.transitions += 1
        return self.healthy
