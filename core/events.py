"""A bounded log of state-change events that drivers drain into metrics.

Core objects record what happened to them as small frozen dataclasses
(:class:`core.circuit_breaker.StateChange`, :class:`core.registry.MembershipChange`);
the live runtime and the simulator call ``drain_events()`` and turn them into
counters, logs or per-run records, so sim and live share one schema. The log
is bounded: a driver that never drains loses the oldest events, never memory.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

__all__ = ["EventLog"]

E = TypeVar("E")


class EventLog(Generic[E]):
    """Keep at most ``maxlen`` undrained events; count the ones dropped."""

    __slots__ = ("_events", "dropped")

    def __init__(self, maxlen: int = 1024) -> None:
        self._events: deque[E] = deque(maxlen=maxlen)
        self.dropped = 0

    def emit(self, event: E) -> None:
        if len(self._events) == self._events.maxlen:
            self.dropped += 1
        self._events.append(event)

    def drain(self) -> list[E]:
        """Return the undrained events, oldest first, and forget them."""
        out = list(self._events)
        self._events.clear()
        return out

    def __len__(self) -> int:
        return len(self._events)
