"""A bounded log of state-change events, for a driver to drain.

Core objects record what happened to them as small frozen dataclasses
(:class:`core.circuit_breaker.StateChange`, :class:`core.registry.MembershipChange`)
and hand them out, oldest first, from ``drain_events()``. The drivers drain
them: the simulator into its run's timeline (:mod:`core.timeline`, as
:class:`TimelineEvent` values); the live registry logs every membership
change, counts it in ``GET /metrics`` and keeps it for ``GET /events``; the
live balancer keeps its backends' health flips and ejector transitions for
``GET /lb-events``; a live node's breaker changes are read from
``GET /circuit-status`` (its recent transitions). An :class:`EventLog` is
bounded: left undrained it keeps the newest ``maxlen`` events and counts the
older ones it pushed out in ``dropped``, so its memory never grows.

An :class:`EventRing` is what a process keeps for readers that come and go:
the newest ``EVENTS_KEPT`` records, numbered from 0, read from a number on
(``?since=N``), with the records a slow reader lost counted as missed.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from itertools import islice
from typing import Any, Generic, Iterable, Mapping, Protocol, TypeVar

__all__ = ["EVENTS_KEPT", "EventLog", "EventRing", "TimelineEvent", "breaker_events", "membership_events",
           "restart_event"]


class _StateChange(Protocol):
    """What :func:`breaker_events` reads of a :class:`core.circuit_breaker.StateChange` (that module imports
    this one)."""

    @property
    def old(self) -> Any: ...
    @property
    def new(self) -> Any: ...
    @property
    def signal(self) -> Any: ...
    @property
    def at(self) -> float: ...


class _MembershipChange(Protocol):
    """What :func:`membership_events` reads of a :class:`core.registry.MembershipChange`."""

    @property
    def kind(self) -> str: ...
    @property
    def node_id(self) -> str: ...
    @property
    def at(self) -> float: ...


E = TypeVar("E")

#: Records an :class:`EventRing` keeps by default (the balancer's and the registry's, for their readers).
EVENTS_KEPT = 4096


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

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], t0: float = 0.0) -> TimelineEvent:
        """The event :meth:`as_dict` wrote (as a process serves it), its time less ``t0``; KeyError, TypeError or
        ValueError for a mapping that is not one."""
        return cls(float(data["t"]) - t0, str(data["target"]), str(data["kind"]), str(data["from"]),
                   str(data["to"]), str(data.get("detail") or ""))


def breaker_events(target: str, kind: str, changes: Iterable[_StateChange], t0: float = 0.0) -> list[TimelineEvent]:
    """A breaker's :class:`~core.circuit_breaker.StateChange` values as events of ``kind`` (``breaker``, a node's;
    ``ejector``, the balancer's for a backend), their times less ``t0`` (the run's time origin)."""
    return [TimelineEvent(c.at - t0, target, kind, c.old.name, c.new.name, c.signal.value) for c in changes]


def restart_event(target: str, state: str, at: float) -> TimelineEvent | None:
    """A node process restarted at ``at`` with a fresh breaker: the ``breaker`` event that says so when the
    old process's breaker was left in ``state`` other than CLOSED (None when it was CLOSED: nothing changed)."""
    return None if state == "CLOSED" else TimelineEvent(at, target, "breaker", state, "CLOSED", "restarted")


def membership_events(changes: Iterable[_MembershipChange], t0: float = 0.0) -> list[TimelineEvent]:
    """A registry's :class:`~core.registry.MembershipChange` values as ``membership`` events: ``to`` is what
    happened (joined, rejoined, died, revived, left, removed), ``from`` what the node was before (``absent``,
    ``alive``, ``dead``), followed change by change."""
    status: dict[str, str] = {}
    after = {"joined": "alive", "rejoined": "alive", "revived": "alive", "died": "dead", "left": "absent",
             "removed": "absent"}
    out = []
    for c in changes:
        before = status.get(c.node_id, "absent")
        status[c.node_id] = after.get(c.kind, before)
        out.append(TimelineEvent(c.at - t0, c.node_id, "membership", before, c.kind))
    return out


class EventRing(Generic[E]):
    """The newest ``maxlen`` records, numbered from 0 in the order they came. A reader keeps the number
    :meth:`since` hands back and asks from there next time; records pushed out before it asked are counted
    as missed, never silently skipped. Memory is ``maxlen`` records whatever the run's length."""

    __slots__ = ("_items", "next")

    def __init__(self, maxlen: int = EVENTS_KEPT) -> None:
        self._items: deque[E] = deque(maxlen=maxlen)
        self.next = 0  # the number the next record gets

    def extend(self, items: Iterable[E]) -> None:
        for item in items:
            self._items.append(item)
            self.next += 1

    def since(self, seq: int) -> tuple[list[E], int, int]:
        """The records numbered ``seq`` on, the number to ask for next, and how many before the oldest kept
        were asked for and are gone. A ``seq`` past the newest (a reader of an earlier process) gets none,
        and the current next number."""
        first = self.next - len(self._items)
        start = min(max(seq, first), self.next)
        return list(islice(self._items, start - first, None)), self.next, max(0, first - seq)
