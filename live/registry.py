"""``testbed registry``: the service registry, an aiohttp face on :class:`core.registry.Membership`.

Endpoints: ``POST /register`` ``{"id", "address", "metadata"?}`` (201 new, 200
known; the answer carries the ``lease``); ``POST /heartbeat/{id}``
``{"metadata"?}`` (404 for an unknown id: register again); ``POST /deregister``
``{"id"}``; ``GET /nodes`` (alive; ``?all=1`` adds the dead not yet forgotten
and the heartbeat times); ``GET /events?since=N`` (the membership changes,
below); ``GET /health``; ``GET /metrics``; ``GET /openapi.json``.

Ownership: heartbeats and deregistrations carry the lease from the register
answer in the ``X-Lease`` header; a missing or stale one is ``409
lease_mismatch`` (register again). A register of a live id at another
address is ``409 conflict``, lease or not: a live node's address never
changes through register (the policy is in the core, :mod:`core.registry`).
With a token (``--token`` or ``TESTBED_REGISTRY_TOKEN``) the writing endpoints
also want ``Authorization: Bearer <token>``: the token says who may write at
all, the lease which instance owns an id.

Checks on ``/register``: unknown fields, a key given twice in one JSON
object (``bad_json``: JSON leaves duplicates undefined and the parser would
keep the last silently), a node id outside
:data:`core.registry.NODE_ID_RULE`, metadata over its limits, an address that
is not ``http://host:port`` or leads outside ``--allow-backends`` (resolved
with :func:`live.resolve.check_backend`, after the cheap checks so a refused
request costs no lookup) or to this registry's own listening address (its
``/health`` would pass and a balancer would proxy to it; the port comes from
:func:`listening`, as ``serve``'s ``on_listening``) are each a 400 naming the problem; a new id past
``--max-nodes`` is ``503 registry_full`` with ``Retry-After``.

Every ``GET /nodes`` body says which registry answered: ``"registry":
{"instance", "ttl_s", "heartbeat_interval_s"}``, the instance drawn at random
when the process starts. A restarted registry has a new instance and has
forgotten every member until they register again; a balancer that sees the
instance change keeps the members it followed for one ``ttl_s`` meanwhile
(:mod:`core.registry_follower`), instead of following the partial listing.

``GET /nodes`` is served from a cached body, rebuilt only when the table's
``generation`` moves (a join, death, revival, departure or new metadata), so a
balancer polling it four times a second costs a dictionary lookup, not a
serialisation of every member. The cached entries leave out the heartbeat
times, which change on every beat; ``?all=1`` has them, from a body at most
``ALL_REFRESH_S`` old. Expiry is lazy in the core table; a background task
also advances it every second so membership changes are logged and counted
when they happen, not when someone asks.

Membership changes (:class:`core.registry.MembershipChange`: joined,
rejoined, died, revived, left, removed, each with its time on this process's
``time.monotonic`` clock) are drained from the table after every request and
on that tick: logged, counted in ``GET /metrics`` and kept, the newest
``EVENTS_KEPT``, in an :class:`EventRing` numbered from 0. ``GET
/events?since=N`` gives those from number N on and the number to ask for next
(``testbed live run`` reads them into its timeline, :mod:`live.run`); a
reader that fell more than ``EVENTS_KEPT`` behind is told how many it
``missed``. The balancer serves its own state changes the same way
(``GET /lb-events``, :mod:`live.balancer`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import time
from dataclasses import asdict
from typing import Any, Awaitable, Callable

from aiohttp import web

from core.addresses import AddressError, AllowList, parse_backend_url
from core.events import EVENTS_KEPT, EventRing
from core.rate_limiter import retry_after
from core.registry import (NODE_ID_RULE, HeartbeatResult, IdTaken, LeaseMismatch, Membership, MetadataLimits,
                           MetadataRefused, RegistryFull, RegistryRefusal, is_own_address, valid_node_id)
from live.http import (cancel_and_wait, error_middleware, events_response, json_error, metrics_response, read_json,
                       reject_unknown, require)
from live.metrics import RegistryMetrics
from live.openapi import registry_description, serve as serve_openapi
from live.resolve import DEFAULT_RESOLVE_TIMEOUT_S, check_backend, resolve_host

__all__ = ["ALL_REFRESH_S", "DEFAULT_MAX_NODES", "LEASE_HEADER", "listening", "make_registry_app"]

log = logging.getLogger("testbed.registry")

#: The header that carries a node's lease on heartbeats, deregistrations and re-registrations.
LEASE_HEADER = "X-Lease"
DEFAULT_MAX_NODES = 1000
#: How old a ``GET /nodes?all=1`` body may be (its heartbeat times move on every beat).
ALL_REFRESH_S = 1.0


class Settings:
    """What the handlers need besides the table: who may write, where backends may live."""

    def __init__(self, token: str, allow: AllowList, resolve_timeout_s: float, host: str) -> None:
        self.token = token.encode("utf-8", "surrogateescape")
        self.allow = allow
        self.resolve_timeout_s = resolve_timeout_s
        self.host = host
        self.port: int | None = None  # the bound port, once :func:`listening` says


class Listing:
    """The serialised ``GET /nodes`` bodies, rebuilt when the table's generation moves; each names the
    registry ``instance`` and its timings (a fixed piece of JSON, made once)."""

    def __init__(self, instance: str, table: Membership) -> None:
        self.instance = instance
        self.info: dict[str, Any] = {"instance": instance, "ttl_s": table.ttl_s,
                                     "heartbeat_interval_s": table.heartbeat_interval_s}
        self.registry = _dumps(self.info).decode()
        self.alive_generation = -1
        self.alive = b""
        self.all_generation = -1
        self.all_built_at = float("-inf")
        self.all = b""

    def alive_body(self, table: Membership, now: float) -> bytes:
        generation = table.generation(now=now)
        if generation != self.alive_generation:
            entries = table.alive_json(now=now)
            count = table.counts(now=now)["alive"]
            self.alive = f'{{"nodes":{entries},"count":{count},"registry":{self.registry}}}'.encode()
            self.alive_generation = generation
        return self.alive

    def all_body(self, table: Membership, now: float) -> bytes:
        generation = table.generation(now=now)
        if generation != self.all_generation or not now - ALL_REFRESH_S < self.all_built_at <= now:
            members = table.members(now=now, include_dead=True)
            self.all = _dumps({"nodes": [m.as_dict(now=now) for m in members], "count": len(members),
                               "registry": self.info})
            self.all_generation, self.all_built_at = generation, now
        return self.all


def _dumps(body: dict[str, Any]) -> bytes:
    # allow_nan=False: the core refuses non-finite metadata, so this can only fail loudly, never emit NaN.
    return json.dumps(body, separators=(",", ":"), allow_nan=False).encode()


MEMBERSHIP = web.AppKey("membership", Membership)
CLOCK = web.AppKey[Callable[[], float]]("clock")
METRICS = web.AppKey("metrics", RegistryMetrics)
SETTINGS = web.AppKey("settings", Settings)
LISTING = web.AppKey("listing", Listing)
EVENTS = web.AppKey[EventRing[dict[str, Any]]]("events")
_PATHS = {"/register", "/deregister", "/nodes", "/events", "/health", "/metrics", "/openapi.json"}
REGISTER_FIELDS = frozenset({"id", "address", "metadata"})
HEARTBEAT_FIELDS = frozenset({"metadata"})
DEREGISTER_FIELDS = frozenset({"id"})


def _now(request: web.Request) -> float:
    return request.app[CLOCK]()


def _drain(app: web.Application) -> None:
    changes = app[MEMBERSHIP].drain_events()
    for change in changes:
        app[METRICS].changes.labels(change.kind).inc()
        log.info("%s %s at %.3f", change.node_id, change.kind, change.at)
    app[EVENTS].extend(asdict(change) for change in changes)


def _authorized(request: web.Request, token: bytes) -> bool:
    """Constant-time check of ``Authorization: Bearer <token>``. Header values arrive decoded as UTF-8 with
    surrogate escapes, so encoding them back the same way gives the bytes sent, whatever they were."""
    given = request.headers.get("Authorization", "")
    try:
        raw = given.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:  # not from the wire: a str no byte sequence decodes to
        return False
    return hmac.compare_digest(raw, b"Bearer " + token)


@web.middleware
async def registry_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    token = request.app[SETTINGS].token
    if token and request.method == "POST" and not _authorized(request, token):
        response: web.StreamResponse = json_error(
            401, "unauthorized", "this registry needs 'Authorization: Bearer <token>' for writes")
    else:
        response = await handler(request)
    path = request.path if request.path in _PATHS else ("/heartbeat" if request.path.startswith("/heartbeat/")
                                                        else "other")
    request.app[METRICS].requests.labels(path, str(response.status)).inc()
    _drain(request.app)
    return response


def _refused(exc: RegistryRefusal) -> web.Response:
    """The answer for a refusal of the core table."""
    if isinstance(exc, RegistryFull):
        return json_error(503, exc.code, str(exc), headers={"Retry-After": retry_after(exc.retry_after_s)},
                          max_nodes=exc.max_nodes, retry_after_s=round(exc.retry_after_s, 3))
    if isinstance(exc, LeaseMismatch):
        return json_error(409, exc.code, str(exc), node_id=exc.node_id, action="register")
    if isinstance(exc, IdTaken):
        return json_error(409, exc.code, str(exc), node_id=exc.node_id)
    if isinstance(exc, MetadataRefused):
        return json_error(400, exc.code, str(exc), field="metadata", limit=exc.limit)
    return json_error(exc.status, exc.code, str(exc))


def _bad_id(node_id: str, field: str) -> web.Response:
    return json_error(400, "bad_field", f"field {field!r} must be a node id of {NODE_ID_RULE}, got {node_id[:250]!r}",
                      field=field)


async def _own_address(settings: Settings, host: str, port: int) -> bool:
    """True if ``host:port`` is this registry (a lookup only when the port is ours: rare, so it costs nothing)."""
    if settings.port is None or port != settings.port:
        return False
    ips = await resolve_host(host, port, timeout_s=settings.resolve_timeout_s)
    return is_own_address(ips, port, bound_host=settings.host, bound_port=settings.port)


async def register(request: web.Request) -> web.Response:
    data = await read_json(request)
    reject_unknown(data, REGISTER_FIELDS)
    node_id = require(data, "id", str)
    if not valid_node_id(node_id):
        return _bad_id(node_id, "id")
    address = require(data, "address", str)
    metadata = require(data, "metadata", dict, optional=True) or {}
    lease = request.headers.get(LEASE_HEADER)
    table, settings = request.app[MEMBERSHIP], request.app[SETTINGS]
    try:
        # The cheap refusals first, then the lookup, then the registration, which checks again
        # (the table may have changed while the name resolved).
        table.metadata_limits.check(metadata)
        table.check_register(node_id, parse_backend_url(address).url, now=_now(request), lease=lease)
        backend = await check_backend(address, settings.allow, timeout_s=settings.resolve_timeout_s)
        if await _own_address(settings, backend.host, backend.port):
            return json_error(400, "bad_address", f"field 'address': {backend.url} is this registry",
                              field="address")
        known = table.get(node_id, now=_now(request)) is not None
        member = table.register(node_id, backend.url, metadata, now=_now(request), lease=lease)
    except AddressError as exc:
        return json_error(400, "bad_address", f"field 'address': {exc}", field="address",
                          allowed_backends=str(settings.allow))
    except RegistryRefusal as exc:
        return _refused(exc)
    return web.json_response({"registered": member.summary(), "lease": member.lease,
                              "heartbeat_interval_s": table.heartbeat_interval_s, "ttl_s": table.ttl_s},
                             status=200 if known else 201)


async def heartbeat(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    if not valid_node_id(node_id):
        return _bad_id(node_id, "node_id")
    metadata = None
    if request.can_read_body:
        data = await read_json(request)
        reject_unknown(data, HEARTBEAT_FIELDS)
        metadata = require(data, "metadata", dict, optional=True)
    try:
        result = request.app[MEMBERSHIP].heartbeat(node_id, now=_now(request), metadata=metadata,
                                                   lease=request.headers.get(LEASE_HEADER))
    except RegistryRefusal as exc:
        return _refused(exc)
    if result is HeartbeatResult.UNKNOWN:
        return json_error(404, "unknown_node", f"node {node_id!r} is not registered; register again",
                          action="register", node_id=node_id)
    return web.json_response({"status": "ok", "node_id": node_id})


async def deregister(request: web.Request) -> web.Response:
    data = await read_json(request)
    reject_unknown(data, DEREGISTER_FIELDS)
    node_id = require(data, "id", str)
    if not valid_node_id(node_id):
        return _bad_id(node_id, "id")
    try:
        known = request.app[MEMBERSHIP].deregister(node_id, now=_now(request), lease=request.headers.get(LEASE_HEADER))
    except RegistryRefusal as exc:
        return _refused(exc)
    if not known:
        return json_error(404, "unknown_node", f"node {node_id!r} is not registered", node_id=node_id)
    return web.json_response({"deregistered": node_id})


async def nodes(request: web.Request) -> web.Response:
    include_dead = request.query.get("all", "") in ("1", "true", "yes")
    table, listing, now = request.app[MEMBERSHIP], request.app[LISTING], _now(request)
    body = listing.all_body(table, now) if include_dead else listing.alive_body(table, now)
    return web.Response(body=body, content_type="application/json")


async def events(request: web.Request) -> web.Response:
    """``GET /events?since=N``: membership changes ``{"kind", "node_id", "at"}`` (see the module docstring)."""
    app = request.app
    app[MEMBERSHIP].counts(now=_now(request))  # expiry is lazy: deaths due by now are changes too
    _drain(app)
    return events_response(request, app[EVENTS])


async def health(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok", **request.app[MEMBERSHIP].counts(now=_now(request))})


async def metrics(request: web.Request) -> web.Response:
    body = request.app[METRICS].render(request.app[MEMBERSHIP].counts(now=_now(request)))
    return metrics_response(body)


async def _expiry(app: web.Application) -> Any:
    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            app[MEMBERSHIP].counts(now=app[CLOCK]())
            _drain(app)
    task = asyncio.create_task(tick())
    yield
    await cancel_and_wait(task)


def listening(app: web.Application, port: int) -> None:
    """Tell a registry app the port it is bound to (``serve``'s ``on_listening``): from then on a
    registration of the registry's own address is refused."""
    app[SETTINGS].port = port


def make_registry_app(*, ttl_s: float = 5.0, token: str | None = None,
                      clock: Callable[[], float] | None = None, host: str = "127.0.0.1",
                      allow_backends: AllowList | None = None, max_nodes: int = DEFAULT_MAX_NODES,
                      metadata_limits: MetadataLimits | None = None,
                      resolve_timeout_s: float = DEFAULT_RESOLVE_TIMEOUT_S,
                      instance: str | None = None, events_kept: int = EVENTS_KEPT) -> web.Application:
    """The registry's aiohttp application. ``clock`` defaults to ``time.monotonic`` (the event loop's clock);
    ``allow_backends`` to :meth:`AllowList.default_for` the ``host`` the registry is bound to; ``instance``
    (the name ``GET /nodes`` gives this registry process) to a random one; ``events_kept`` membership changes
    are kept for ``GET /events``, the newest."""
    app = web.Application(middlewares=[error_middleware, registry_middleware], client_max_size=16 * 1024)
    if clock is None:
        clock = time.monotonic  # what the default event loop's loop.time() reads
    app[MEMBERSHIP] = Membership(ttl_s=ttl_s, heartbeat_interval_s=min(2.0, ttl_s), max_nodes=max_nodes,
                                 metadata_limits=metadata_limits, new_lease=lambda: secrets.token_urlsafe(18))
    app[CLOCK] = clock
    app[METRICS] = RegistryMetrics()
    app[SETTINGS] = Settings(token or "", allow_backends or AllowList.default_for(host), resolve_timeout_s, host)
    app[LISTING] = Listing(instance or secrets.token_hex(8), app[MEMBERSHIP])
    app[EVENTS] = EventRing(events_kept)
    app.router.add_post("/register", register)
    app.router.add_post("/heartbeat/{node_id}", heartbeat)
    app.router.add_post("/deregister", deregister)
    app.router.add_get("/nodes", nodes)
    app.router.add_get("/events", events)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", serve_openapi(registry_description(token=bool(token))))
    app.cleanup_ctx.append(_expiry)
    return app
