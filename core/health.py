"""Health of one backend as a balancer sees it, from active checks and passive signals; when to check.

Theory of operation
-------------------
The balancer probes each backend's ``/health`` every health interval (live) or
at the same interval in simulated time. ``unhealthy_after`` consecutive failed
checks take a backend out of rotation; ``healthy_after`` consecutive passing
checks bring it back. A failed connection on real traffic is a passive signal
that counts as a failed check at once, so a crashed node stops receiving
requests without waiting for the next probe (what Envoy calls outlier
detection, in its simplest form; the hung-backend half is
:mod:`core.outlier`). A backend learnt from a registry starts *held*: out of
rotation until its first check passes (Envoy marks hosts that discovery adds
the same way), so a flood of registrations at addresses where nothing answers
never gets a client's request.

When to check (:class:`CheckSchedule`). Each backend is checked once per
interval on a fixed schedule: the ticks are ``interval_s / slices`` apart from
the first one, whatever the checks cost, so a slow or hung check never delays
the next round. The backends are spread over the ``slices`` ticks of an
interval (each joins the least populated slice), so a thousand backends make
a steady trickle of checks rather than a burst each second; a backend that
joins is also due at once (the driver's next look, not its slice's next tick). Each check has its own timeout,
by default half the interval (:func:`default_health_timeout_s`): a check
always ends before the same backend's next one is due, so checks never pile
up on a hung backend, and a hang is noticed within one interval plus that
timeout (1.5 s at the default 1 s interval). Half a second is also some
hundred times what a live node takes to answer ``/health``, which never
waits for a worker, so a busy node is not mistaken for a hung one. Time
comes in as ``now``; the driver asks what is due and when to ask next.
"""

from __future__ import annotations

import math
from typing import Generic, Hashable, TypeVar

from core._validate import integer, number

__all__ = ["CheckSchedule", "HealthTracker", "counts_as_failure", "default_health_timeout_s"]

K = TypeVar("K", bound=Hashable)


def default_health_timeout_s(interval_s: float) -> float:
    """A health check's timeout when none is given: half the interval (see the module docstring)."""
    return interval_s / 2


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

    def hold(self) -> None:
        """Out of rotation until ``healthy_after`` checks pass: a backend nobody has checked yet."""
        self.healthy = False
        self._fails = self._passes = 0

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


class CheckSchedule(Generic[K]):
    """Which backends' active checks are due at ``now``: each once per ``interval_s``, spread over
    ``slices`` fixed ticks (see the module docstring). Keys are the driver's backends."""

    __slots__ = ("interval_s", "step_s", "_slices", "_slice_of", "_new", "_origin", "_tick")

    def __init__(self, interval_s: float, slices: int = 10) -> None:
        self.interval_s = number("interval_s", interval_s, gt=0)
        slices = integer("slices", slices, ge=1)
        self.step_s = self.interval_s / slices
        self._slices: list[dict[K, None]] = [{} for _ in range(slices)]
        self._slice_of: dict[K, int] = {}
        self._new: dict[K, None] = {}  # checked at the next tick, whatever their slice
        self._origin: float | None = None  # the first tick, set by the first due()
        self._tick = -1  # the last tick handed out

    def __len__(self) -> int:
        return len(self._slice_of)

    def add(self, key: K) -> None:
        """``key`` joins: due at the next :meth:`due`, then at every tick of the least populated slice."""
        if key in self._slice_of:
            return
        index = min(range(len(self._slices)), key=lambda i: len(self._slices[i]))
        self._slices[index][key] = None
        self._slice_of[key] = index
        self._new[key] = None

    def remove(self, key: K) -> None:
        """``key`` leaves (unknown keys are fine)."""
        index = self._slice_of.pop(key, None)
        if index is not None:
            del self._slices[index][key]
            self._new.pop(key, None)

    def due(self, *, now: float) -> list[K]:
        """The keys whose check is due at ``now``, each once, oldest slice first.

        The first call is tick 0. Ticks the driver slept through are taken now; when it is a
        whole interval or more behind, every key is due once (not once per missed round)."""
        if self._origin is None:
            self._origin = now
        tick = math.floor((now - self._origin) / self.step_s + 1e-9)
        if tick <= self._tick:
            return list(self._take_new())
        first = max(self._tick + 1, tick - len(self._slices) + 1)
        self._tick = tick
        out = dict.fromkeys(self._take_new())
        for t in range(first, tick + 1):
            out.update(self._slices[t % len(self._slices)])
        return list(out)

    def next_deadline(self) -> float | None:
        """When the next tick is due (None before the first :meth:`due`)."""
        if self._origin is None:
            return None
        return self._origin + (self._tick + 1) * self.step_s

    def _take_new(self) -> list[K]:
        new = list(self._new)
        self._new.clear()
        return new
