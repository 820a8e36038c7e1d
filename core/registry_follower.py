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

Whether an address is the balancer's own (:class:`OwnAddress`) is decided here
too: the driver resolves, this module judges the IPs.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping

from core._validate import integer

__all__ = ["Listed", "OwnAddress", "Plan", "RegistryFollower", "parse_listing"]


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
        weight = workers if type(workers) is int and 1 <= workers <= 1_000_000 else 1
        out[node_id] = Listed(address.rstrip("/"), weight)
    return out


@dataclass(frozen=True)
class Plan:
    """What one changed listing asks of the driver (see the module docstring)."""

    leave: tuple[str, ...]
    check: tuple[tuple[str, Listed], ...]
    left_out: int


class RegistryFollower:
    """The registry's members the balancer follows, at most ``max_backends`` backends in all."""

    def __init__(self, max_backends: int, static: Iterable[str] = ()) -> None:
        self.max_backends = integer("max_backends", max_backends, ge=1)
        self.static = frozenset(static)
        self.followed: dict[str, Listed] = {}   # joined from the registry, as listed
        self.refused: dict[str, Listed] = {}    # refused, as listed: not checked again at that address
        self.left_out = 0                       # new members past the cap at the last planned poll
        self.own: OwnAddress | None = None      # where the balancer listens, once the driver knows
        self._last: dict[str, Listed] | None = None
        self._draining: set[str] = set()

    def plan(self, listing: Mapping[str, Listed], *, in_books: int, busy: Callable[[str], bool]) -> Plan | None:
        """What to do about ``listing``; None when it is the last one again and nobody is draining.

        ``in_books`` is how many backends the balancer has now (the command line's included);
        ``busy(id)`` whether a followed member still holds requests."""
        if listing == self._last and not self._draining:
            return None
        self._last = dict(listing)
        leave, draining = [], set()
        for node_id in list(self.followed):
            if node_id not in listing:
                if busy(node_id):
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
        return Plan(tuple(leave), tuple(check), left_out)

    def joined(self, node_id: str, listed: Listed) -> None:
        """The driver checked ``listed`` and the member is in the books."""
        self.followed[node_id] = listed
        self.refused.pop(node_id, None)

    def refused_at(self, node_id: str, listed: Listed) -> None:
        """The driver refused ``listed``'s address; the member is not followed (any old entry goes)."""
        self.refused[node_id] = listed
        self.followed.pop(node_id, None)


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
