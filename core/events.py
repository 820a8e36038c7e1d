"""A bounded log of state-change events, for a driver to drain.

Core objects record what happened to them as small frozen dataclasses
(:class:`core.circuit_breaker.StateChange`, :class:`core.registry.MembershipChange`)
and hand them out, oldest first, from ``drain_events()``. One driver drains
today: the live registry (``live/registry.py``) logs every membership change
and counts it in ``GET /metrics``, after each request and once a second. No
driver drains a breaker's changes: the live node shows a breaker's state
through ``status()`` (``GET /circuit-status`` and a gauge in ``GET /metrics``),
and the simulator's record is the per-request outcome log. A run's timeline
(:mod:`core.timeline`) drains them all, as :class:`TimelineEvent` values. The log is
bounded: left undrained it keeps the newest ``maxlen`` events and counts the
older ones it pushed out in ``dropped``, so its memory never grows.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

__all__ = ["EventLog", "TimelineEvent"]

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


@dataclass(frozen=True, slots=True)
class TimelineEvent:
    """``target`` went from ``old`` to ``new`` at ``t`` (seconds); ``kind`` is one of
    :data:`core.timeline.EVENT_KINDS`; ``detail`` says more where there is more to say (a fault's what, a
    breaker's signal). What a run's timeline lists (:mod:`core.timeline`)."""

    t: float
    target: str
    kind: str
    old: str
    new: str
    detail: str = ""

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "target": self.target, "kind": self.kind, "from": self.old,
                               "to": self.new}
        if self.detail:
            out["detail"] = self.detail
        return out
