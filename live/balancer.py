"""``testbed balancer``: a reverse proxy that picks backends with the core strategies.

Theory of operation
-------------------
Every request, whatever its method, path, query, headers and body, is sent to
one backend, and the backend's status, headers and body come back unchanged
(plus ``X-Backend`` and ``Via``). Requests travel on pooled keep-alive
connections (:mod:`live.upstream`); health checks and registry polls
(:mod:`live.backends`) use an aiohttp ``ClientSession``.

The books are core's: :class:`core.balancer_state.BalancerState`, the very
object the simulator drives, picks through the strategy (immutable ``Backend``
snapshots: requests in flight through this balancer, workers as weight,
health, latency EWMA) and keeps each backend's health tracker (active checks
of ``/health`` every ``health_interval_s``, and refused connections), latency
EWMA and *ejector* (``eject_after_failures`` consecutive 5xx or connection
failures take the backend out for ``ejection_time_s``, then a probe decides).
This module sends the bytes and tells the books how each attempt ended: refused,
answered (a timeout is a 504, a broken exchange a 502), or abandoned (the
client went away, sent too much or too slowly, or a local error: the ejector's
permit goes back unjudged, on every way out). "Elapsed", for the latency EWMA
and ``answered``, is the simulator's: until the response is complete (its last
byte relayed), not until its headers.

A connection that fails before anything was sent is retried once on another
backend for idempotent methods (core's rule, :meth:`BalancerState.may_retry`).
No healthy backend: 503. A backend slower than ``timeout_s`` to answer: 504.
Membership comes from ``--nodes`` or, with ``--registry``, from the registry's
``GET /nodes``, refreshed every ``refresh_s``. The balancer listens once it
knows its backends (first listing, first checks: the warm-up of
:mod:`live.backends`, at most ``warmup_timeout_s``).

State changes. The books' own record of each backend's health flips and
ejector transitions (:meth:`core.balancer_state.BalancerState.drain_events`,
timed on this process's ``time.monotonic`` clock) is drained by the health
task about ten times a second (and before a backend leaves the books) into a
ring of the newest ``EVENTS_KEPT``, which ``GET /lb-events?since=N`` serves
(:func:`live.http.events_response`: the events from number N on, the
number to ask for next, how many a late reader missed). ``testbed live run``
reads them into its timeline.

What is refused before any backend is picked (so no permit is taken)
---------------------------------------------------------------------
* ``/admin/*`` in any spelling a backend might resolve to it (percent-encoded,
  ``//``, dot-segments, ``\\``, ``;params``, any case): ``403 admin_not_proxied``.
  A node's admin endpoint is for its operator on loopback, never for clients of
  the balancer; 403 (not 404) says the balancer refused, which is the truth.
* A request whose ``Via`` already names this balancer: ``508 loop_detected``
  (a balancer listed as its own backend, or two balancers pointing at each other).
* A ``Content-Length`` over ``max_body_bytes``: ``413 body_too_large``, before
  the body is read and before anything goes upstream.

Headers
-------
Header fields are forwarded as the bytes the client sent (``raw_headers``), so
a value aiohttp cannot decode (obs-text, UTF-8) reaches the backend unchanged
instead of failing a re-encoding (the parser has already refused CR, LF, NUL and
other controls). Never forwarded: hop-by-hop fields (RFC 9110 7.6.1: ``Connection``
and every field it names, ``Proxy-Connection`` likewise, ``Keep-Alive``, ``TE``,
``Upgrade``, ...), the framing (``Host``, ``Content-Length``, ``Transfer-Encoding``,
set for the backend) and ``Expect`` (the balancer answers ``100-continue``
itself, as Envoy does, and streams the body). Who the client is: only a peer in
``trust_clients`` may say (``X-Client-ID``, ``Forwarded``, ``X-Real-IP`` pass, its
``X-Forwarded-For`` is extended with the peer); from anyone else those fields are
dropped and ``X-Forwarded-For`` is the peer alone.

Bodies
------
A request body up to ``_SMALL_BODY_BYTES`` with a ``Content-Length`` is read
whole and sent with the head in one write; a larger or chunked one streams to
the backend (``request.content``) while it arrives, counted against
``max_body_bytes``: past it the upstream exchange is aborted (its connection
closed mid-body) and the client gets ``413``. A response that arrived whole with
its headers goes back as one ``web.Response``; a longer one streams through a
``web.StreamResponse`` with bounded buffers on both sides (the upstream
connection stops reading while the client is slow). Once its headers are sent,
a response cannot become a 502: if the backend breaks or stalls mid-body the
client's connection is closed before the body is complete (a short
``Content-Length`` body or a chunked body without its last chunk), which is
what nginx and Envoy do. ``timeout_s`` bounds each stall of either side.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
from aiohttp import web
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError
from multidict import CIMultiDict

from core.balancer_state import Attempt, BackendEntry, BalancerState, feeds_latency
from core.events import EVENTS_KEPT, EventRing
from core.client_key import TrustedProxies
from core.scenario import BalancerSpec
from core.strategies import STRATEGIES, BaseStrategy, NoHealthyBackend, Strategy
from live.backends import NOT_CHECKED, backends_stats, entry_stats, running
from live.dashboard import DashboardConfig, add_dashboard
from live.http import error_response, events_response, json_error, metrics_response
from live.metrics import BalancerMetrics
from live.openapi import balancer_description, serve as serve_openapi
from live.upstream import (MAX_RESPONSE_HEADER_BYTES, MAX_RESPONSE_HEADERS, Body, ConnectFailed, UpstreamError,
                           UpstreamPool, UpstreamResponse)

__all__ = ["BalancerConfig", "make_balancer_app", "parse_node"]

log = logging.getLogger("testbed.balancer")

# Request fields never forwarded (see the module docstring): hop-by-hop, the framing, Expect.
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"proxy-authenticate",
                         b"proxy-authorization", b"te", b"trailer", b"upgrade", b"host", b"content-length",
                         b"transfer-encoding", b"expect"})
# What a client says about who it is: forwarded only from a trusted peer.
_CLIENT_CLAIMS = frozenset({b"x-forwarded-for", b"x-client-id", b"forwarded", b"x-real-ip"})
_UNTRUSTED_DROP = _HOP_BY_HOP | _CLIENT_CLAIMS
_TRUSTED_DROP = _HOP_BY_HOP | {b"x-forwarded-for"}  # the chain goes on, with the peer at its end
# Response fields never relayed: hop-by-hop, and the framing aiohttp sets for the client.
_RESPONSE_HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate", "te",
                                  "trailer", "upgrade", "transfer-encoding", "content-length"})
_CONNECTION_OPTIONS = frozenset({b"close", b"keep-alive", b""})  # Connection tokens that name no field
#: A request body with a Content-Length up to this is read whole and sent in one write (the fast path).
_SMALL_BODY_BYTES = 64 * 1024


def admin_path(path: str) -> bool:
    """Whether a backend could resolve the (percent-decoded) ``path`` to ``/admin`` or below it.

    Done as the most lenient server would: ``\\`` taken for ``/``, empty and ``.``
    segments dropped, ``..`` resolved, ``;params`` cut from each segment, case
    ignored. aiohttp's own router (the node's) is stricter: all it would match is
    a subset of this."""
    lowered = path.lower()
    if "admin" not in lowered:
        return False  # the fast path: no spelling of the prefix without the word
    segments: list[str] = []
    for segment in lowered.replace("\\", "/").split("/"):
        segment = segment.split(";", 1)[0]
        if segment in ("", "."):
            continue
        if segment == "..":
            if segments:
                segments.pop()
            continue
        segments.append(segment)
    return bool(segments) and segments[0] == "admin"


_CLIENT_BODY_CODES = {400: "incomplete_body", 408: "request_timeout", 413: "body_too_large"}


def _too_large_message(limit: int, size: int) -> str:
    return f"the request body ({size:,} bytes or more) is over the balancer's limit of {limit:,} bytes (--max-body)"


def _too_large(limit: int, size: int) -> web.Response:
    return json_error(413, "body_too_large", _too_large_message(limit, size), limit_bytes=limit)


def _content_length(headers: list[tuple[str, str]]) -> int | None:
    for name, value in headers:
        if name.lower() == "content-length":
            return int(value) if value.strip().isdigit() else None
    return None


def _named_by(values: list[bytes]) -> frozenset[bytes]:
    """The field names a ``Connection`` (or ``Proxy-Connection``) header lists, options aside."""
    return frozenset(token.strip().lower() for value in values for token in value.split(b",")) - _CONNECTION_OPTIONS


def parse_node(spec: str) -> str:
    """``5001`` -> ``http://127.0.0.1:5001``; ``host:port`` -> ``http://host:port``; URLs stay."""
    spec = spec.strip()
    if spec.isdigit():
        if not 0 < int(spec) < 65536:
            raise ValueError(f"{spec!r} is not a port (1-65535)")
        return f"http://127.0.0.1:{int(spec)}"
    if spec.startswith(("http://", "https://")):
        return spec.rstrip("/")
    host, sep, port = spec.rpartition(":")
    if sep and host and port.isdigit() and 0 < int(port) < 65536:
        return f"http://{host}:{port}"
    raise ValueError(f"{spec!r} is not a port, host:port or http:// URL")


