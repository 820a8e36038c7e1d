"""Who a request's client is: the key a node's rate limiter and bulkhead count it under.

Theory of operation
-------------------
A node sees a TCP peer. When the peer is a proxy the node trusts (the
balancer, ``--trust-proxy IPS/CIDRS``), the peer is not the client, and the
proxy says who is in two headers:

* ``X-Client-ID``: a name the proxy gives the client (the balancer passes the
  one its own trusted load generator sets). From a trusted peer it is the key,
  as it always was; from any other peer it is ignored, since anyone can write it.
* ``X-Forwarded-For``: the chain of addresses, one appended by each proxy on the
  way (``client, proxy1, proxy2``). Only the entries appended by proxies we
  trust are worth anything, and a client can write whatever it likes at the
  left. So the chain is read **from the right**, as nginx's ``realip`` module
  with ``real_ip_recursive on`` and Envoy's ``xff_num_trusted_hops`` read it:
  while a hop is a trusted proxy, the hop to its left was written by a trusted
  proxy and is believed; the first hop that is *not* a trusted proxy is the
  client. If every hop is trusted, the leftmost is the client. A hop that is
  not an IP address (``unknown``, garbage, an over-long string) ends the walk
  and the last address vouched for is the client (the trusted hop to its right,
  or the peer itself): nginx's rule, and one that never lets a client choose
  its key by writing nonsense. Several ``X-Forwarded-For`` fields are one list,
  in order (RFC 9110 5.3).

An address key is the canonical text of the IP (``2001:db8::1``, an
IPv4-mapped IPv6 address as its IPv4, ports and zone ids dropped), so one
client is one key however a proxy spells it, and no address key is longer than
39 bytes. An ``X-Client-ID`` key is taken as given (an empty one names no one,
as before), but only if it is at most ``max_client_id_bytes`` (default
:data:`MAX_CLIENT_ID_BYTES`, 256) bytes of
printable text (no control or format characters, valid UTF-8) and comes once;
anything else raises :class:`BadClientId`, which the node answers with ``400
bad_client_id``. Refusing rather than hashing a long id
is deliberate: a 256-byte id is already longer than any real one (a UUID is 36,
an IPv6 address 39), so a longer one is a client bug or an attack; the client
hears about it at once instead of being silently keyed on a digest, and the key
stays what the client sent, which is what error messages and logs show. The
cap is what bounds the rate limiter's table in bytes (see
:class:`core.rate_limiter.TokenBucket`).

Trust is per address: :meth:`TrustedProxies.trusts` checks a literal set first
(the usual ``127.0.0.1``) and remembers the answer for up to
``CACHE_SIZE`` other addresses, and a hop's canonical form is remembered too,
so the per-request cost is a few set or cache lookups. The caches are bounded
in entries and their keys in length (at most 64 characters: no address is
longer), so they cannot grow with what clients send.
"""

from __future__ import annotations

import functools
import ipaddress
from typing import Iterable, Sequence, Union

from core._validate import integer
from core.errors import DataError

__all__ = ["BadClientId", "MAX_CLIENT_ID_BYTES", "TrustedProxies", "canonical_ip"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]

#: Longest X-Client-ID a node keys on by default, in bytes (UTF-8); ``--max-client-id-bytes``.
MAX_CLIENT_ID_BYTES = 256
_LONGEST_HOP = 64  # "[v6 address%zone]:port" fits; longer is not an address


class BadClientId(DataError, ValueError):
    """An ``X-Client-ID`` the node will not key on; the message says why, ``limit_bytes`` what is allowed."""

    def __init__(self, message: str, limit_bytes: int) -> None:
        super().__init__(message)
        self.limit_bytes = limit_bytes


