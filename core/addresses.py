"""Backend addresses: what a registrable URL looks like, and which networks it may point into.

Theory of operation
-------------------
A backend address is a promise that the balancer will send clients' requests
(with their ``Authorization`` and ``Cookie`` headers) there, so the registry and
the balancer both check it before believing it, in two steps:

1. **Shape** (:func:`parse_backend_url`): ``http://host[:port][/]`` and nothing
   else: no other scheme, no ``user:pass@``, no path, query or fragment, a port
   in 1-65535 (80 if absent), IPv6 in brackets. The result is normalised
   (``http://host:port``, host lower-cased, a numeric host in its canonical
   dotted or compressed form), so the string that was checked is the string
   that is connected to.
2. **Where it leads** (:class:`AllowList`): every address the host resolves to
   must lie in an allowed network. Resolution is I/O and lives in
   ``live.resolve``; this module only judges IPs. The numeric forms the OS
   resolver accepts (``2852039166``, ``0xa9fea9fe``, ``0251.0376.0251.0376``,
   ``127.1``: the ``inet_aton`` family) are decoded here by
   :func:`numeric_host` so no DNS is needed for them, and an IPv4-mapped IPv6
   address (``::ffff:169.254.169.254``) is judged as the IPv4 address it reaches.

The default allow-list follows the bind address, as Consul and Envoy admin
interfaces do: a process bound to loopback serves only a single machine and
admits only loopback backends; one bound elsewhere admits everything except
the link-local and cloud-metadata ranges and the unspecified addresses, which
no real backend lives at (``--allow-backends`` overrides either).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass
from typing import Iterable, Union

__all__ = ["AddressError", "AllowList", "BackendAddress", "numeric_host", "parse_backend_url"]

IPAddress = Union[ipaddress.IPv4Address, ipaddress.IPv6Address]
IPNetwork = Union[ipaddress.IPv4Network, ipaddress.IPv6Network]


class AddressError(ValueError):
    """A backend address that is malformed or leads somewhere not allowed; the message says which."""


@dataclass(frozen=True)
class BackendAddress:
    """A checked backend: ``url`` is ``http://host:port`` (IPv6 hosts in brackets)."""

    host: str
    port: int
    url: str


_HOST_NAME = re.compile(r"[a-z0-9_-]+(\.[a-z0-9_-]+)*\.?")
_MAX_URL_CHARS = 2048


def parse_backend_url(text: str) -> BackendAddress:
    """Parse and normalise ``http://host[:port][/]``; raise :class:`AddressError` naming the problem."""
    if not isinstance(text, str):
        raise AddressError(f"a backend address must be a string, not {type(text).__name__}")
    if len(text) > _MAX_URL_CHARS:
        raise AddressError(f"a backend address is at most {_MAX_URL_CHARS} characters")
    scheme, sep, rest = text.partition("://")
    if not sep:
        raise AddressError(f"{text!r} is not a URL; a backend address looks like http://127.0.0.1:5001")
    if scheme.lower() != "http":
        raise AddressError(f"only http:// backends are supported, not {scheme.lower()}://")
    cut = min((i for i in (rest.find(c) for c in "/?#") if i >= 0), default=len(rest))
    authority, tail = rest[:cut], rest[cut:]
    if "?" in tail:
        raise AddressError("a backend address has no query string")
    if "#" in tail:
        raise AddressError("a backend address has no fragment")
    if tail not in ("", "/"):
        raise AddressError(f"a backend address has no path (got {tail!r}); give only http://host:port")
    if "@" in authority:
        raise AddressError("a backend address carries no user:password@ credentials")
    host, port_text = _split_host_port(authority)
    port = _port(port_text)
    numeric = numeric_host(host)
    if numeric is not None:
        host = numeric
    else:
        host = host.lower()
        if len(host) > 253 or not _HOST_NAME.fullmatch(host):
            raise AddressError(f"{host!r} is not a valid host name (letters, digits, '-', '_' and dots)")
    shown = f"[{host}]" if ":" in host else host
    return BackendAddress(host, port, f"http://{shown}:{port}")


def _split_host_port(authority: str) -> tuple[str, str | None]:
    if authority.startswith("["):
        end = authority.find("]")
        if end < 0:
            raise AddressError(f"{authority!r}: an IPv6 address opened with '[' must close with ']'")
        host, after = authority[1:end], authority[end + 1:]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"[{host}] is not a valid IPv6 address") from None
        if after and not after.startswith(":"):
            raise AddressError(f"unexpected {after!r} after [{host}]")
        return f"[{host}]", (after[1:] if after else None)
    if authority.count(":") > 1:
        raise AddressError(f"{authority!r}: an IPv6 address must be written in brackets, e.g. http://[::1]:5001")
    host, sep, port_text = authority.partition(":")
    if not host:
        raise AddressError("a backend address needs a host")
    return host, (port_text if sep else None)


