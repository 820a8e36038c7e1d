"""A balancer following a registry's member list: what changed, who is left out past the cap, who was refused.

Theory of operation
-------------------
The balancer polls the registry's ``GET /nodes`` every refresh interval. Most
polls list the members the last one did, and then :meth:`RegistryFollower.plan`
answers None after one comparison: nothing is rebuilt, resolved or logged.
When the list changed, the plan says what to do:

* ``leave``: members no longer listed that hold none of the balancer's
  requests. A member still busy stays followed until a later poll finds it
  idle; meanwhile every poll is planned, even an unchanged one.
* ``check``: members to join, new ones and ones listed at a new address (they
  get a fresh entry). The driver checks each address (the allow-list and "not
  this balancer": resolution is I/O, ``live.resolve``) and reports back with
  :meth:`~RegistryFollower.joined` or :meth:`~RegistryFollower.refused`.
* ``left_out``: new members past ``max_backends``. Members already followed
  keep their place and newcomers wait for room in the registry's order, so a
  flood of registrations cannot push out the nodes that were there first;
  a member left out costs nothing (no resolution, no health check).

A refused member is remembered with the address it was refused at and not
checked again until it is listed somewhere else, so a bad registration costs
one check and one log line, not one per poll. Members named on the command
line (``static``) are the operator's and never the registry's to change.

A restarted registry (the refill window)
----------------------------------------
A registry keeps its table in memory: restarted, it lists nobody, and then
each node as its next heartbeat gets a 404 and registers again. Its first
listings are partial, and followed as they are they would take every member
out of the balancer (all of them while it is still empty). So the listing
says which registry process answered (:class:`Source`: ``instance``, drawn at
random per process, and its ``ttl_s``), and when the instance changes the
follower keeps the members the new one does not list yet for ``ttl_s``
(:attr:`Source.refill_s`), from the first listing of the new instance it
sees: ``leave`` is empty meanwhile and those members are in ``kept``. New and
moved members join as usual. Once the window is over, the next poll (planned
even if the listing is unchanged) lets go of whoever is still unlisted.

Why the TTL and not two heartbeat intervals: the interval the registry
advertises is advice, each node beats on its own ``--heartbeat-interval``
(and a beat that found the registry down may still be waiting for its
timeout); the TTL is the one bound every live member keeps, or the registry
itself would declare it dead. A member that has not registered with the new
instance within its TTL is one the old instance would have declared dead by
then. Counting from the first listing the balancer sees, not from the
registry's start, errs toward keeping; health checks still take a kept
member that is really gone out of rotation meanwhile. A member deregistered,
or expired, by the same instance is not in a refill: it leaves at once (once
idle), as before. A registry that names no instance is taken at its word
every time.

A member's weight is its ``workers`` (from the listing's metadata, and from
its ``/health`` once checked): a positive integer, at most ``MAX_WEIGHT``
(``testbed node --workers``' own maximum). A member names its own weight, so
a claim past the cap is cut to it, not believed: a node saying it has a
million workers would otherwise take almost all of the traffic. Anything
else (a string, a float, ``true``, zero) is no weight at all (:func:`weight`).

Whether an address is the balancer's own (:class:`OwnAddress`) is decided here
too: the driver resolves, this module judges the IPs.
"""

from __future__ import annotations

import ipaddress
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from core._validate import integer
from core.addresses import AddressError, parse_backend_url

__all__ = ["DEFAULT_REFILL_S", "MAX_WEIGHT", "Listed", "OwnAddress", "Plan", "RegistryFollower", "Source", "parse_listing",
           "parse_source", "weight"]

#: The largest weight a member may claim (its ``workers``): ``testbed node --workers``' maximum.
MAX_WEIGHT = 10_000
#: The refill window for a registry that names its instance but not its TTL: the registry's default TTL.
DEFAULT_REFILL_S = 5.0


@dataclass(frozen=True, slots=True)
class Listed:
    """One member as the registry lists it: its address and its workers (the weight)."""

    url: str
    weight: int = 1


def parse_listing(nodes: Any) -> dict[str, Listed]:
    """The registry's ``nodes`` array as id -> :class:`Listed`, in its order; malformed entries skipped."""
    out: dict[str, Listed] = {}
    if not isinstance(nodes, list):
        return out
    for n in nodes:
        if not isinstance(n, dict):
            continue
        node_id, address = n.get("id"), n.get("address")
        if not isinstance(node_id, str) or not isinstance(address, str) or not node_id:
            continue
        metadata = n.get("metadata")
        workers = metadata.get("workers", 1) if isinstance(metadata, dict) else 1
        out[node_id] = Listed(address.rstrip("/"), weight(workers) or 1)
    return out


def weight(workers: Any) -> int | None:
    """The weight a member's claimed ``workers`` give: a positive integer, cut to ``MAX_WEIGHT``;
    None for anything else (not an int, a bool, below 1)."""
    if type(workers) is not int or workers < 1:
        return None
    return min(workers, MAX_WEIGHT)


@dataclass(frozen=True, slots=True)
class Source:
    """Which registry process answered a listing: its ``instance`` (None: it does not say), its ``ttl_s``
    and ``heartbeat_interval_s`` (seconds; None: not said)."""

    instance: str | None = None
    ttl_s: float | None = None
    heartbeat_interval_s: float | None = None

    @property
    def refill_s(self) -> float:
        """How long members a new instance does not list yet are kept: its TTL (see the module docstring)."""
        return self.ttl_s if self.ttl_s is not None else DEFAULT_REFILL_S


