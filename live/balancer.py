"""``testbed balancer``: a reverse proxy that picks backends with the core strategies.

Theory of operation
-------------------
Every request, whatever its method, path, query, headers and body, is sent to
one backend, and the backend's status, headers and body come back unchanged
(plus ``X-Backend``); the balancer adds ``X-Forwarded-For``. Requests travel
on pooled keep-alive connections (:mod:`live.upstream`); health checks and
registry polls use an aiohttp ``ClientSession``.

The books are core's: :class:`core.balancer_state.BalancerState`, the very
object the simulator drives, picks through the strategy (immutable ``Backend``
snapshots: requests in flight through this balancer, workers as weight,
health, latency EWMA) and keeps each backend's health tracker (active checks
of ``/health`` every ``health_interval_s``, and refused connections), latency
EWMA and *ejector* (``eject_after_failures`` consecutive 5xx or connection
failures take the backend out for ``ejection_time_s``, then a probe decides).
This module sends the bytes and tells the books how each attempt ended: refused,
answered (a timeout is a 504, a broken exchange a 502), or abandoned (the
client went away, or a local error: the ejector's permit goes back unjudged,
on every way out).

A connection that fails before anything was sent is retried once on another
backend for idempotent methods (core's rule, :meth:`BalancerState.may_retry`). No healthy backend: 503. A backend slower than
``timeout_s``: 504. Membership comes from ``--nodes`` or, with ``--registry``,
from the registry's ``GET /nodes``, refreshed every ``refresh_s``.
"""

from __future__ import annotations

import asyncio
import time
import logging
import random
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable

import aiohttp
import numpy as np
from aiohttp import web
from multidict import CIMultiDict

from core.balancer_state import BackendEntry, BalancerState, feeds_latency
from core.scenario import BalancerSpec
from core.strategies import STRATEGIES, BaseStrategy, NoHealthyBackend, Strategy
from live.backends import follow_registry, health_checks
from live.http import cancel_and_wait, error_response, json_error, metrics_response
from live.metrics import BalancerMetrics
from live.openapi import balancer_description, serve as serve_openapi
from live.upstream import ConnectFailed, UpstreamError, UpstreamPool

__all__ = ["BalancerConfig", "make_balancer_app", "parse_node"]

log = logging.getLogger("testbed.balancer")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}


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
        self.last_check = "not checked yet"


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

    def join(self, backend_id: str, url: str, weight: int) -> BackendEntry:
        entry = self.state.add(backend_id, url, weight)
        entry.driver = Seen()
        return entry

    # -- the proxy -----------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        """Send ``request`` where core's books say, and settle the attempt however it ends."""
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "x-forwarded-for"]
        peer = request.remote or "unknown"
        prior = request.headers.get("X-Forwarded-For")
        headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
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
                status, raw_headers, payload = await self.upstream.request(
                    backend.url, request.method, request.rel_url.raw_path_qs, headers, body)
            except ConnectFailed as exc:
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
            else:
                elapsed = clock() - started
                state.answered(attempt, status=status, elapsed_s=elapsed, now=clock())
            finally:
                state.abandoned(attempt, now=clock())  # any other way out (cancelled, a local error): unjudged
            if feeds_latency(status):
                backend.driver.recent.append(elapsed)
            self.metrics.observe(backend.id, status, elapsed)
            out_headers = [(k, v) for k, v in raw_headers if k.lower() not in HOP_BY_HOP]
            out_headers.append(("X-Backend", backend.id))
            return web.Response(status=status, body=payload, headers=CIMultiDict(out_headers))

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        backends = self.state.backends
        total = self.state.total_requests
        return {"strategy": self.config.strategy, "requests": total, "no_healthy_backend": self.no_backend,
                "backends": {b.id: _entry_stats(b, now, total) for b in backends.values()}}


STATE = web.AppKey("balancer", Balancer)


async def lb_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats())


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


async def _background(app: web.Application) -> Any:
    lb = app[STATE]
    lb.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=lb.config.timeout_s))
    lb.upstream = UpstreamPool(timeout_s=lb.config.timeout_s)
    tasks = [asyncio.create_task(health_checks(lb))]
    if lb.config.registry:
        tasks.append(asyncio.create_task(follow_registry(lb)))
    yield
    await cancel_and_wait(*tasks)
    await lb.session.close()
    lb.upstream.close()


def make_balancer_app(config: BalancerConfig, *, strategy_cls: type[BaseStrategy] | None = None,
                      clock: Callable[[], float] | None = None) -> web.Application:
    """The balancer's aiohttp application. ``strategy_cls`` defaults to the class ``core`` registers
    under ``config.strategy``; whose exercise code runs is the command line's choice."""
    if clock is None:
        clock = time.monotonic  # what the default event loop's loop.time() reads
    strategy = (strategy_cls or STRATEGIES[config.strategy])(rng=random.Random(config.seed))
    # No middleware: aiohttp adds a layer of its own to apps that have any, and the proxy path
    # is hot. Errors become JSON in the handlers (the catch-all route leaves no 404/405).
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[STATE] = Balancer(config, strategy, clock)
    app.router.add_get("/lb-stats", lb_stats)
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/openapi.json", serve_openapi(balancer_description()))
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.cleanup_ctx.append(_background)
    return app
