"""``testbed node``: an aiohttp server around the core request path.

Theory of operation
-------------------
The capacity model is the simulator's: ``workers`` requests are served at once
and the rest wait FIFO for a worker; a request on ``GET /work`` takes a service
time drawn with mean ``load_factor_ms`` (exponential or deterministic), spent
sleeping while holding the worker (``--work-mode sleep``) or burning CPU
(``cpu``). ``GET /health`` never does the work.

The request path (rate limiter, backpressure gate, circuit breaker, FIFO
workers) is :class:`core.node_pipeline.NodePipeline`, the very object the
simulator drives: this module asks it to admit a request, waits while it
queues, does the work, and tells it how the work ended (or that the client
went away). The client is the peer address, or, when the peer is a trusted
proxy (``--trust-proxy IPS/CIDRS``), its ``X-Client-ID`` or the rightmost
untrusted ``X-Forwarded-For`` hop (:mod:`core.client_key`, which also refuses
an ``X-Client-ID`` over ``--max-client-id-bytes`` (256) or not printable
UTF-8: ``400 bad_client_id``). The rate limiter keeps at most
``--max-clients`` buckets, least recently used evicted first. The breaker counts 5xx and exceptions of
the work (and of the ``--downstream`` call) as failures; 4xx are not.

``/admin/faults`` exists only with ``--faults``; with ``--admin-token`` (or
``TESTBED_ADMIN_TOKEN``) it also wants ``Authorization: Bearer <token>``,
compared in constant time on the raw bytes, and answers anything else with
``401`` (never a 500, whatever bytes the header holds). The node listens on
127.0.0.1 unless ``--host`` says otherwise.

Time comes from one clock (``loop.time()`` unless a test injects its own) and
is handed to the core objects as ``now``. Nothing here decides policy.
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Awaitable, Callable

import aiohttp
import numpy as np
from aiohttp import web

from core.client_key import MAX_CLIENT_ID_BYTES, BadClientId, TrustedProxies
from core.node_pipeline import NodePipeline, Rejected, Ticket
from core.rate_limiter import DEFAULT_MAX_CLIENTS, TokenBucket
from core.scenario import BreakerSpec, NodeSpec
from core.workload import chunks, service_times, stream
from live.discovery import DiscoveryClient
from live.http import (
    cancel_and_wait, error_response, json_error, metrics_response, read_json, reject_unknown, require,
)
from live.metrics import NodeMetrics
from live.openapi import node_description, serve as serve_openapi

__all__ = ["NodeConfig", "listening", "make_node_app"]


@dataclass(frozen=True)
class NodeConfig:
    node_id: str
    host: str = "127.0.0.1"
    port: int = 5001
    workers: int = 1
    load_factor_ms: float = 0.0
    service: str = "exponential"
    work_mode: str = "sleep"
    rate_limit_per_s: float | None = None
    rate_limit_burst: float | None = None
    max_clients: int = DEFAULT_MAX_CLIENTS  # buckets the rate limiter keeps (least recently used evicted)
    max_client_id_bytes: int = MAX_CLIENT_ID_BYTES  # longer X-Client-IDs (from trusted peers) are a 400
    backpressure: int | None = None
    max_per_client: int | None = None
    circuit_breaker: bool = False
    failure_threshold: int = BreakerSpec.failure_threshold  # one set of defaults: the scenario's
    recovery_timeout_s: float = BreakerSpec.recovery_timeout_s
    half_open_max_calls: int = BreakerSpec.half_open_max_calls
    success_threshold: int = BreakerSpec.success_threshold
    downstream: str | None = None
    registry: str | None = None
    registry_token: str | None = None
    heartbeat_interval_s: float = 2.0
    advertise: str | None = None
    trust_proxy: tuple[str, ...] = ()
    faults_admin: bool = False
    admin_token: str | None = None  # with faults_admin: /admin/faults wants "Authorization: Bearer <token>"
    error_rate: float = 0.0
    extra_latency_ms: float = 0.0
    seed: int | None = None
    stream: int | None = None
    limiter_cls: type[TokenBucket] | None = field(default=None, compare=False)

    @property
    def spec(self) -> NodeSpec:
        """The node as the core request path sees it: the scenario's own node type."""
        return NodeSpec(
            self.node_id, self.workers, self.load_factor_ms, self.service, self.rate_limit_per_s,
            self.rate_limit_burst, self.backpressure,
            BreakerSpec(self.failure_threshold, self.recovery_timeout_s, self.half_open_max_calls,
                        self.success_threshold) if self.circuit_breaker else None,
            max_per_client=self.max_per_client)

    @property
    def address(self) -> str | None:
        """What the node registers; None until it knows its port when it listens on port 0."""
        if self.advertise:
            return self.advertise
        return f"http://{self.host}:{self.port}" if self.port else None


