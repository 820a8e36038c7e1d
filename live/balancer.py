"""``testbed balancer``: a reverse proxy that picks backends with the core strategies.

Theory of operation
-------------------
Every request, whatever its method, path, query, headers and body, is sent to
one backend, and the backend's status, headers and body come back unchanged
(plus ``X-Backend``); the balancer adds ``X-Forwarded-For``. Requests travel
on pooled keep-alive connections (:mod:`live.upstream`); health checks and
registry polls use an aiohttp ``ClientSession``.

The pick: the core strategy gets one immutable ``Backend`` snapshot per
backend (requests in flight through this balancer, workers as weight, health,
latency EWMA). Health is the conjunction of two core objects per backend:

* a :class:`core.health.HealthTracker` fed by active checks of ``/health``
  every ``health_interval_s`` and by refused connections;
* an *ejector*, a :class:`core.circuit_breaker.CircuitBreaker` fed by every
  proxied response: ``eject_after_failures`` consecutive 5xx or connection
  failures take the backend out for ``ejection_time_s``, then a probe decides.

A connection that fails before anything was sent is retried once on another
backend for idempotent methods. No healthy backend: 503. A backend slower than
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

from core.circuit_breaker import CircuitBreaker
from core.health import HealthTracker, counts_as_failure
from core.latency import PeakEwma
from core.strategies import STRATEGIES, Backend, BaseStrategy, NoHealthyBackend
from live.http import cancel_and_wait, error_response, json_error, metrics_response
from live.metrics import BalancerMetrics
from live.upstream import ConnectFailed, UpstreamError, UpstreamPool

__all__ = ["BalancerConfig", "make_balancer_app", "parse_node"]

log = logging.getLogger("testbed.balancer")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer", "trailers",
              "transfer-encoding", "upgrade", "host", "content-length"}
IDEMPOTENT = {"GET", "HEAD", "OPTIONS", "PUT", "DELETE", "TRACE"}


def parse_node(spec: str) -> str:
    """``5001`` -> ``http://127.0.0.1:5001``; ``host:port`` -> ``http://host:port``; URLs stay."""
    spec = spec.strip()
    if spec.isdigit():
        port = int(spec)
        if not 0 < port < 65536:
            raise ValueError(f"{spec!r} is not a port (1-65535)")
        return f"http://127.0.0.1:{port}"
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
    strategy: str = "round_robin"
    health_interval_s: float = 2.0
    unhealthy_after: int = 2
    timeout_s: float = 30.0
    retry_connect_failures: bool = True
    eject_after_failures: int = 5
    ejection_time_s: float = 5.0
    refresh_s: float = 2.0
    seed: int | None = None


class BackendState:
    """The balancer's truth about one backend."""

    def __init__(self, backend_id: str, url: str, weight: int, config: BalancerConfig) -> None:
        self.id, self.url, self.weight = backend_id, url, weight
        self.active = 0
        self.requests = 0
        self.errors = 0
        self.health = HealthTracker(config.unhealthy_after)
        self.latency = PeakEwma()
        self.recent: deque[float] = deque(maxlen=10_000)
        self.ejector = (CircuitBreaker(config.eject_after_failures, config.ejection_time_s, name=f"lb:{backend_id}")
                        if config.eject_after_failures else None)
        self.last_check: str = "not checked yet"

    def snapshot(self, now: float, excluded: set[str]) -> Backend:
        healthy = (self.health.healthy and self.id not in excluded
                   and (self.ejector is None or self.ejector.available(now=now)))
        return Backend(self.id, self.url, self.active, self.weight, healthy, self.latency.value)

    def stats(self, now: float, total: int) -> dict[str, Any]:
        lat = np.fromiter(self.recent, float) * 1000 if self.recent else None
        return {
            "url": self.url, "weight": self.weight, "requests": self.requests, "active": self.active,
            "errors": self.errors, "share": self.requests / total if total else 0.0,
            "healthy": self.health.healthy, "last_check": self.last_check,
            "ejector": None if self.ejector is None else self.ejector.status(now=now)["state"],
            "latency_ms": None if lat is None else {
                "p50": float(np.percentile(lat, 50)), "p95": float(np.percentile(lat, 95)),
                "p99": float(np.percentile(lat, 99)), "ewma": (self.latency.value or 0.0) * 1000},
        }


