"""The limits every server process puts on its connections, and their defaults.

Apart from :mod:`live.connections`, which enforces them, so the command line can
show the defaults without importing aiohttp. Each is a server option of
``testbed node``, ``registry`` and ``balancer`` (``experiments/server_options.py``).

The default connection cap, :func:`default_max_connections`, leaves room under
the process's open-file limit for the balancer's second descriptor per proxied
connection (its upstream side) and for the listening socket, logs, the
registry and health checks: with this machine's limit of 20,000 it is 9,872.
"""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

__all__ = ["FDS_PER_CONNECTION", "RESERVED_FDS", "ServerLimits", "default_max_connections", "raise_open_file_limit"]

#: Descriptors kept free under the open-file limit (listening socket, logs, registry, health checks, files).
RESERVED_FDS = 256
#: Descriptors one client connection may cost: the balancer's client side and its upstream side.
FDS_PER_CONNECTION = 2


#: The soft open-file limit a process raises itself to (when the hard limit allows).
OPEN_FILE_TARGET = 65_536


def raise_open_file_limit(target: int = OPEN_FILE_TARGET) -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to ``min(hard, target)`` if it is lower; return the soft limit now.

    Many systems start processes with a soft limit of 1,024 and a far higher hard limit; a server bounded by
    the soft one would refuse its 385th client. The hard limit is the administrator's word, the soft one only a
    default, so servers raise it (Go's runtime does at start, nginx has ``worker_rlimit_nofile``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = target if hard == resource.RLIM_INFINITY else min(hard, target)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
        except (ValueError, OSError):
            pass  # not allowed here: keep the soft limit, and the defaults that follow from it
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


def default_max_connections(open_file_limit: int | None = None) -> int:
    """``(open-file limit - RESERVED_FDS) / FDS_PER_CONNECTION``, at least 1; the limit is the process's soft
    ``RLIMIT_NOFILE`` unless given."""
    if open_file_limit is None:
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_file_limit = soft if soft != resource.RLIM_INFINITY else 1 << 20
    return max(1, (open_file_limit - RESERVED_FDS) // FDS_PER_CONNECTION)


@dataclass(frozen=True)
class ServerLimits:
    """What one server process allows a connection (:mod:`live.connections` says how each is enforced)."""

    #: Seconds a request's headers may take, from the connection opening or from the request's first byte.
    header_timeout_s: float = 10.0
    #: Seconds an idle keep-alive connection stays open. Longer than the idle time of common client pools
    #: (aiohttp's 15 s, a cloud load balancer's 60 s), as nginx's 75 s is, so the server is rarely the side
    #: that closes a connection a client is about to reuse (that race costs a failed or retried request);
    #: an idle connection costs one descriptor, and ``max_connections`` bounds those.
    keepalive_timeout_s: float = 75.0
    #: Seconds a request's JSON body may take to arrive once its headers are in (nginx's
    #: ``client_body_timeout``); past it: 408, closed. The bodies the servers read are a few KB.
    body_timeout_s: float = 10.0
    #: Open connections at most; past it a new one is answered 503 and closed.
    max_connections: int = 10_000
    #: Longest request line, and longest header line (name and value), in bytes (aiohttp's default).
    max_line_bytes: int = 8190
    #: Most header lines in one request (Envoy's default ``max_headers_count``).
    max_headers: int = 100

    def __post_init__(self) -> None:
        for name in ("header_timeout_s", "keepalive_timeout_s", "body_timeout_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
                raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
        for name, low in (("max_connections", 1), ("max_line_bytes", 64), ("max_headers", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")

    def handler_args(self) -> dict[str, Any]:
        """The aiohttp ``RequestHandler`` arguments these limits set."""
        return {"keepalive_timeout": self.keepalive_timeout_s, "max_line_size": self.max_line_bytes,
                "max_field_size": self.max_line_bytes, "max_headers": self.max_headers}