@dataclass(frozen=True)
class BalancerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    nodes: tuple[str, ...] = ()
    registry: str | None = None
    # One set of defaults: the scenario's balancer type's.
    strategy: str = BalancerSpec.strategy
    health_interval_s: float = BalancerSpec.health_check_interval_s
    unhealthy_after: int = BalancerSpec.unhealthy_after
    timeout_s: float = BalancerSpec.timeout_s
    retry_connect_failures: bool = BalancerSpec.retry_connect_failures
    eject_after_failures: int = BalancerSpec.eject_after_failures
    ejection_time_s: float = BalancerSpec.ejection_time_s
    refresh_s: float = 2.0
    seed: int | None = None
    max_body_bytes: int = 16 * 1024 * 1024        # request bodies past it: 413
    trust_clients: tuple[str, ...] = ()           # CIDRs whose X-Client-ID / X-Forwarded-For are believed
    balancer_id: str = ""                         # this balancer's name in Via ("": a random lb-<hex>)
    # The backends (live/backends.py): health checks, hung backends, the registry's members.
    health_timeout_s: float | None = None         # a health check's timeout (None: half the interval)
    health_concurrency: int = 32                  # health checks running at once
    stall_after_s: float | None = None            # hung-backend floor (None: the health timeout; 0: off)
    stall_factor: float = 10.0                    # ... or this many latency EWMAs, if longer
    max_backends: int = 1000                      # registry members past it are left out
    allow_backends: str | None = None             # CIDR,... where backends may be (None: AllowList.default_for(host))
    warmup_timeout_s: float = 2.0                 # first registry poll and checks before listening, at most (0: none)
    max_response_header_bytes: int = MAX_RESPONSE_HEADER_BYTES  # a backend's response head past it: 502
    max_response_headers: int = MAX_RESPONSE_HEADERS            # ... or with more header fields than this: 502
    events_kept: int = EVENTS_KEPT                # state changes GET /lb-events keeps, the newest

    def __post_init__(self) -> None:
        if self.events_kept < 1:
            raise ValueError(f"events_kept must be >= 1, got {self.events_kept}")
        if self.max_body_bytes < 0:
            raise ValueError(f"max_body_bytes must be >= 0, got {self.max_body_bytes}")
        if self.max_response_header_bytes < 1 or self.max_response_headers < 1:
            raise ValueError("max_response_header_bytes and max_response_headers must be >= 1")
        if not 0 <= self.warmup_timeout_s <= 3600:
            raise ValueError(f"warmup_timeout_s must be 0-3600 s, got {self.warmup_timeout_s}")
        try:
            TrustedProxies.parse(self.trust_clients)
        except ValueError as exc:
            raise ValueError(f"trust_clients: {exc}") from None

    @property
    def spec(self) -> BalancerSpec:
        """The balancer as core's books see it: the scenario's own balancer type."""
        return BalancerSpec(self.strategy, self.health_interval_s, self.unhealthy_after, self.retry_connect_failures,
                            self.eject_after_failures, self.ejection_time_s, self.timeout_s)