STATE = web.AppKey("balancer", object)


class Balancer:
    def __init__(self, config: BalancerConfig, strategy: BaseStrategy, clock: Callable[[], float]) -> None:
        self.config = config
        self.strategy = strategy
        self.clock = clock
        self.backends: dict[str, BackendState] = {}
        for url in config.nodes:
            self.backends[url] = BackendState(url, url, 1, config)
        self.metrics = BalancerMetrics()
        self.session: aiohttp.ClientSession | None = None  # health checks and the registry
        self.upstream: UpstreamPool | None = None         # proxied requests
        self.no_backend = 0

    # -- the proxy -----------------------------------------------------------
    async def proxy(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        headers = [(k, v) for k, v in request.headers.items()
                   if k.lower() not in HOP_BY_HOP and k.lower() != "x-forwarded-for"]
        peer = request.remote or "unknown"
        prior = request.headers.get("X-Forwarded-For")
        headers.append(("X-Forwarded-For", f"{prior}, {peer}" if prior else peer))
        excluded: set[str] = set()
        retry = self.config.retry_connect_failures and request.method in IDEMPOTENT
        while True:
            now = self.clock()
            try:
                chosen = self.strategy.select_node([b.snapshot(now, excluded) for b in self.backends.values()])
            except NoHealthyBackend:
                if excluded:  # the retry found nowhere else to go: report the refusal itself
                    return json_error(502, "backend_unreachable",
                                      f"backend {next(iter(excluded))} refused the connection and no other "
                                      "backend is healthy", backend=next(iter(excluded)))
                self.no_backend += 1
                return json_error(503, "no_healthy_backend",
                                  f"none of the {len(self.backends)} backends is healthy", backends=len(self.backends))
            backend = self.backends[chosen.id]
            permit = backend.ejector.try_acquire(now=now) if backend.ejector else None
            backend.active += 1
            backend.requests += 1
            started = self.clock()
            try:
                assert self.upstream is not None
                status, raw_headers, payload = await self.upstream.request(
                    backend.url, request.method, request.rel_url.raw_path_qs, headers, body)
                out_headers = [(k, v) for k, v in raw_headers if k.lower() not in HOP_BY_HOP]
            except ConnectFailed as exc:
                self._failed(backend, permit, refused=True)
                if retry and not excluded:
                    excluded.add(backend.id)
                    continue
                return json_error(502, "backend_unreachable", f"backend {backend.id} refused the connection: {exc}",
                                  backend=backend.id)
            except asyncio.TimeoutError:
                self._failed(backend, permit)
                return json_error(504, "backend_timeout",
                                  f"backend {backend.id} did not answer within {self.config.timeout_s:g} s",
                                  backend=backend.id)
            except UpstreamError as exc:
                self._failed(backend, permit)
                return json_error(502, "backend_error", f"backend {backend.id} failed: {exc}", backend=backend.id)
            finally:
                backend.active -= 1
            elapsed = self.clock() - started
            now = self.clock()
            if counts_as_failure(status):
                backend.errors += 1
                if backend.ejector is not None:
                    backend.ejector.record_failure(permit, now=now)
            else:
                if backend.ejector is not None:
                    backend.ejector.record_success(permit, now=now)
                backend.latency.observe(elapsed, now=now)
                backend.recent.append(elapsed)
            self.metrics.observe(backend.id, status, elapsed)
            out_headers.append(("X-Backend", backend.id))
            return web.Response(status=status, body=payload, headers=CIMultiDict(out_headers))

    def _failed(self, backend: BackendState, permit: Any, *, refused: bool = False) -> None:
        backend.errors += 1
        if refused:
            backend.health.observe(False)
        if backend.ejector is not None and permit is not None:
            backend.ejector.record_failure(permit, now=self.clock())

    # -- background work -----------------------------------------------------
    async def health_checks(self) -> None:
        timeout = aiohttp.ClientTimeout(total=min(2.0, self.config.health_interval_s))
        while True:
            await asyncio.gather(*(self._check(b, timeout) for b in list(self.backends.values())))
            await asyncio.sleep(self.config.health_interval_s)

    async def _check(self, backend: BackendState, timeout: aiohttp.ClientTimeout) -> None:
        assert self.session is not None
        try:
            async with self.session.get(f"{backend.url}/health", timeout=timeout,
                                        headers={"X-Client-ID": "testbed-balancer-health-check"}) as resp:
                ok = not counts_as_failure(resp.status)
                if resp.status == 200:
                    data = await resp.json(content_type=None)
                    if isinstance(data, dict) and isinstance(data.get("workers"), int) and data["workers"] >= 1:
                        backend.weight = data["workers"]
                backend.last_check = f"{resp.status}"
        except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
            ok = False
            backend.last_check = f"{type(exc).__name__}: {exc}"[:200]
        backend.health.observe(ok)

    async def follow_registry(self) -> None:
        assert self.session is not None and self.config.registry
        url = self.config.registry.rstrip("/") + "/nodes"
        while True:
            try:
                async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=2.0)) as resp:
                    if resp.status == 200:
                        self._apply_membership((await resp.json()).get("nodes", []))
                    else:
                        log.warning("registry %s answered %s", url, resp.status)
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                log.warning("registry %s: %s (keeping the last membership)", url, exc)
            await asyncio.sleep(self.config.refresh_s)

    def _apply_membership(self, nodes: list[dict[str, Any]]) -> None:
        seen = set()
        for n in nodes:
            node_id, address = n.get("id"), n.get("address")
            if not isinstance(node_id, str) or not isinstance(address, str):
                continue
            seen.add(node_id)
            workers = (n.get("metadata") or {}).get("workers", 1)
            weight = workers if isinstance(workers, int) and workers >= 1 else 1
            current = self.backends.get(node_id)
            if current is None or current.url != address.rstrip("/"):
                log.info("backend %s joined at %s", node_id, address)
                self.backends[node_id] = BackendState(node_id, address.rstrip("/"), weight, self.config)
        for gone in [k for k in self.backends if k not in seen and k not in self.config.nodes]:
            if self.backends[gone].active == 0:
                log.info("backend %s left", gone)
                del self.backends[gone]

    def stats(self) -> dict[str, Any]:
        now = self.clock()
        total = sum(b.requests for b in self.backends.values())
        return {"strategy": self.config.strategy, "requests": total, "no_healthy_backend": self.no_backend,
                "backends": {b.id: b.stats(now, total) for b in self.backends.values()}}


async def lb_stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[STATE].stats())


async def metrics(request: web.Request) -> web.Response:
    lb: Balancer = request.app[STATE]
    now = lb.clock()
    body = lb.metrics.render((b.id, b.active, b.snapshot(now, set()).healthy) for b in lb.backends.values())
    return metrics_response(body)


async def proxy(request: web.Request) -> web.StreamResponse:
    try:
        return await request.app[STATE].proxy(request)
    except Exception as exc:  # noqa: BLE001 - JSON errors, as everywhere
        return error_response(request, exc)


async def _background(app: web.Application) -> Any:
    lb: Balancer = app[STATE]
    lb.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=lb.config.timeout_s))
    lb.upstream = UpstreamPool(timeout_s=lb.config.timeout_s)
    tasks = [asyncio.create_task(lb.health_checks())]
    if lb.config.registry:
        tasks.append(asyncio.create_task(lb.follow_registry()))
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
    app.router.add_route("*", "/{tail:.*}", proxy)
    app.cleanup_ctx.append(_background)
    return app
