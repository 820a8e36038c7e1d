"""The membership table behind the service registry.

Theory of operation
-------------------
Nodes register (id, address, metadata) and then send a heartbeat every
``heartbeat_interval_s`` (2 s, as in the seed). A node not heard from for
``ttl_s`` seconds (default 5: two missed heartbeats and some slack) is marked
DEAD and no longer listed as alive; after another ``remove_after_s`` it is
forgotten. A heartbeat from a DEAD node revives it (it was only late); a
heartbeat from a forgotten or never-seen id answers ``UNKNOWN``, which tells the
node to register again. That is how a restarted registry, which has forgotten
everything, gets every node back within one heartbeat interval.

Re-registering a known id is allowed and bumps the member's ``incarnation``: a
node that restarts with the same id (perhaps on a new address) is a new life of
the same member, not a duplicate.

Expiry is lazy and cheap: alive members are kept in order of their last
heartbeat and dead ones in order of death, so each call looks only at the
front of two queues (O(1) amortized), never at the whole table. Time comes in
as ``now``; a ``now`` earlier than one already seen counts as no time passing.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Mapping

from core._validate import ConfigError, number
from core.events import EventLog

__all__ = ["HeartbeatResult", "Member", "MemberStatus", "Membership", "MembershipChange"]


class MemberStatus(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"


class HeartbeatResult(enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"  # register again


@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member. Times are in the caller's clock, in seconds."""

    id: str
    address: str
    metadata: Mapping[str, Any]
    status: MemberStatus
    registered_at: float
    last_heartbeat: float
    incarnation: int

    def as_dict(self, *, now: float) -> dict[str, Any]:
        return {
            "id": self.id,
            "address": self.address,
            "metadata": dict(self.metadata),
            "status": self.status.value,
            "registered_at": self.registered_at,
            "last_heartbeat": self.last_heartbeat,
            "seconds_since_heartbeat": max(0.0, now - self.last_heartbeat),
            "incarnation": self.incarnation,
        }


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """``kind`` is one of joined, rejoined, died, revived, left, removed."""

    kind: str
    node_id: str
    at: float


class _Record:
    __slots__ = ("address", "metadata", "registered_at", "last_heartbeat", "incarnation", "died_at")

    def __init__(self, address: str, metadata: Mapping[str, Any], now: float, incarnation: int) -> None:
        self.address = address
        self.metadata: Mapping[str, Any] = MappingProxyType(dict(metadata))
        self.registered_at = now
        self.last_heartbeat = now
        self.incarnation = incarnation
        self.died_at = 0.0


def _check_id(node_id: object) -> str:
    if not isinstance(node_id, str) or not node_id.strip():
        raise ConfigError("node_id", "a non-empty string", node_id)
    return node_id