@dataclass
class Faults:
    error_rate: float = 0.0
    extra_latency_ms: float = 0.0


class NodeState:
    """The core objects and counters of one node process."""

    def __init__(self, config: NodeConfig, clock: Callable[[], float]) -> None:
        self.config = config
        self.clock = clock
        rng = (stream(config.seed or 0, config.stream) if config.stream is not None
               else np.random.default_rng(config.seed))
        self._service = service_times(config.service, config.load_factor_ms / 1000.0, rng)
        self._uniform = chunks(rng.random)  # drawn as the simulator draws them (core.workload)
        # The request path is core's; whose rate limiter runs is the command line's choice.
        self.pipeline = NodePipeline(config.spec, functools.partial(config.limiter_cls or TokenBucket,
                                                                    max_clients=config.max_clients))
        self.trusted = TrustedProxies.parse(config.trust_proxy, max_client_id_bytes=config.max_client_id_bytes)
        self.faults = Faults(config.error_rate, config.extra_latency_ms)
        self.discovery: DiscoveryClient | None = None
        self.metrics = NodeMetrics(config.node_id)
        self.active = 0
        self.started_at = clock()
        self.downstream: aiohttp.ClientSession | None = None

    def service_time_s(self) -> float:
        return next(self._service) + self.faults.extra_latency_ms / 1000.0

    def injected_error(self) -> bool:
        return bool(self.faults.error_rate) and next(self._uniform) < self.faults.error_rate

    def client_key(self, request: web.Request) -> str:
        """Whom the rate limiter and the bulkhead count the request under (:mod:`core.client_key`);
        raises :class:`BadClientId` for an X-Client-ID that cannot be a key."""
        peer = request.remote or "unknown"
        trusted = self.trusted
        if not trusted.trusts(peer):
            return peer  # the common case, a set lookup: no header is read
        headers = request.headers
        return trusted.client(peer, client_id=headers.getall("X-Client-ID", ()),
                              forwarded_for=headers.getall("X-Forwarded-For", ()))


STATE = web.AppKey("state", NodeState)
ROUTES = web.AppKey[frozenset[tuple[str, str]]]("routes")  # (path, method) pairs the app serves