class Seen:
    """What the live balancer keeps beside core's books for one backend: for ``/lb-stats`` only."""

    __slots__ = ("recent", "last_check")

    def __init__(self) -> None:
        self.recent: deque[float] = deque(maxlen=10_000)  # elapsed s of answers that feed the latency EWMA
        self.last_check = NOT_CHECKED


def _entry_stats(entry: BackendEntry, now: float, total: int) -> dict[str, Any]:
    seen: Seen = entry.driver
    lat = np.fromiter(seen.recent, float) * 1000 if seen.recent else None
    return {
        "url": entry.url, "weight": entry.weight, "requests": entry.requests, "active": entry.active,
        "errors": entry.errors, "share": entry.requests / total if total else 0.0,
        "healthy": entry.health.healthy, "last_check": seen.last_check,
        "ejector": None if entry.ejector is None else entry.ejector.status(now=now)["state"],
        "latency_ms": None if lat is None else {
            "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
            "p99": float(np.percentile(lat, 99)), "ewma": (entry.latency.value or 0.0) * 1000},
        **entry_stats(entry, now),
    }


class Balancer:
    """The proxy and its background work around core's books (:class:`core.balancer_state.BalancerState`)."""

    def __init__(self, config: BalancerConfig, strategy: Strategy, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        self.state = BalancerState(config.spec, strategy)
        for url in config.nodes:
            self.join(url, url, 1)
        self.metrics = BalancerMetrics()
        self.session: aiohttp.ClientSession | None = None  # health checks and the registry
        self.upstream: UpstreamPool | None = None         # proxied requests
        self.no_backend = 0
        self.id = config.balancer_id or f"lb-{secrets.token_hex(4)}"
        self._via = self.id.encode("latin-1")
        self._via_line = b"Via: 1.1 %s\r\n" % self._via
        self.trusted_clients = TrustedProxies.parse(config.trust_clients)
        self.events: EventRing[dict[str, Any]] = EventRing(config.events_kept)  # GET /lb-events

    def drain_events(self) -> None:
        """The books' state changes up to now (health, ejector) into :attr:`events`: an ejection whose time is
        up has moved OPEN -> HALF_OPEN first, dated at its deadline, whether or not a request came since."""
        self.events.extend(event.as_dict() for event in self.state.drain_events(now=self.clock()))

    def join(self, backend_id: str, url: str, weight: int) -> BackendEntry:
        entry = self.state.add(backend_id, url, weight)
        entry.driver = Seen()
        return entry

    # -- what is refused before a pick ----------------------------------------
    def refusal(self, request: web.Request) -> web.Response | None:
        """The answer to a request the balancer will not send anywhere (``/admin/*``, a body over the limit)."""
        if admin_path(request.path):
            return json_error(403, "admin_not_proxied",
                              "the balancer never proxies /admin/*; a node's admin endpoint is for its operator, "
                              "on the node's own address", path=request.path)
        if request.body_exists:
            length = request.content_length
            if length is not None and length > self.config.max_body_bytes:
                return _too_large(self.config.max_body_bytes, length)
        return None

    def trusts(self, peer: str) -> bool:
        """Whether ``peer`` (an address) is in ``trust_clients`` (the node's rule for its trusted proxies)."""
        return self.trusted_clients.trusts(peer)

    def upstream_head(self, request: web.Request, named: frozenset[bytes] = frozenset()) -> bytes | web.Response:
        """The header lines for the backend (``Name: value\\r\\n`` each), or ``508`` if this balancer is in ``Via``.

        ``named``: fields the client's ``Connection`` header made hop-by-hop (found by a first pass)."""
        peer = request.remote or "unknown"
        trusted = bool(self.trusted_clients) and self.trusted_clients.trusts(peer)
        drop = _TRUSTED_DROP if trusted else _UNTRUSTED_DROP
        if named:
            drop = drop | named
        lines: list[bytes] = []
        prior: list[bytes] = []
        connection: list[bytes] = []
        for name, value in request.raw_headers:
            low = name.lower()
            if low in drop:
                if low == b"connection" or low == b"proxy-connection":
                    connection.append(value)
                elif low == b"x-forwarded-for" and trusted:
                    prior.append(value)
                continue
            if low == b"via" and self._via in value and self._names_me(value):
                return json_error(508, "loop_detected",
                                  f"this request has been through balancer {self.id} already (Via: "
                                  f"{value.decode('latin-1')}): a balancer is its own backend, directly or not",
                                  balancer=self.id)
            lines.append(b"%s: %s\r\n" % (name, value))
        if connection and not named:
            extra = _named_by(connection)
            if extra:
                return self.upstream_head(request, extra)
        xff = peer.encode("latin-1")
        if prior:
            xff = b"%s, %s" % (b", ".join(prior), xff)
        lines.append(b"X-Forwarded-For: %s\r\n" % xff)
        lines.append(self._via_line)
        return b"".join(lines)

    def _names_me(self, via: bytes) -> bool:
        """Whether a ``Via`` value (``1.1 name, 1.1 other``) lists this balancer as a hop."""
        for hop in via.split(b","):
            parts = hop.split()
            if len(parts) >= 2 and parts[1] == self._via:
                return True
        return False

    # -- the proxy -----------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Send ``request`` where core's books say, and settle the attempt however it ends."""
        refused = self.refusal(request)
        if refused is not None:
            return refused
        head = self.upstream_head(request)
        if not isinstance(head, bytes):
            return head
        body: Body = b""
        length = None
        if request.body_exists:
            length = request.content_length
            if length is not None and length <= _SMALL_BODY_BYTES:
                whole = await self._read_small(request)
                if not isinstance(whole, bytes):
                    return whole
                body = whole
            else:
                body = self._streamed_body(request)
        target = request.rel_url.raw_path_qs.encode("utf-8", "surrogateescape")
        state, clock = self.state, self.clock
        excluded: tuple[str, ...] = ()
        while True:
            try:
                attempt = state.pick(now=clock(), exclude=excluded, number=len(excluded) + 1)
            except NoHealthyBackend:
                if excluded:  # the retry found nowhere else to go: report the refusal itself
                    return json_error(502, "backend_unreachable",
                                      f"backend {excluded[0]} refused the connection and no other "
                                      "backend is healthy", backend=excluded[0])
                self.no_backend += 1
                return json_error(503, "no_healthy_backend",
                                  f"none of the {len(state.backends)} backends is healthy",
                                  backends=len(state.backends))
            backend = attempt.backend
            started = clock()
            try:
                assert self.upstream is not None
                response = await self.upstream.exchange(backend.url, request.method, target, head, body,
                                                        length=length)
            except ConnectFailed as exc:  # nothing was sent, not even a streamed body's first byte
                state.refused(attempt, now=clock())
                if state.may_retry(attempt, request.method):
                    excluded += (backend.id,)
                    continue
                return json_error(502, "backend_unreachable", f"backend {backend.id} refused the connection: {exc}",
                                  backend=backend.id)
            except asyncio.TimeoutError:
                state.answered(attempt, status=504, elapsed_s=clock() - started, now=clock())
                return json_error(504, "backend_timeout",
                                  f"backend {backend.id} did not answer within {self.config.timeout_s:g} s",
                                  backend=backend.id)
            except UpstreamError as exc:
                state.answered(attempt, status=502, elapsed_s=clock() - started, now=clock())
                return json_error(502, "backend_error", f"backend {backend.id} failed: {exc}", backend=backend.id)
            except web.HTTPException as exc:  # the client's body: too large, too slow, cut short (unjudged)
                return json_error(exc.status, _CLIENT_BODY_CODES.get(exc.status), exc.text or exc.reason)
            else:
                return await self._relay(request, attempt, response, started)
            finally:
                state.abandoned(attempt, now=clock())  # any other way out (cancelled, a local error): unjudged

    async def _relay(self, request: web.Request, attempt: Attempt, response: UpstreamResponse,
                     started: float) -> web.StreamResponse:
        """Send the backend's response to the client; ``answered`` once it is complete."""
        state, clock, backend = self.state, self.clock, attempt.backend
        try:
            headers = self._response_headers(response.headers, backend.id)
            if response.complete:  # the fast path: it all came with the headers
                payload = response.body()
                self._answered(attempt, response.status, clock() - started)
                return web.Response(status=response.status, body=payload, headers=headers)
            out = web.StreamResponse(status=response.status, headers=headers)
            length = _content_length(response.headers)
            if length is not None:
                out.content_length = length
            try:
                await out.prepare(request)
            except ConnectionError:
                return out  # the client left before the headers went out: unjudged
            timeout_s = self.config.timeout_s
            while True:
                try:
                    chunk = await response.read()
                except (asyncio.TimeoutError, UpstreamError) as exc:
                    # Too late for a 502 or 504: the client's connection closes with the body short.
                    status = 504 if isinstance(exc, asyncio.TimeoutError) else 502
                    state.answered(attempt, status=status, elapsed_s=clock() - started, now=clock())
                    log.warning("backend %s broke off a response: %s", backend.id, exc or type(exc).__name__)
                    request.protocol.force_close()
                    return out
                if not chunk:
                    break
                try:
                    async with asyncio.timeout(timeout_s):
                        await out.write(chunk)
                except (asyncio.TimeoutError, ConnectionError):
                    request.protocol.force_close()  # the client stopped reading or left: unjudged
                    return out
            self._answered(attempt, response.status, clock() - started)
            return out
        finally:
            response.close()

    def _answered(self, attempt: Attempt, status: int, elapsed: float) -> None:
        self.state.answered(attempt, status=status, elapsed_s=elapsed, now=self.clock())
        if feeds_latency(status):
            attempt.backend.driver.recent.append(elapsed)
        self.metrics.observe(attempt.backend.id, status, elapsed)

    def _response_headers(self, raw: list[tuple[str, str]], backend_id: str) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict()
        connection = []
        for name, value in raw:
            low = name.lower()
            if low in _RESPONSE_HOP_BY_HOP:
                if low == "connection" or low == "proxy-connection":
                    connection.append(value)
                continue
            headers.add(name, value)
        if connection:
            for named in _named_by([v.encode("latin-1", "replace") for v in connection]):
                headers.popall(named.decode("latin-1"), None)
        headers.add("Via", f"1.1 {self.id}")
        headers["X-Backend"] = backend_id
        return headers

    async def _read_small(self, request: web.Request) -> bytes | web.Response:
        """A small body, whole, before any backend is picked (a slow client holds no permit)."""
        try:
            async with asyncio.timeout(self.config.timeout_s):
                return await request.read()
        except asyncio.TimeoutError:
            return json_error(408, "request_timeout",
                              f"the request body did not arrive within {self.config.timeout_s:g} s")
        except web.HTTPException as exc:
            return json_error(exc.status, _CLIENT_BODY_CODES.get(exc.status), exc.text or exc.reason)
        except (ConnectionError, aiohttp.ClientPayloadError, HttpProcessingError) as exc:
            return json_error(400, "incomplete_body", f"the request body was cut short: {exc}")

    def _streamed_body(self, request: web.Request) -> Callable[[], Awaitable[bytes]]:
        """The next piece of a large or chunked body, counted against ``max_body_bytes``; ``b""`` at its end.

        Its errors are the client's, as aiohttp exceptions (413, 408, 400), never ``TimeoutError`` or
        ``UpstreamError``: the upstream pool passes them through and the books do not judge the backend."""
        content, limit, timeout_s = request.content, self.config.max_body_bytes, self.config.timeout_s
        received = 0

        async def read_chunk() -> bytes:
            nonlocal received
            try:
                async with asyncio.timeout(timeout_s):
                    # The pieces as they came off the socket: readany() would join what is buffered into
                    # one more copy (40 concurrent 15 MB uploads peaked at 117 MB that way, 80-95 MB this way).
                    chunk, end_of_http_chunk = await content.readchunk()
                    while not chunk and end_of_http_chunk:  # (b"", True): a chunk boundary, not the end
                        chunk, end_of_http_chunk = await content.readchunk()
            except asyncio.TimeoutError:
                raise web.HTTPRequestTimeout(
                    text=f"the request body stalled for {timeout_s:g} s after {received} bytes") from None
            except Exception as exc:  # noqa: BLE001 - the client's connection or framing broke
                raise web.HTTPBadRequest(text=f"the request body was cut short after {received} bytes: "
                                              f"{exc or type(exc).__name__}") from None
            received += len(chunk)
            if received > limit:
                raise web.HTTPRequestEntityTooLarge(limit, received, text=_too_large_message(limit, received))
            return chunk
        return read_chunk

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        backends = self.state.backends
        total = self.state.total_requests
        return {"id": self.id, "strategy": self.config.strategy, "requests": total, "no_healthy_backend": self.no_backend,
                **backends_stats(self), "backends": {b.id: _entry_stats(b, now, total) for b in backends.values()}}


STATE = web.AppKey("balancer", Balancer)


async def lb_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats())