class Membership:
    """Who is in the cluster, driven by register/heartbeat/deregister calls and ``now``.

    ``ttl_s`` seconds without a heartbeat mark a member dead (> 0); ``remove_after_s``
    more seconds forget it (>= 0, default ``ttl_s``).
    """

    def __init__(self, ttl_s: float = 5.0, remove_after_s: float | None = None,
                 heartbeat_interval_s: float = 2.0) -> None:
        self.ttl_s = number("ttl_s", ttl_s, gt=0)
        self.remove_after_s = number("remove_after_s", self.ttl_s if remove_after_s is None else remove_after_s, ge=0)
        self.heartbeat_interval_s = number("heartbeat_interval_s", heartbeat_interval_s, gt=0, le=self.ttl_s)
        self._alive: OrderedDict[str, _Record] = OrderedDict()  # by last heartbeat, oldest first
        self._dead: OrderedDict[str, _Record] = OrderedDict()   # by time of death, oldest first
        self._now = float("-inf")
        self._events: EventLog[MembershipChange] = EventLog()

    # -- what nodes send -----------------------------------------------------
    def register(self, node_id: str, address: str, metadata: Mapping[str, Any] | None = None,
                 *, now: float) -> Member:
        """Add ``node_id`` or start a new incarnation of it; return its snapshot."""
        node_id = _check_id(node_id)
        if not isinstance(address, str):
            raise ConfigError("address", "a string", address)
        now = self._advance(now)
        old = self._alive.pop(node_id, None) or self._dead.pop(node_id, None)
        record = _Record(address, metadata or {}, now, old.incarnation + 1 if old else 1)
        self._alive[node_id] = record
        self._events.emit(MembershipChange("rejoined" if old else "joined", node_id, now))
        return self._snapshot(node_id, record, MemberStatus.ALIVE)

    def heartbeat(self, node_id: str, *, now: float,
                  metadata: Mapping[str, Any] | None = None) -> HeartbeatResult:
        """Record that ``node_id`` is alive; UNKNOWN means it must register again."""
        now = self._advance(now)
        record = self._alive.get(node_id)
        if record is not None:
            self._alive.move_to_end(node_id)
        else:
            record = self._dead.pop(node_id, None)
            if record is None:
                return HeartbeatResult.UNKNOWN
            self._alive[node_id] = record
            self._events.emit(MembershipChange("revived", node_id, now))
        record.last_heartbeat = now
        if metadata is not None:
            record.metadata = MappingProxyType(dict(metadata))
        return HeartbeatResult.OK

    def deregister(self, node_id: str, *, now: float) -> bool:
        """Remove ``node_id`` at once; False if it was not known."""
        now = self._advance(now)
        if self._alive.pop(node_id, None) is None and self._dead.pop(node_id, None) is None:
            return False
        self._events.emit(MembershipChange("left", node_id, now))
        return True

    # -- what readers ask ----------------------------------------------------
    def members(self, *, now: float, include_dead: bool = False) -> list[Member]:
        """Alive members (and dead ones not yet forgotten, if asked), sorted by id."""
        self._advance(now)
        out = [self._snapshot(i, r, MemberStatus.ALIVE) for i, r in self._alive.items()]
        if include_dead:
            out += [self._snapshot(i, r, MemberStatus.DEAD) for i, r in self._dead.items()]
        out.sort(key=lambda m: m.id)
        return out

    def get(self, node_id: str, *, now: float) -> Member | None:
        self._advance(now)
        if node_id in self._alive:
            return self._snapshot(node_id, self._alive[node_id], MemberStatus.ALIVE)
        if node_id in self._dead:
            return self._snapshot(node_id, self._dead[node_id], MemberStatus.DEAD)
        return None

    def next_deadline(self) -> float | None:
        """The earliest time at which time alone changes the table, or None."""
        times = []
        if self._alive:
            times.append(next(iter(self._alive.values())).last_heartbeat + self.ttl_s)
        if self._dead:
            times.append(next(iter(self._dead.values())).died_at + self.remove_after_s)
        return min(times) if times else None

    def counts(self, *, now: float) -> dict[str, int]:
        self._advance(now)
        return {"alive": len(self._alive), "dead": len(self._dead)}

    def drain_events(self) -> list[MembershipChange]:
        """Membership changes since the last drain, oldest first."""
        return self._events.drain()

    # -- the machinery -------------------------------------------------------
    def _advance(self, now: float) -> float:
        """Move the clock forward to ``now`` and apply the moves time makes:
        ALIVE -> DEAD at last heartbeat + ttl_s, DEAD -> forgotten remove_after_s later."""
        if now > self._now:
            self._now = now
        now = self._now
        alive, dead = self._alive, self._dead
        while alive:
            node_id, record = next(iter(alive.items()))
            died_at = record.last_heartbeat + self.ttl_s
            if died_at > now:
                break
            del alive[node_id]
            record.died_at = died_at
            dead[node_id] = record
            self._events.emit(MembershipChange("died", node_id, died_at))
        while dead:
            node_id, record = next(iter(dead.items()))
            gone_at = record.died_at + self.remove_after_s
            if gone_at > now:
                break
            del dead[node_id]
            self._events.emit(MembershipChange("removed", node_id, gone_at))
        return now

    @staticmethod
    def _snapshot(node_id: str, r: _Record, status: MemberStatus) -> Member:
        return Member(node_id, r.address, r.metadata, status, r.registered_at, r.last_heartbeat, r.incarnation)