def _address(text: str) -> IPAddress | None:
    """``text`` as an IP: bare, ``[v6]``, ``v4:port``, ``[v6]:port``; zone id dropped, v4-mapped as v4."""
    text = text.strip()
    if not text or len(text) > _LONGEST_HOP:
        return None
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1:]
        if end < 0 or (rest and not (rest[0] == ":" and _is_port(rest[1:]))):
            return None
        text = text[1:end]
    elif text.count(":") == 1:  # v4:port (a bare v6 address has at least two colons)
        text, _, port = text.partition(":")
        if not _is_port(port):
            return None
    try:
        address: IPAddress = ipaddress.ip_address(text.split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit() and int(text) <= 65535


def canonical_ip(text: str) -> str | None:
    """The canonical text of the IP ``text`` names (see the module docstring), or None if it names none."""
    return None if len(text) > _LONGEST_HOP else _canonical(text)


@functools.lru_cache(maxsize=4096)  # hops repeat (a proxy's address, a client's); keys are <= 64 characters
def _canonical(text: str) -> str | None:
    address = _address(text)
    return None if address is None else str(address)


class TrustedProxies:
    """The peers whose ``X-Client-ID`` and ``X-Forwarded-For`` a node believes: IPs and CIDR networks."""

    #: Addresses (beyond the literal set) whose verdict is remembered.
    CACHE_SIZE = 4096

    def __init__(self, networks: Iterable[IPNetwork] = (), *, max_client_id_bytes: int = MAX_CLIENT_ID_BYTES) -> None:
        self.networks = tuple(networks)
        self.max_client_id_bytes = integer("max_client_id_bytes", max_client_id_bytes, ge=1)
        # A single address is a set lookup; only real networks need ipaddress, and then once per address.
        self._exact = frozenset(str(n.network_address) for n in self.networks if n.num_addresses == 1)
        self._wide = tuple(n for n in self.networks if n.num_addresses > 1)
        self._verdict = functools.lru_cache(maxsize=self.CACHE_SIZE)(self._in_networks)

    @classmethod
    def parse(cls, entries: str | Iterable[str], *, max_client_id_bytes: int = MAX_CLIENT_ID_BYTES) -> TrustedProxies:
        """``"127.0.0.1,10.0.0.0/8,::1"`` (or those as a list); ValueError naming a bad entry."""
        items = entries.split(",") if isinstance(entries, str) else list(entries)
        networks = []
        for raw in items:
            item = raw.strip()
            if not item:
                continue
            try:
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                if "host bits set" in str(exc):
                    raise ValueError(f"{item!r} has host bits set; did you mean "
                                     f"{ipaddress.ip_network(item, strict=False)}?") from None
                raise ValueError(f"{item!r} is not an IP address or a CIDR network (e.g. 127.0.0.1 or "
                                 "10.0.0.0/8)") from None
        return cls(networks, max_client_id_bytes=max_client_id_bytes)

    def __bool__(self) -> bool:
        return bool(self.networks)

    def __str__(self) -> str:
        return ",".join(str(n) for n in self.networks)

    def trusts(self, address: str) -> bool:
        """Whether ``address`` (an IP in any spelling :func:`canonical_ip` reads) is a trusted proxy."""
        return address in self._exact or (bool(self.networks) and len(address) <= _LONGEST_HOP
                                          and self._verdict(address))

    def _in_networks(self, text: str) -> bool:
        address = _address(text)
        if address is None:
            return False
        return str(address) in self._exact or any(
            address in net for net in self._wide if net.version == address.version)

    def client(self, peer: str, *, client_id: Sequence[str] = (), forwarded_for: Sequence[str] = ()) -> str:
        """The key of the client behind ``peer``, given the request's ``X-Client-ID`` and
        ``X-Forwarded-For`` field values (every occurrence, in order). Raises :class:`BadClientId`
        for an ``X-Client-ID`` from a trusted peer that cannot be a key."""
        if not self.trusts(peer):
            return peer
        if any(client_id):  # an empty X-Client-ID is no name (as before): the chain or the peer decides
            return _checked_client_id([v for v in client_id if v], self.max_client_id_bytes)
        if not forwarded_for:
            return peer
        hops = ",".join(forwarded_for).split(",")
        vouched = peer
        for hop in reversed(hops):
            if not hop.strip():
                continue  # "a,,b" and a trailing comma: nothing there
            address = canonical_ip(hop)
            if address is None:
                return vouched  # not an address: believe nothing to its left
            if not self.trusts(address):
                return address
            vouched = address
        return vouched  # every hop trusted: the leftmost


def _checked_client_id(values: Sequence[str], limit: int) -> str:
    if len(values) > 1:
        raise BadClientId(f"X-Client-ID appears {len(values)} times; send it once", limit)
    value = values[0]
    if 4 * len(value) <= limit and value.isprintable():
        return value  # the fast path: a character is at most 4 bytes in UTF-8, so this is within the limit
    size = len(value.encode("utf-8", "surrogateescape"))  # the bytes as they came (undecodable ones included)
    if size > limit:
        raise BadClientId(f"X-Client-ID is {size} bytes; the limit is {limit} bytes", limit)
    if not value.isprintable():  # control and format characters, and bytes that were not UTF-8
        raise BadClientId("X-Client-ID must be printable UTF-8 text (no control characters or undecodable bytes)",
                          limit)
    return value
