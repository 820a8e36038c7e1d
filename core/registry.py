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

Ownership: a registration belongs to the instance that made it. ``register``
hands out a *lease* (an opaque token the driver draws at random) and every
heartbeat and deregistration must present it, or is refused with
:class:`LeaseMismatch`. The address of an ALIVE member never changes through
``register``, lease or not: another address is refused with :class:`IdTaken`,
so nobody can move a live node's traffic elsewhere. A re-registration at the
same address is a new incarnation: with the current lease the instance keeps
it; without, it is a node restarted in the same place and takes a new lease at
once (the old one stops working). Such a lease, taken over from a live member
without its lease, is *in place*: it proves only that the caller knows the
address, so deregistering with it does not free the id for another address
at once: the id stays held at its address for ``ttl_s`` (as long as the
member could have lived on without heartbeats), else "take the lease in place,
deregister, register elsewhere" would be a three-request hijack. An owner that
really moves deregisters with its lease and registers anew. A DEAD or
forgotten id may be taken by anyone (Consul's sessions and etcd's leases work
the same way: the holder proves itself with a token, and an expired lease
frees the name).

Bounds: at most ``max_nodes`` members are kept (alive plus dead not yet
forgotten). A new id past the cap first pushes out the longest-dead member; if
every member is alive it is refused with :class:`RegistryFull`, whose
``retry_after_s`` is the earliest a member could die. Heartbeats and
re-registrations of known ids are never refused for space. Metadata is bounded
by :class:`MetadataLimits` (JSON size, keys, key length, values JSON scalars
with finite numbers: nothing stored can later break the listing's JSON) and node ids by
:data:`NODE_ID_RULE` (an id must survive being a URL path segment).

Readers: ``generation`` changes whenever the listing (ids, addresses,
metadata, incarnations, status) does, and only then (a heartbeat that changes nothing
leaves it alone), so a driver can cache the serialised ``GET /nodes``.

Expiry is lazy and cheap: alive members are kept in order of their last
heartbeat and dead ones in order of death, so each call looks only at the
front of two queues (O(1) amortized), never at the whole table. Time comes in
as ``now``; a ``now`` earlier than one already seen counts as no time passing.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import itertools
import json
import math
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Callable, Mapping

from core._validate import ConfigError, integer, number
from core.errors import DataError
from core.events import EventLog

__all__ = ["HeartbeatResult", "IdTaken", "is_own_address", "LeaseMismatch", "Member", "MemberStatus", "Membership",
           "MembershipChange", "MetadataLimits", "MetadataRefused", "NODE_ID_RULE", "RegistryFull",
           "RegistryRefusal", "valid_node_id"]


class MemberStatus(enum.Enum):
    ALIVE = "alive"
    DEAD = "dead"


class HeartbeatResult(enum.Enum):
    OK = "ok"
    UNKNOWN = "unknown"  # register again


# -- refusals: errors that carry data, each with the HTTP status a driver answers -------
class RegistryRefusal(DataError):
    """A write the table refuses; ``status`` and ``code`` are what the registry answers."""

    status = 400
    code = "bad_request"


class IdTaken(RegistryRefusal):
    """``node_id`` is alive (or held after leaving) at ``address``, and the caller names another address."""

    status, code = 409, "conflict"

    def __init__(self, node_id: str, address: str) -> None:
        super().__init__(f"node id {node_id!r} is registered at {address} (alive, or left too lately to move); the address of a live node "
                         "does not change through register: its owner deregisters (with its lease) and registers "
                         "anew, anyone else waits until it expires")
        self.node_id = node_id
        self.address = address


class LeaseMismatch(RegistryRefusal):
    """A heartbeat or deregistration of ``node_id`` without its current lease."""

    status, code = 409, "lease_mismatch"

    def __init__(self, node_id: str, missing: bool) -> None:
        what = "carries no lease" if missing else "carries a lease that is not the current one"
        super().__init__(f"this request for node {node_id!r} {what}; send the lease from your POST /register "
                         "(header X-Lease), or register again")
        self.node_id = node_id
        self.missing = missing


class RegistryFull(RegistryRefusal):
    """``max_nodes`` members, all alive; one could die ``retry_after_s`` from now at the earliest."""

    status, code = 503, "registry_full"

    def __init__(self, max_nodes: int, retry_after_s: float) -> None:
        super().__init__(f"the registry holds its maximum of {max_nodes} nodes (--max-nodes), all alive; "
                         f"retry in {retry_after_s:.1f} s")
        self.max_nodes = max_nodes
        self.retry_after_s = retry_after_s


class MetadataRefused(RegistryRefusal):
    """Metadata over one of the :class:`MetadataLimits`; ``limit`` names which."""

    status, code = 400, "bad_field"

    def __init__(self, limit: str, message: str) -> None:
        super().__init__(message)
        self.limit = limit


# -- what is accepted -------------------------------------------------------------------
#: What a node id may be. A ``/`` (or ``.``/``..``) could register but never heartbeat: ids travel as a path segment.
NODE_ID_RULE = "1-200 characters from A-Z a-z 0-9 . _ : - (not '.' or '..')"
_NODE_ID = re.compile(r"[A-Za-z0-9._:-]{1,200}")


def valid_node_id(node_id: object) -> bool:
    """True if ``node_id`` follows :data:`NODE_ID_RULE`."""
    return isinstance(node_id, str) and bool(_NODE_ID.fullmatch(node_id)) and node_id not in (".", "..")


_SCALARS = (str, int, float, bool, type(None))


@dataclass(frozen=True, slots=True)
class MetadataLimits:
    """Bounds on a member's metadata: its JSON (compact, ASCII) in bytes, its keys and their length."""

    max_bytes: int = 4096
    max_keys: int = 32
    max_key_chars: int = 64

    def __post_init__(self) -> None:
        integer("max_bytes", self.max_bytes, ge=2)
        integer("max_keys", self.max_keys, ge=0)
        integer("max_key_chars", self.max_key_chars, ge=1)

    def check(self, metadata: Mapping[str, Any]) -> str:
        """The metadata's compact JSON; :class:`MetadataRefused` naming the limit it breaks."""
        if not isinstance(metadata, Mapping):
            raise MetadataRefused("type", f"metadata must be a JSON object, not {type(metadata).__name__}")
        if len(metadata) > self.max_keys:
            raise MetadataRefused("max_keys", f"metadata has {len(metadata)} keys; at most {self.max_keys}")
        for key, value in metadata.items():
            if not isinstance(key, str) or not 1 <= len(key) <= self.max_key_chars:
                raise MetadataRefused("max_key_chars", f"metadata key {str(key)[:80]!r} must be 1-"
                                                       f"{self.max_key_chars} characters")
            if not isinstance(value, _SCALARS):
                raise MetadataRefused("values", f"metadata[{key!r}] must be a JSON scalar (string, number, "
                                                f"boolean or null), not {type(value).__name__}")
            if isinstance(value, float) and not math.isfinite(value):
                raise MetadataRefused("values", f"metadata[{key!r}] is {value!r}; numbers must be finite")
        text = json.dumps(metadata, separators=(",", ":"), allow_nan=False)
        if len(text) > self.max_bytes:
            raise MetadataRefused("max_bytes", f"metadata is {len(text)} bytes of JSON; at most {self.max_bytes}")
        return text


def is_own_address(ips: list[str], port: int, *, bound_host: str, bound_port: int | None) -> bool:
    """True if a backend at ``ips``:``port`` would be the registry itself, listening on
    ``bound_host``:``bound_port`` (None: not known yet, nothing is refused). A registry bound to a
    wildcard (``0.0.0.0``, ``::``) or to loopback is reached through any loopback address; a refusal
    of a loopback address that would not reach it costs nobody anything."""
    if bound_port is None or port != bound_port:
        return False
    wildcard = bound_host in ("0.0.0.0", "::", "")
    loopback_bound = bound_host == "localhost" or _is_loopback(bound_host)
    for ip in ips:
        if ip == bound_host or ((wildcard or loopback_bound) and _is_loopback(ip)):
            return True
    return False


def _is_loopback(ip: str) -> bool:
    """Loopback or unspecified (a connection to 0.0.0.0 reaches this host), IPv4-mapped forms included."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


# -- the table --------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Member:
    """A snapshot of one member. Times are in the caller's clock, in seconds. ``lease`` is
    the owner's secret: never serialised (:meth:`as_dict` and :meth:`summary` leave it out)."""

    id: str
    address: str
    metadata: Mapping[str, Any]
    status: MemberStatus
    registered_at: float
    last_heartbeat: float
    incarnation: int
    lease: str = field(default="", repr=False, compare=False)

    def summary(self) -> dict[str, Any]:
        """What does not change between heartbeats (the cacheable ``GET /nodes`` entry)."""
        return {"id": self.id, "address": self.address, "metadata": dict(self.metadata),
                "status": self.status.value, "registered_at": self.registered_at, "incarnation": self.incarnation}

    def as_dict(self, *, now: float) -> dict[str, Any]:
        """The summary plus the heartbeat times as of ``now``."""
        return {**self.summary(), "last_heartbeat": self.last_heartbeat,
                "seconds_since_heartbeat": max(0.0, now - self.last_heartbeat)}


@dataclass(frozen=True, slots=True)
class MembershipChange:
    """``kind`` is one of joined, rejoined, died, revived, left, removed."""

    kind: str
    node_id: str
    at: float


class _Record:
    __slots__ = ("address", "metadata", "metadata_json", "registered_at", "last_heartbeat", "incarnation",
                 "died_at", "lease", "in_place", "summary_json")

    def __init__(self, address: str, metadata: Mapping[str, Any], metadata_json: str, now: float,
                 incarnation: int, lease: str, in_place: bool = False) -> None:
        self.address = address
        self.metadata: Mapping[str, Any] = MappingProxyType(dict(metadata))
        self.metadata_json = metadata_json
        self.registered_at = now
        self.last_heartbeat = now
        self.incarnation = incarnation
        self.died_at = 0.0
        self.lease = lease
        self.in_place = in_place  # the lease was taken over without the previous one (see the module doc)
        self.summary_json: str | None = None  # the alive listing's entry, made on first use after a change

    def alive_summary_json(self, node_id: str) -> str:
        if self.summary_json is None:
            self.summary_json = (
                f'{{"id":{json.dumps(node_id)},"address":{json.dumps(self.address)},"metadata":{self.metadata_json},'
                f'"status":"alive","registered_at":{json.dumps(self.registered_at)},"incarnation":{self.incarnation}}}')
        return self.summary_json


def _check_id(node_id: object) -> str:
    if not valid_node_id(node_id):
        raise ConfigError("node_id", NODE_ID_RULE, node_id)
    assert isinstance(node_id, str)
    return node_id


def _same(lease: str | None, current: str) -> bool:
    """Constant-time comparison of a presented lease (any text) with the current one."""
    if lease is None:
        return False
    return hmac.compare_digest(lease.encode("utf-8", "surrogateescape"), current.encode("utf-8", "surrogateescape"))


def _counter_leases() -> Callable[[], str]:
    """Predictable leases, for tests and the simulator; the live registry passes random ones."""
    counter = itertools.count(1)
    return lambda: f"lease-{next(counter)}"


class Membership:
    """Who is in the cluster, driven by register/heartbeat/deregister calls and ``now``.

    ``ttl_s`` seconds without a heartbeat mark a member dead (> 0); ``remove_after_s``
    more seconds forget it (>= 0, default ``ttl_s``); at most ``max_nodes`` members
    (>= 1); ``new_lease()`` draws a lease (the live registry: ``secrets.token_urlsafe``).
    """

    def __init__(self, ttl_s: float = 5.0, remove_after_s: float | None = None,
                 heartbeat_interval_s: float = 2.0, *, max_nodes: int = 1000,
                 metadata_limits: MetadataLimits | None = None,
                 new_lease: Callable[[], str] | None = None) -> None:
        self.ttl_s = number("ttl_s", ttl_s, gt=0)
        self.remove_after_s = number("remove_after_s", self.ttl_s if remove_after_s is None else remove_after_s, ge=0)
        self.heartbeat_interval_s = number("heartbeat_interval_s", heartbeat_interval_s, gt=0, le=self.ttl_s)
        self.max_nodes = integer("max_nodes", max_nodes, ge=1)
        self.metadata_limits = metadata_limits or MetadataLimits()
        self._new_lease = new_lease or _counter_leases()
        self._alive: OrderedDict[str, _Record] = OrderedDict()  # by last heartbeat, oldest first
        self._dead: OrderedDict[str, _Record] = OrderedDict()   # by time of death, oldest first
        # ids deregistered with an in-place lease: id -> (address, held until), oldest first; at most max_nodes
        self._held: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._now = float("-inf")
        self._generation = 0
        self._events: EventLog[MembershipChange] = EventLog()

    # -- what nodes send -----------------------------------------------------
    def check_register(self, node_id: str, address: str, *, now: float, lease: str | None = None) -> None:
        """Raise the refusal :meth:`register` would give, changing nothing (so a driver can
        refuse before costly work such as resolving the address)."""
        now = self._advance(now)
        record = self._alive.get(node_id)
        if record is not None:
            if address != record.address:  # lease or not: a live member's traffic never moves
                raise IdTaken(node_id, record.address)
        elif node_id in self._held and address != self._held[node_id][0]:
            raise IdTaken(node_id, self._held[node_id][0])
        elif node_id not in self._dead and len(self._alive) >= self.max_nodes:
            oldest = next(iter(self._alive.values()))
            raise RegistryFull(self.max_nodes, max(0.0, oldest.last_heartbeat + self.ttl_s - now))

    def register(self, node_id: str, address: str, metadata: Mapping[str, Any] | None = None,
                 *, now: float, lease: str | None = None) -> Member:
        """Add ``node_id`` or start a new incarnation of it; return its snapshot, whose ``lease``
        the caller must present from now on. Raises :class:`IdTaken`, :class:`RegistryFull`,
        :class:`MetadataRefused`."""
        node_id = _check_id(node_id)
        if not isinstance(address, str) or not address:
            raise ConfigError("address", "a non-empty string", address)
        metadata = metadata or {}
        metadata_json = self.metadata_limits.check(metadata)
        self.check_register(node_id, address, now=now, lease=lease)
        now = self._now
        was_alive = node_id in self._alive
        old = self._alive.pop(node_id, None) or self._dead.pop(node_id, None)
        if old is None and len(self._alive) + len(self._dead) >= self.max_nodes:
            gone_id, _ = self._dead.popitem(last=False)  # check_register saw room: a dead member makes it
            self._generation += 1
            self._events.emit(MembershipChange("removed", gone_id, now))
        # The same instance keeps its lease; a new instance (restarted, or taking a dead id) gets a new one,
        # which is in place if it took over a live member (or a held id) without the previous lease.
        keep = old is not None and _same(lease, old.lease)
        held = self._held.pop(node_id, None) is not None
        in_place = old.in_place if old is not None and keep else (held or was_alive)
        record = _Record(address, metadata, metadata_json, now, old.incarnation + 1 if old else 1,
                         old.lease if old is not None and keep else self._new_lease(), in_place)
        self._alive[node_id] = record
        self._generation += 1
        self._events.emit(MembershipChange("rejoined" if old else "joined", node_id, now))
        return self._snapshot(node_id, record, MemberStatus.ALIVE)

    def heartbeat(self, node_id: str, *, now: float, metadata: Mapping[str, Any] | None = None,
                  lease: str | None = None) -> HeartbeatResult:
        """Record that ``node_id`` is alive; UNKNOWN means it must register again.
        Raises :class:`LeaseMismatch` without the current lease, :class:`MetadataRefused`."""
        now = self._advance(now)
        record = self._alive.get(node_id) or self._dead.get(node_id)
        if record is None:
            return HeartbeatResult.UNKNOWN
        if not _same(lease, record.lease):
            raise LeaseMismatch(node_id, lease is None)
        metadata_json = None if metadata is None else self.metadata_limits.check(metadata)
        if node_id in self._alive:
            self._alive.move_to_end(node_id)
        else:
            self._alive[node_id] = self._dead.pop(node_id)
            self._generation += 1
            self._events.emit(MembershipChange("revived", node_id, now))
        record.last_heartbeat = now
        if metadata is not None and metadata_json is not None and metadata_json != record.metadata_json:
            record.metadata = MappingProxyType(dict(metadata))
            record.metadata_json = metadata_json
            record.summary_json = None
            self._generation += 1
        return HeartbeatResult.OK

    def deregister(self, node_id: str, *, now: float, lease: str | None = None) -> bool:
        """Remove ``node_id`` at once; False if it was not known. Raises :class:`LeaseMismatch`.
        A live member whose lease is in place leaves its id held at its address for ``ttl_s``."""
        now = self._advance(now)
        record = self._alive.get(node_id) or self._dead.get(node_id)
        if record is None:
            return False
        if not _same(lease, record.lease):
            raise LeaseMismatch(node_id, lease is None)
        if self._alive.pop(node_id, None) is not None and record.in_place:
            self._held[node_id] = (record.address, now + self.ttl_s)
            if len(self._held) > self.max_nodes:
                self._held.popitem(last=False)
        else:
            self._dead.pop(node_id, None)
        self._generation += 1
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

    def alive_json(self, *, now: float) -> str:
        """The alive members' :meth:`Member.summary` entries as a JSON array, sorted by id. Each entry is
        serialised once per change of its member and kept, so a new listing after one change costs a sort
        and a join, not a serialisation of every member."""
        self._advance(now)
        alive = self._alive
        return "[" + ",".join(alive[i].alive_summary_json(i) for i in sorted(alive)) + "]"

    def generation(self, *, now: float) -> int:
        """A number that changes whenever a listing (``members(now=now)``, with or without the dead,
        less the heartbeat times) may have: a join, a death, a revival, a departure, a removal, new
        metadata. A heartbeat that changes nothing else leaves it alone."""
        self._advance(now)
        return self._generation

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
            self._generation += 1
            self._events.emit(MembershipChange("died", node_id, died_at))
        while dead:
            node_id, record = next(iter(dead.items()))
            gone_at = record.died_at + self.remove_after_s
            if gone_at > now:
                break
            del dead[node_id]
            self._generation += 1
            self._events.emit(MembershipChange("removed", node_id, gone_at))
        held = self._held
        while held and next(iter(held.values()))[1] <= now:
            held.popitem(last=False)
        return now

    @staticmethod
    def _snapshot(node_id: str, r: _Record, status: MemberStatus) -> Member:
        return Member(node_id, r.address, r.metadata, status, r.registered_at, r.last_heartbeat, r.incarnation,
                      r.lease)