def _seconds(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        seconds = float(value)
    except OverflowError:  # an integer of 400 digits
        return None
    return seconds if math.isfinite(seconds) and seconds > 0 else None


def parse_source(body: Any) -> Source:
    """The ``registry`` object of a ``GET /nodes`` body as a :class:`Source`; what is missing or malformed is None."""
    info = body.get("registry") if isinstance(body, dict) else None
    if not isinstance(info, dict):
        return Source()
    instance = info.get("instance")
    return Source(instance if isinstance(instance, str) and 0 < len(instance) <= 200 else None,
                  _seconds(info.get("ttl_s")), _seconds(info.get("heartbeat_interval_s")))


@dataclass(frozen=True)
class Plan:
    """What one listing asks of the driver (see the module docstring). ``kept``: members unlisted but kept
    while a new registry instance refills; ``new_instance``: this listing is the first from a new one."""

    leave: tuple[str, ...]
    check: tuple[tuple[str, Listed], ...]
    left_out: int
    kept: tuple[str, ...] = ()
    new_instance: bool = False


class RegistryFollower:
    """The registry's members the balancer follows, at most ``max_backends`` backends in all."""

    def __init__(self, max_backends: int, static: Iterable[str] = ()) -> None:
        self.max_backends = integer("max_backends", max_backends, ge=1)
        self.static = frozenset(static)
        self.followed: dict[str, Listed] = {}   # joined from the registry, as listed
        self.refused: dict[str, Listed] = {}    # refused, as listed: not checked again at that address
        self.left_out = 0                       # new members past the cap at the last planned poll
        self.own: OwnAddress | None = None      # where the balancer listens, once the driver knows
        self.instance: str | None = None        # the registry instance of the last planned listing
        self.refill_until: float | None = None  # unlisted members are kept until then (a new instance)
        self._seen_source = False
        self._now = float("-inf")
        self._last: dict[str, Listed] | None = None
        self._draining: set[str] = set()

    def plan(self, listing: Mapping[str, Listed], *, now: float, in_books: int, busy: Callable[[str], bool],
             source: Source = Source()) -> Plan | None:
        """What to do about ``listing`` from ``source`` at ``now`` (seconds); None when it is the last one
        again, from the same instance, nobody is draining and no refill window has just ended.

        ``in_books`` is how many backends the balancer has now (the command line's included);
        ``busy(id)`` whether a followed member still holds requests."""
        self._now = now = max(now, self._now)  # a clock going back is no time passing
        refill_over = self.refill_until is not None and now >= self.refill_until
        new_instance = self._seen_source and source.instance != self.instance
        if listing == self._last and not new_instance and not self._draining and not refill_over:
            return None
        if new_instance:
            self.refill_until = now + source.refill_s
        elif refill_over:
            self.refill_until = None
        self.instance, self._seen_source = source.instance, True
        self._last = dict(listing)
        leave, draining, kept = [], set(), []
        for node_id in list(self.followed):
            if node_id not in listing:
                if self.refill_until is not None:
                    kept.append(node_id)  # the new instance has not heard from it yet
                elif busy(node_id):
                    draining.add(node_id)
                else:
                    leave.append(node_id)
                    del self.followed[node_id]
        self._draining = draining
        self.refused = {k: v for k, v in self.refused.items() if k in listing and listing[k].url == v.url}
        room = self.max_backends - in_books + len(leave)
        check: list[tuple[str, Listed]] = []
        left_out = 0
        for node_id, listed in listing.items():
            if node_id in self.static or node_id in self.refused:
                continue
            known = self.followed.get(node_id)
            if known is not None:
                if known.url != listed.url:
                    check.append((node_id, listed))  # moved: its entry is replaced, no room needed
                continue
            if room > 0:
                check.append((node_id, listed))
                room -= 1
            else:
                left_out += 1
        self.left_out = left_out
        return Plan(tuple(leave), tuple(check), left_out, tuple(kept), new_instance)

    def replan(self) -> None:
        """The last plan was not carried out to the end (the driver was cancelled mid-way): plan the next
        listing in full even if it is the same."""
        self._last = None

    def own_known(self, own: OwnAddress) -> list[str]:
        """The driver learnt where the balancer listens (``--port 0``) after members joined: the followed
        members listed at its port, which it should drop; the next listing checks them again (and refuses
        those that are the balancer itself)."""
        self.own = own
        suspects = [i for i, m in self.followed.items() if _port_of(m.url) == own.port]
        for node_id in suspects:
            del self.followed[node_id]
        if suspects:
            self._last = None
        return suspects

    def joined(self, node_id: str, listed: Listed) -> None:
        """The driver checked ``listed`` and the member is in the books."""
        self.followed[node_id] = listed
        self.refused.pop(node_id, None)

    def refused_at(self, node_id: str, listed: Listed) -> None:
        """The driver refused ``listed``'s address; the member is not followed (any old entry goes)."""
        self.refused[node_id] = listed
        self.followed.pop(node_id, None)


def _port_of(url: str) -> int | None:
    try:
        return parse_backend_url(url).port
    except AddressError:
        return None


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        address = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


@dataclass(frozen=True)
class OwnAddress:
    """Where this balancer listens: ``port`` on ``ips`` (its bind address; an unspecified one,
    ``0.0.0.0`` or ``::``, means every local address: loopback and whatever else ``ips`` lists)."""

    ips: frozenset[str]
    port: int

    def reaches(self, ip: str, port: int) -> bool:
        """Whether a connection to ``ip``:``port`` would come back to this balancer."""
        if port != self.port:
            return False
        address = _ip(ip)
        if address is None:
            return False
        own = [a for a in map(_ip, self.ips) if a is not None]
        if any(a.is_unspecified for a in own) and (address.is_loopback or address.is_unspecified):
            return True
        return address in own
