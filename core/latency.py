"""Peak-EWMA latency tracking, the input of ``least_response_time``.

Theory of operation
-------------------
An exponentially weighted moving average forgets old samples with a time
constant ``tau_s``: a sample ``dt`` seconds after the previous one gets weight
``1 - exp(-dt / tau_s)``, so the average reflects the last few ``tau_s`` seconds
whatever the request rate. "Peak" means a sample above the average replaces it
at once: a backend that suddenly slows down is avoided immediately and earns
its way back only gradually (Finagle's and Linkerd's balancers do the same).
Time comes in as ``now``; a ``now`` that goes backwards counts as no time passing.
"""

from __future__ import annotations

import math

from core._validate import number

__all__ = ["PeakEwma"]


class PeakEwma:
    """A peak-sensitive moving average of latency samples, in seconds."""

    __slots__ = ("tau_s", "value", "_last")

    def __init__(self, tau_s: float = 10.0) -> None:
        self.tau_s = number("tau_s", tau_s, gt=0)
        self.value: float | None = None
        self._last = float("-inf")

    def observe(self, latency_s: float, *, now: float) -> float:
        """Add one sample taken at ``now``; return the new average."""
        if self.value is None or latency_s >= self.value:
            self.value = latency_s
        else:
            dt = max(0.0, now - self._last)
            w = math.exp(-dt / self.tau_s)
            self.value = self.value * w + latency_s * (1.0 - w)
        if now > self._last:
            self._last = now
        return self.value
