"""``testbed registry``: the service registry, an aiohttp face on :class:`core.registry.Membership`.

Endpoints: ``POST /register`` ``{"id", "address", "metadata"?}``;
``POST /heartbeat/{id}`` (404 for an unknown id: register again); ``POST
/deregister`` ``{"id"}``; ``GET /nodes`` (alive; ``?all=1`` adds the dead not
yet forgotten); ``GET /health``; ``GET /metrics``. With a token (``--token`` or
``TESTBED_REGISTRY_TOKEN``) the writing endpoints want ``Authorization:
Bearer <token>``. Expiry is lazy in the core table; a background task also
advances it every second so membership changes are logged and counted when
they happen, not when someone asks.
"""

from __future__ import annotations

import asyncio
import time
import hmac
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web

from core.registry import HeartbeatResult, Membership
from live.http import cancel_and_wait, error_middleware, json_error, metrics_response, read_json, require
from live.metrics import RegistryMetrics
from live.openapi import registry_description, serve as serve_openapi

__all__ = ["make_registry_app"]

log = logging.getLogger("testbed.registry")

MEMBERSHIP = web.AppKey("membership", Membership)
CLOCK = web.AppKey[Callable[[], float]]("clock")
METRICS = web.AppKey("metrics", RegistryMetrics)
TOKEN = web.AppKey("token", str)
_PATHS = {"/register", "/deregister", "/nodes", "/health", "/metrics"}


def _now(request: web.Request) -> float:
    return request.app[CLOCK]()


def _drain(app: web.Application) -> None:
    for change in app[MEMBERSHIP].drain_events():
        app[METRICS].changes.labels(change.kind).inc()
        log.info("%s %s at %.3f", change.node_id, change.kind, change.at)


@web.middleware
async def registry_middleware(request: web.Request,
                              handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    token = request.app[TOKEN]
    if token and request.method == "POST":
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {token}".encode()):
            return json_error(401, "unauthorized", "this registry needs 'Authorization: Bearer <token>' for writes")
    response = await handler(request)
    path = request.path if request.path in _PATHS else ("/heartbeat" if request.path.startswith("/heartbeat/")
                                                        else "other")
    request.app[METRICS].requests.labels(path, str(response.status)).inc()
    _drain(request.app)
    return response


def _valid_id(v: Any) -> bool:
    return isinstance(v, str) and 0 < len(v.strip()) <= 200


async def register(request: web.Request) -> web.Response:
    data = await read_json(request)
    node_id = require(data, "id", str, check=_valid_id, allowed="a non-empty string of at most 200 characters")
    address = require(data, "address", str, check=lambda v: v.startswith(("http://", "https://")),
                      allowed="an http:// or https:// URL")
    metadata = require(data, "metadata", dict, optional=True) or {}
    table = request.app[MEMBERSHIP]
    known = table.get(node_id, now=_now(request)) is not None
    member = table.register(node_id, address, metadata, now=_now(request))
    return web.json_response({"registered": member.as_dict(now=_now(request)),
                              "heartbeat_interval_s": table.heartbeat_interval_s, "ttl_s": table.ttl_s},
                             status=200 if known else 201)


async def heartbeat(request: web.Request) -> web.Response:
    node_id = request.match_info["node_id"]
    metadata = None
    if request.can_read_body:
        data = await read_json(request)
        metadata = require(data, "metadata", dict, optional=True)
    result = request.app[MEMBERSHIP].heartbeat(node_id, now=_now(request), metadata=metadata)
    if result is HeartbeatResult.UNKNOWN:
        return json_error(404, "unknown_node", f"node {node_id!r} is not registered; register again",
                          action="register", node_id=node_id)
    return web.json_response({"status": "ok", "node_id": node_id})


async def deregister(request: web.Request) -> web.Response:
    data = await read_json(request)
    node_id = require(data, "id", str, check=_valid_id, allowed="a non-empty string")
    if not request.app[MEMBERSHIP].deregister(node_id, now=_now(request)):
        return json_error(404, "unknown_node", f"node {node_id!r} is not registered", node_id=node_id)
    return web.json_response({"deregistered": node_id})


async def nodes(request: web.Request) -> web.Response:
    include_dead = request.query.get("all", "") in ("1", "true", "yes")
    now = _now(request)
    members = request.app[MEMBERSHIP].members(now=now, include_dead=include_dead)
    return web.json_response({"nodes": [m.as_dict(now=now) for m in members], "count": len(members)})


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


def make_registry_app(*, ttl_s: float = 5.0, token: str | None = None,
                      clock: Callable[[], float] | None = None) -> web.Application:
    """The registry's aiohttp application. ``clock`` defaults to ``time.monotonic`` (the event loop's clock)."""
    app = web.Application(middlewares=[error_middleware, registry_middleware], client_max_size=16 * 1024)
    if clock is None:
        clock = time.monotonic  # what the default event loop's loop.time() reads
    app[MEMBERSHIP] = Membership(ttl_s=ttl_s, heartbeat_interval_s=min(2.0, ttl_s))
    app[CLOCK] = clock
    app[METRICS] = RegistryMetrics()
    app[TOKEN] = token or ""
    app.router.add_post("/register", register)
    app.router.add_post("/heartbeat/{node_id}", heartbeat)
    app.router.add_post("/deregister", deregister)
    app.router.add_get("/nodes", nodes)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", serve_openapi(registry_description(token=bool(token))))
    app.cleanup_ctx.append(_expiry)
    return app
