"""A bounded log of state-change events, for a driver to drain.

Core objects record what happened to them as small frozen dataclasses
(:class:`core.circuit_breaker.StateChange`, :class:`core.registry.MembershipChange`)
and hand them out, oldest first, from ``drain_events()``. One driver drains
today: the live registry (``live/registry.py``) logs every membership change
and counts it in ``GET /metrics``, after each request and once a second. No
driver drains a breaker's changes: the live node shows a breaker's state
through ``status()`` (``GET /circuit-status`` and a gauge in ``GET /metrics``),
and the simulator's record is the per-request outcome log. The log is
bounded: left undrained it keeps the newest ``maxlen`` events and counts the
older ones it pushed out in ``dropped``, so its memory never grows.
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