async def lb_events(request: web.Request) -> web.Response:
    """``GET /lb-events?since=N``: health flips and ejector transitions (see the module docstring)."""
    lb = request.app[STATE]
    lb.drain_events()
    return events_response(request, lb.events)


async def metrics(request: web.Request) -> web.Response:
    lb = request.app[STATE]
    now = lb.clock()
    body = lb.metrics.render((b.id, b.active, b.available(now)) for b in lb.state.backends.values())
    return metrics_response(body)


async def proxy(request: web.Request) -> web.StreamResponse:
    try:
        return await request.app[STATE].proxy(request)
    except Exception as exc:  # noqa: BLE001 - JSON errors, as everywhere
        return error_response(request, exc)


async def expect_continue(request: web.Request) -> web.StreamResponse | None:
    """``Expect`` on a proxied request: the final answer now if the balancer would refuse the request anyway
    (so the client need not send the body), else ``100 Continue`` from the balancer itself, which then
    streams the body; ``Expect`` is not forwarded (RFC 9110 10.1.1; Envoy does the same)."""
    lb = request.app[STATE]
    refused = lb.refusal(request)
    if refused is None:
        head = lb.upstream_head(request)
        refused = head if isinstance(head, web.Response) else None
    if refused is not None:
        return refused
    if request.version == HttpVersion11:
        expect = request.headers.get("Expect", "")
        if expect.lower() != "100-continue":
            return json_error(417, "expectation_failed", f"unknown expectation {expect!r}; only 100-continue is known")
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # as aiohttp's own handler: the 100 is not part of the response
    return None