def _port(text: str | None) -> int:
    if text is None:
        return 80
    if not text:
        raise AddressError("the port after ':' is empty")
    if not text.isascii() or not text.isdigit():
        raise AddressError(f"port {text[:20]!r} is not a number")
    port = int(text[:6]) if len(text) <= 6 else 10**6  # no 5,000-digit ints
    if not 1 <= port <= 65535:
        raise AddressError(f"port {text if len(text) <= 6 else text[:6] + '...'} is out of range 1-65535")
    return port


def numeric_host(host: str) -> str | None:
    """The IP a numeric ``host`` means to the OS resolver, in canonical form; None for a name.

    Accepts bracketed or bare IPv6 and every ``inet_aton`` IPv4 form: 1 to 4 parts,
    each decimal, octal (leading ``0``) or hex (``0x``); the last part fills the
    remaining bytes (``127.1`` is 127.0.0.1, ``2852039166`` is 169.254.169.254)."""
    if not isinstance(host, str) or not host:
        return None
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if ":" in bare:
        try:
            return str(ipaddress.IPv6Address(bare))
        except ValueError:
            return None
    return _inet_aton(bare)


def _inet_aton(text: str) -> str | None:
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    values = []
    for part in parts:
        value = _aton_part(part)
        if value is None:
            return None
        values.append(value)
    *head, last = values
    if any(v > 255 for v in head) or last >= 1 << (8 * (4 - len(head))):
        return None
    number = last
    for i, v in enumerate(head):
        number |= v << (8 * (3 - i))
    return str(ipaddress.IPv4Address(number))


def _aton_part(part: str) -> int | None:
    if not part or not part.isascii() or len(part) > 34:  # 34: 0x + 32 hex digits is already far too big
        return None
    lowered = part.lower()
    try:
        if lowered.startswith("0x"):
            return int(lowered[2:], 16) if lowered[2:] else None
        if len(part) > 1 and part.startswith("0"):
            return int(part, 8)
        return int(part, 10) if part.isdigit() else None
    except ValueError:
        return None


def _ip(text: str) -> IPAddress | None:
    """``text`` as an address, an IPv4-mapped IPv6 address as its IPv4, a zone id (``%eth0``) dropped."""
    try:
        address: IPAddress = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


_LOOPBACK = ("127.0.0.0/8", "::1/128")
#: Never a backend when bound off loopback: "this network" and unspecified, link-local (where the cloud
#: metadata services answer: 169.254.169.254, fe80::...), and AWS's IPv6 metadata address.
_NEVER = ("0.0.0.0/8", "::/128", "169.254.0.0/16", "fe80::/10", "fd00:ec2::254/128")


class AllowList:
    """The networks a backend address may resolve to: an allowed set minus a denied set."""

    def __init__(self, allowed: Iterable[IPNetwork] | None, denied: Iterable[IPNetwork] = ()) -> None:
        """``allowed`` None means every address."""
        self.allowed = None if allowed is None else tuple(allowed)
        self.denied = tuple(denied)

    @classmethod
    def parse(cls, text: str) -> AllowList:
        """``"127.0.0.0/8,::1/128"`` (a bare IP is a /32 or /128); ``"any"`` admits every address."""
        items = [t.strip() for t in str(text).split(",") if t.strip()]
        if not items:
            raise AddressError("the backend allow-list is empty; give CIDRs such as 127.0.0.0/8, or 'any'")
        if any(t.lower() == "any" for t in items):
            if len(items) > 1:
                raise AddressError("'any' admits every address; give it alone")
            return cls(None)
        networks = []
        for item in items:
            try:
                networks.append(ipaddress.ip_network(item, strict=True))
            except ValueError as exc:
                if "host bits set" in str(exc):
                    loose = ipaddress.ip_network(item, strict=False)
                    raise AddressError(f"{item!r} has host bits set; did you mean {loose}?") from None
                raise AddressError(f"{item!r} is not a network in CIDR form (e.g. 10.0.0.0/8)") from None
        return cls(networks)

    @classmethod
    def default_for(cls, bind_host: str) -> AllowList:
        """Loopback only when bound to loopback; else everything except link-local, metadata and unspecified."""
        if _is_loopback_host(bind_host):
            return cls(ipaddress.ip_network(n) for n in _LOOPBACK)
        return cls(None, (ipaddress.ip_network(n) for n in _NEVER))

    def permits(self, ip: str) -> bool:
        """True if the address ``ip`` lies in an allowed network and no denied one; False for a non-IP."""
        address = _ip(ip)
        if address is None:
            return False
        if any(address in net for net in self.denied if net.version == address.version):
            return False
        if self.allowed is None:
            return True
        return any(address in net for net in self.allowed if net.version == address.version)

    def __str__(self) -> str:
        allowed = "any" if self.allowed is None else ",".join(str(n) for n in self.allowed)
        if self.denied:
            return f"{allowed} except {','.join(str(n) for n in self.denied)}"
        return allowed

    def __repr__(self) -> str:
        return f"AllowList({str(self)!r})"


def _is_loopback_host(host: str) -> bool:
    host = (host or "").strip().lower()
    if host in ("localhost", "localhost."):
        return True
    address = _ip(numeric_host(host) or host)
    return address is not None and address.is_loopback
