"""Resolve a backend address and check every address it leads to against an allow-list.

The shape and the policy are in :mod:`core.addresses`; this is the I/O: a
numeric host is decoded without a lookup, a name goes through the event loop's
``getaddrinfo`` (the OS resolver, in a thread) bounded by ``timeout_s``, and
the backend is refused unless *every* address the name resolves to is
permitted (a name with one good and one bad address could be steered to the
bad one by the resolver's order). A name that resolves now may resolve
elsewhere later (DNS rebinding), and the balancer's upstream pool connects by
name without checking again: a backend registered by host name is only as safe
as its DNS. Register numeric addresses where that matters (the live runner does).
"""

from __future__ import annotations

import asyncio
import socket

from core.addresses import AddressError, AllowList, BackendAddress, numeric_host, parse_backend_url

__all__ = ["DEFAULT_RESOLVE_TIMEOUT_S", "check_backend", "resolve_host"]

#: How long a host name may take to resolve before the backend is refused.
DEFAULT_RESOLVE_TIMEOUT_S = 2.0


async def resolve_host(host: str, port: int, *, timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> list[str]:
    """The IPs ``host`` resolves to (a numeric host without a lookup); AddressError if it does not."""
    numeric = numeric_host(host)
    if numeric is not None:
        return [numeric]
    loop = asyncio.get_running_loop()
    try:
        infos = await asyncio.wait_for(loop.getaddrinfo(host, port, type=socket.SOCK_STREAM), timeout_s)
    except asyncio.TimeoutError:
        raise AddressError(f"resolving {host!r} took longer than {timeout_s:g} s") from None
    except (socket.gaierror, UnicodeError, OSError) as exc:
        reason = getattr(exc, "strerror", None) or str(exc) or type(exc).__name__
        raise AddressError(f"cannot resolve {host!r}: {reason}") from None
    ips = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not ips:
        raise AddressError(f"{host!r} resolves to no address")
    return ips


async def check_backend(url: str, allow: AllowList, *,
                        timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S) -> BackendAddress:
    """``url`` parsed and normalised, if every address its host resolves to is in ``allow``;
    else :class:`AddressError` naming the address and the allowed networks."""
    backend = parse_backend_url(url)
    for ip in await resolve_host(backend.host, backend.port, timeout_s=timeout_s):
        if not allow.permits(ip):
            where = backend.host if ip == backend.host else f"{backend.host} resolves to {ip}, which"
            raise AddressError(f"{where} is not in the allowed backend networks ({allow})")
    return backend