def _burn(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: A handler that never waits (``GET /health``): called with the node's state and the request's arrival
#: time, not awaited, which spares a coroutine, two look-ups and a clock reading per request.
QuickHandler = Callable[[web.Request, "NodeState", float], web.StreamResponse]


def instrumented(handler: Handler, state: NodeState, quick: QuickHandler | None = None) -> Handler:
    """Wrap a handler with what every node response gets: X-Node-ID, JSON errors and the counters.

    A wrapper per route rather than an aiohttp middleware on purpose: an app with
    middlewares also runs aiohttp's own per-app middleware, and the two layers
    cost more per request than everything ``GET /health`` does. Unknown paths and
    methods reach :func:`fallback`, which is wrapped too. ``quick``, when given, is
    called instead of ``handler`` (see :data:`QuickHandler`).
    """
    clock, metrics, node_id = state.clock, state.metrics, state.config.node_id

    async def endpoint(request: web.Request) -> web.StreamResponse:
        started = clock()
        state.active += 1
        try:
            if quick is not None:
                response = quick(request, state, started)
            else:
                response = await handler(request)
        except BadClientId as exc:
            response = json_error(400, "bad_client_id", str(exc), limit_bytes=exc.limit_bytes)
        except Exception as exc:  # noqa: BLE001 - errors become JSON responses that still get counted and tagged
            response = error_response(request, exc)
        finally:
            state.active -= 1
        response.headers["X-Node-ID"] = node_id
        metrics.observe(request.path, response.status, clock() - started)
        return response
    return endpoint


def refusal(state: NodeState, rejected: Rejected) -> web.Response:
    """The response of a request the core request path refused (429 or 503, JSON, with its headers)."""
    state.metrics.rejected(rejected.code)
    return json_error(rejected.status, rejected.code, rejected.message, headers=rejected.headers,
                      retry_after_s=rejected.retry_after_s)


# -- handlers ------------------------------------------------------------------
def quick_health(request: web.Request, state: NodeState, now: float) -> web.Response:
    """Cheap: never does the work, but the rate limiter counts it (the seed's behaviour)."""
    pipeline = state.pipeline
    limited = pipeline.limit(state.client_key(request), now=now)
    if isinstance(limited, Rejected):
        return refusal(state, limited)
    return web.json_response({"status": "ok", "node_id": state.config.node_id, "active_requests": state.active,
                              "workers": state.config.workers, "busy_workers": pipeline.busy,
                              "queued": pipeline.waiting}, headers=limited)


async def health(request: web.Request) -> web.Response:
    """``GET /health`` (:func:`quick_health`, which the node's route calls directly)."""
    state = request.app[STATE]
    return quick_health(request, state, state.clock())


def _wake(ticket: Ticket | None) -> None:
    """The core request path gave ``ticket`` a worker: let its handler go on."""
    if ticket is not None and ticket.payload is not None and not ticket.payload.done():
        ticket.payload.set_result(None)


async def work(request: web.Request) -> web.Response:
    """The request path is core's (:class:`core.node_pipeline.NodePipeline`); this only waits, works and answers."""
    state = request.app[STATE]
    clock, pipeline = state.clock, state.pipeline
    arrived = clock()
    admitted = pipeline.admit(state.client_key(request), now=arrived)
    if isinstance(admitted, Rejected):
        return refusal(state, admitted)
    ticket = admitted
    failed, detail, downstream_status = True, "", None
    try:
        if not ticket.started:
            ticket.payload = asyncio.get_running_loop().create_future()
            await ticket.payload  # a worker is handed over by _wake
        started = clock()
        service = state.service_time_s()
        if state.config.work_mode == "cpu":
            await asyncio.get_running_loop().run_in_executor(None, _burn, service)
        else:
            await asyncio.sleep(service)
        failed = False
        if state.injected_error():
            failed, detail = True, f"injected fault (error rate {state.faults.error_rate:g})"
        if not failed and state.downstream is not None:
            failed, detail, downstream_status = await _call_downstream(state)
    except asyncio.CancelledError:
        _wake(pipeline.abandon(ticket, now=clock()))  # a client that went away says nothing about health
        raise
    except Exception:
        _wake(pipeline.complete(ticket, failed=True, now=clock()))
        raise
    finished = clock()
    _wake(pipeline.complete(ticket, failed=failed, now=finished))
    if failed:
        state.metrics.rejected("server_error")
        # The work was done before it failed: its service time, as the OK answer gives it, so that a client
        # (the live runner's generator) counts the workers' busy time for failed work too, as the simulator does.
        return json_error(500 if downstream_status is None else 502, "work_failed", detail,
                          node_id=state.config.node_id, service_ms=(finished - started) * 1000,
                          headers=ticket.headers or None)
    return web.json_response({"node_id": state.config.node_id, "queue_wait_ms": (started - arrived) * 1000,
                              "service_ms": (finished - started) * 1000, "downstream_status": downstream_status},
                             headers=ticket.headers or None)


async def _call_downstream(state: NodeState) -> tuple[bool, str, int | None]:
    assert state.downstream is not None and state.config.downstream
    try:
        async with state.downstream.get(state.config.downstream) as resp:
            await resp.read()
            if resp.status >= 500:
                return True, f"downstream {state.config.downstream} answered {resp.status}", resp.status
            return False, "", resp.status
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        return True, f"downstream {state.config.downstream} failed: {type(exc).__name__}: {exc}", 0


async def stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    config = {k: v for k, v in asdict(state.config).items()
              if k not in ("limiter_cls", "registry_token", "admin_token")}
    body = {
        "node_id": state.config.node_id, "uptime_s": state.clock() - state.started_at,
        "active_requests": state.active, "busy_workers": state.pipeline.busy,
        "queued": state.pipeline.waiting, "requests": state.metrics.counts(),
        "faults": asdict(state.faults), "config": config}
    limiter = state.pipeline.limiter
    if isinstance(limiter, TokenBucket):
        body["rate_limiter"] = {"clients": limiter.tracked_clients, "max_clients": limiter.max_clients,
                                "evicted": limiter.evicted}
    return web.json_response(body)


def _disabled(what: str, flag: str) -> web.Response:
    return json_error(404, "not_enabled", f"{what} is not enabled on this node; start it with {flag}")


async def queue_stats(request: web.Request) -> web.Response:
    state = request.app[STATE]
    pipeline = state.pipeline
    if pipeline.gate is None:
        return _disabled("backpressure", "--backpressure N")
    data = pipeline.gate.stats().as_dict()
    data.update({"in_service": pipeline.busy, "waiting_for_worker": pipeline.waiting,
                 "workers": state.config.workers})
    return web.json_response(data)


async def circuit_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    breaker = state.pipeline.breaker
    if breaker is None:
        return _disabled("the circuit breaker", "--circuit-breaker")
    return web.json_response(breaker.status(now=state.clock()))


async def discovery_status(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.discovery is None:
        return _disabled("service discovery", "--registry URL")
    return web.json_response(state.discovery.status())


async def peers(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.discovery is None:
        return _disabled("service discovery", "--registry URL")
    return web.json_response({"node_id": state.config.node_id, "peers": state.discovery.peers})


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    body = state.metrics.render(state)
    return metrics_response(body)


async def fallback(request: web.Request) -> web.Response:
    """Unknown path: 404; known path, other method: 405 (both JSON, like every error)."""
    methods = sorted(m for (path, m) in request.app[ROUTES] if path == request.path)
    if methods:
        raise web.HTTPMethodNotAllowed(request.method, methods)
    raise web.HTTPNotFound()


def admin_only(handler: Callable[[web.Request], Awaitable[web.StreamResponse]], token: str) -> Callable[
        [web.Request], Awaitable[web.StreamResponse]]:
    """``handler`` behind ``Authorization: Bearer <token>``: anything else is a 401 JSON error.

    The header is compared as the bytes that came (aiohttp decodes header values as
    UTF-8 with ``surrogateescape``, which encodes back exactly), in constant time, so
    no header value, however malformed, can raise; the scheme is case-insensitive
    (RFC 9110 11.1)."""
    expected = token.encode()
    challenge = {"WWW-Authenticate": 'Bearer realm="testbed-admin"'}

    async def guarded(request: web.Request) -> web.StreamResponse:
        given = request.headers.get("Authorization")
        if given is None:
            return json_error(401, "unauthorized", "this node's /admin endpoints need 'Authorization: Bearer <token>' "
                              "with the node's --admin-token", headers=challenge)
        scheme, _, credentials = given.encode("utf-8", "surrogateescape").strip().partition(b" ")
        if scheme.lower() != b"bearer" or not hmac.compare_digest(credentials.strip(), expected):
            return json_error(401, "unauthorized", "the Authorization header does not carry this node's admin token "
                              "('Authorization: Bearer <token>')", headers=challenge)
        return await handler(request)
    return guarded


async def get_faults(request: web.Request) -> web.Response:
    return web.json_response(asdict(request.app[STATE].faults))


_FAULT_FIELDS = frozenset({"error_rate", "extra_latency_ms"})


async def set_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    data = await read_json(request)
    reject_unknown(data, _FAULT_FIELDS)
    rate = require(data, "error_rate", (int, float), optional=True, check=lambda v: 0 <= v <= 1,
                   allowed="a number from 0 to 1")
    extra = require(data, "extra_latency_ms", (int, float), optional=True, check=lambda v: 0 <= v <= 600_000,
                    allowed="a number of milliseconds from 0 to 600000")
    if rate is not None:
        state.faults.error_rate = float(rate)
    if extra is not None:
        state.faults.extra_latency_ms = float(extra)
    return web.json_response(asdict(state.faults))


async def clear_faults(request: web.Request) -> web.Response:
    state = request.app[STATE]
    state.faults.error_rate = state.faults.extra_latency_ms = 0.0
    return web.json_response(asdict(state.faults))


# -- the app -------------------------------------------------------------------
async def _background(app: web.Application) -> Any:
    """Downstream session and discovery for the app's lifetime; deregister at the end."""
    state = app[STATE]
    if state.config.downstream:
        state.downstream = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    discovery = state.discovery
    task = asyncio.create_task(discovery.run()) if discovery is not None else None
    yield
    if task is not None:
        await cancel_and_wait(task)
    if discovery is not None:
        await discovery.deregister()
    if state.downstream is not None:
        await state.downstream.close()


def listening(app: web.Application, port: int) -> None:
    """Tell a node app the port it is bound to (``serve``'s ``on_listening``): a node started
    on port 0 without ``--advertise`` registers ``http://HOST:PORT`` from here on."""
    state = app[STATE]
    if state.discovery is not None and state.discovery.address is None:
        state.discovery.set_address(f"http://{state.config.host}:{port}")


def make_node_app(config: NodeConfig, *, clock: Callable[[], float] | None = None) -> web.Application:
    """The node's aiohttp application. ``clock`` defaults to ``time.monotonic`` (the event loop's clock)."""
    app = web.Application(client_max_size=64 * 1024)
    if clock is None:
        clock = time.monotonic  # what the default event loop's loop.time() reads
    state = NodeState(config, clock)
    if config.registry:
        state.discovery = DiscoveryClient(
            config.registry, config.node_id, config.address, interval_s=config.heartbeat_interval_s,
            token=config.registry_token, clock=clock,
            metadata={"workers": config.workers, "load_factor_ms": config.load_factor_ms})
    app[STATE] = state
    routes: list[tuple[str, str, Handler]] = [
        ("GET", "/health", health), ("GET", "/work", work), ("GET", "/stats", stats),
        ("GET", "/queue-stats", queue_stats), ("GET", "/circuit-status", circuit_status),
        ("GET", "/discovery-status", discovery_status), ("GET", "/peers", peers), ("GET", "/metrics", metrics)]
    if config.faults_admin:
        admin = [("GET", "/admin/faults", get_faults), ("POST", "/admin/faults", set_faults),
                 ("DELETE", "/admin/faults", clear_faults)]
        token = config.admin_token
        routes += [(m, path, admin_only(h, token) if token else h) for m, path, h in admin]
    routes.append(("GET", "/openapi.json", serve_openapi(node_description(faults=config.faults_admin,
                                                                          admin_token=bool(config.admin_token)))))
    app[ROUTES] = frozenset((path, m) for method, path, _ in routes
                            for m in ((method, "HEAD") if method == "GET" else (method,)))
    for method, path, handler in routes:
        wrapped = instrumented(handler, state, quick_health if handler is health else None)
        app.router.add_route(method, path, wrapped)
        if method == "GET":
            app.router.add_route("HEAD", path, wrapped)  # aiohttp sends the headers without the body
    app.router.add_route("*", "/{tail:.*}", instrumented(fallback, state))
    app.cleanup_ctx.append(_background)
    return app