async def _background(app: web.Application) -> Any:
    """The clients, then the warm-up and the background work (:func:`live.backends.running`): aiohttp runs
    this before the listening socket opens, so the balancer listens once it knows its backends."""
    lb = app[STATE]
    lb.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=lb.config.timeout_s))
    lb.upstream = UpstreamPool(timeout_s=lb.config.timeout_s, max_header_bytes=lb.config.max_response_header_bytes,
                               max_headers=lb.config.max_response_headers)
    try:
        async with running(lb):
            yield
    finally:
        await lb.session.close()
        lb.upstream.close()


def make_balancer_app(config: BalancerConfig, *, strategy_cls: type[BaseStrategy] | None = None,
                      clock: Callable[[], float] | None = None,
                      dashboard: DashboardConfig | None = None) -> web.Application:
    """The balancer's aiohttp application. ``strategy_cls`` defaults to the class ``core`` registers
    under ``config.strategy``; whose exercise code runs is the command line's choice. ``dashboard``:
    how ``GET /dashboard`` behaves (:mod:`live.dashboard`; None: its defaults)."""
    if clock is None:
        clock = time.monotonic  # what the default event loop's loop.time() reads
    strategy = (strategy_cls or STRATEGIES[config.strategy])(rng=random.Random(config.seed))
    # No middleware: aiohttp adds a layer of its own to apps that have any, and the proxy path
    # is hot. Errors become JSON in the handlers (the catch-all route leaves no 404/405).
    app = web.Application(client_max_size=config.max_body_bytes)
    app[STATE] = Balancer(config, strategy, clock)
    app.router.add_get("/lb-stats", lb_stats)
    app.router.add_get("/lb-events", lb_events)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", serve_openapi(balancer_description()))
    add_dashboard(app, app[STATE], dashboard)  # GET /dashboard*: the balancer's own, before the catch-all
    app.router.add_route("*", "/{tail:.*}", proxy, expect_handler=expect_continue)
    app.cleanup_ctx.append(_background)
    return app
