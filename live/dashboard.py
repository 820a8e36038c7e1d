"""The balancer's live dashboard: ``GET /dashboard``, one page updated once a second over Server-Sent Events.

Theory of operation
-------------------
**One snapshot for every viewer.** The page (``live/static/dashboard.html`` and
its ``.js``/``.css``, shipped in the package, nothing from a CDN) opens
``GET /dashboard/events``, an SSE stream (``text/event-stream``: plain HTTP,
which proxies pass and browsers reconnect by themselves). The streams do not
build anything: one background task, :meth:`Dashboard.run`, takes a
:class:`Snapshot` of the balancer every ``interval_s`` (1 s) *while at least
one stream is open* (none open: the task sleeps and costs nothing), encodes
it as one SSE event, once, and every open stream writes those same bytes. A
viewer that reads slowly skips snapshots (each stream waits for the newest,
never a queue of old ones); one that stops reading for ``WRITE_TIMEOUT_S`` is
dropped. At most ``max_streams`` streams are open at once (the
``--dashboard-max-streams`` flag); past it ``503 dashboard_busy`` (JSON, with
``Retry-After``). At the app's shutdown every stream ends, so a viewer never
holds a stopping balancer for its shutdown timeout.

**What a snapshot holds.** Everything comes from the balancer's own books,
read once a second, never from the proxy path (which gains no work per
request): core's :class:`~core.balancer_state.BalancerState` (each backend's
health, ejector state, requests in flight, requests picked, errors), the
counts of :class:`~live.metrics.BalancerMetrics` (responses relayed, by
backend and status), ``no_healthy_backend`` refusals, the registry
follower's figures, and the recent latencies the balancer keeps for
``/lb-stats``. Rates (requests/s, share of the last interval, rejections/s)
are differences between two snapshots over the time between them. p50/p95
are over the answers of the last ``window_s`` (5 s): a backend's relayed 2xx
and 3xx since the previous snapshot tell how many of its newest recent
latencies are new (both are written by the same call in the balancer), and
the last ``window_s / interval_s`` such batches are kept.

Rejection kinds: ``no_healthy_backend`` (the balancer's 503), ``failed``
(the balancer's own 502/504: refused connection, broken or timed-out
exchange; core's error count less the 5xx relayed from that backend), and
the 4xx/5xx statuses relayed from the nodes (``429`` rate limited, ``503``
backpressure or an open breaker, ``500`` the node's error, ...).

**The nodes' own state.** Each snapshot also shows each node's circuit breaker
(``GET /circuit-status``) and queue (``GET /queue-stats``), polled by the
same task just before the snapshot: once per interval whatever the number of
viewers, at most ``node_concurrency`` requests at once, each bounded by
``node_timeout_s`` (and the whole round too), bodies read up to
``MAX_NODE_BODY``. A node that refuses or does not answer in time shows as
such; one without a breaker or a queue bound (``404 not_enabled``) shows
``off``. Only ``max_rows`` backends (the first in the books) get a row and a
poll; the totals count them all.

**Untrusted text.** Node ids, addresses and whatever a node answers are data
from outside. Here only the known fields are taken from a node's answers,
numbers kept only when finite, breaker states only from the known three;
ids and addresses go out as JSON strings (``json.dumps`` escapes every line
break, so no value can end an SSE event early). The page builds its DOM
with ``textContent`` only, and is served with a ``Content-Security-Policy``
that allows no inline script.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
from collections import deque
from dataclasses import dataclass
from importlib import resources
from typing import Any, Callable, Protocol

import aiohttp
import numpy as np
from aiohttp import web

from core._validate import integer, number
from core.balancer_state import BackendEntry, BalancerState
from live.http import json_error

__all__ = ["DASHBOARD", "Dashboard", "DashboardConfig", "Snapshot", "add_dashboard", "node_view"]

log = logging.getLogger("testbed.balancer")

#: A stream whose viewer takes longer than this to accept one snapshot is closed (seconds).
WRITE_TIMEOUT_S = 10.0
#: The most of a node's ``/circuit-status`` or ``/queue-stats`` body read (they are a few hundred bytes).
MAX_NODE_BODY = 64 * 1024
#: What the page's ``EventSource`` waits before reconnecting after a dropped stream (milliseconds).
RECONNECT_MS = 2000
BREAKER_STATES = frozenset({"CLOSED", "HALF_OPEN", "OPEN"})
_QUEUE_FIELDS = ("current", "max", "peak", "utilization_percent", "rejected", "waiting_for_worker", "in_service",
                 "workers")
_STATIC = {"dashboard.js": "application/javascript", "dashboard.css": "text/css"}
#: The page runs only its own script and style, talks only to its own origin, and is framed by no one.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class DashboardConfig:
    """How the dashboard behaves; every field has the flag's default."""

    max_streams: int = 8                # open /dashboard/events streams at most (0: none); past it 503
    interval_s: float = 1.0             # one snapshot per this many seconds while a stream is open
    window_s: float = 5.0               # p50/p95 over the answers of this many last seconds
    node_timeout_s: float = 0.5         # each poll of a node's /circuit-status or /queue-stats, at most
    node_concurrency: int = 8           # node polls running at once
    max_rows: int = 100                 # backends shown (and polled) at most

    def __post_init__(self) -> None:
        integer("max_streams", self.max_streams, ge=0, le=10_000)
        number("interval_s", self.interval_s, ge=0.05, le=60)
        number("window_s", self.window_s, ge=self.interval_s, le=600)
        number("node_timeout_s", self.node_timeout_s, gt=0, le=self.interval_s)
        integer("node_concurrency", self.node_concurrency, ge=1, le=1024)
        integer("max_rows", self.max_rows, ge=1, le=100_000)


class Balancer(Protocol):
    """What the dashboard reads of :class:`live.balancer.Balancer` (named here: it imports this module)."""

    id: str
    no_backend: int
    metrics: Any
    @property
    def state(self) -> BalancerState: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    @property
    def config(self) -> Any: ...


# -- the nodes' own state ------------------------------------------------------------------------------------
def _finite(value: Any) -> float | int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return value if math.isfinite(value) else None


def node_view(path: str, status: int, body: bytes) -> dict[str, Any] | str:
    """What the page shows of one answer of a node to ``path`` (``/circuit-status`` or ``/queue-stats``):
    the known fields (numbers finite, the breaker's state one of three), ``"off"`` for ``404 not_enabled``,
    or a short reason it cannot be shown. Nothing else the node sent goes to the page."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # ValueError: also UnicodeDecodeError
        data = None
    if status == 404 and isinstance(data, dict) and isinstance(data.get("error"), dict) \
            and data["error"].get("code") == "not_enabled":
        return "off"
    if status != 200:
        return f"answered {status}"
    if not isinstance(data, dict):
        return "not JSON"
    if path == "/circuit-status":
        state = data.get("state")
        counts = data.get("counts")
        if not isinstance(counts, dict):
            counts = {}
        return {"state": state if state in BREAKER_STATES else "?",
                "consecutive_failures": _finite(data.get("consecutive_failures")),
                "retry_after_s": _finite(data.get("retry_after_s")),
                "rejected": _finite(counts.get("rejected"))}
    return {name: _finite(data.get(name)) for name in _QUEUE_FIELDS}


class NodePolls:
    """Each shown node's breaker and queue, asked once per round; at most ``node_concurrency`` at once."""

    def __init__(self, config: DashboardConfig) -> None:
        self.config = config
        self.session: aiohttp.ClientSession | None = None
        self.views: dict[str, dict[str, Any]] = {}  # backend id -> {"breaker", "queue", "reach"}

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(limit=self.config.node_concurrency)
        self.session = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def round(self, entries: list[BackendEntry]) -> None:
        """Ask every node of ``entries`` once, within ``node_timeout_s`` in all."""
        gate = asyncio.Semaphore(self.config.node_concurrency)
        views: dict[str, dict[str, Any]] = {e.id: {"breaker": None, "queue": None, "reach": "no answer"}
                                            for e in entries}

        async def ask(entry: BackendEntry, path: str, field: str) -> None:
            assert self.session is not None
            async with gate:
                try:
                    async with self.session.get(entry.url + path, allow_redirects=False) as resp:
                        body = await resp.content.read(MAX_NODE_BODY)
                        views[entry.id][field] = node_view(path, resp.status, body)
                        views[entry.id]["reach"] = "ok"
                except aiohttp.ClientConnectorError:
                    views[entry.id]["reach"] = "unreachable"
                except (aiohttp.ClientError, ValueError):
                    views[entry.id]["reach"] = "broken answer"
        try:
            async with asyncio.timeout(self.config.node_timeout_s):
                await asyncio.gather(*(ask(e, path, field) for e in entries
                                       for path, field in (("/circuit-status", "breaker"), ("/queue-stats", "queue"))))
        except asyncio.TimeoutError:
            pass  # whoever has not answered shows "no answer"
        self.views = views


# -- the snapshot ----------------------------------------------------------------------------------------------
class Snapshot:
    """Builds the JSON the page shows from the balancer's books (see the module docstring); keeps what the
    next snapshot's rates and latency window need. No I/O: the driver hands in ``now`` and the node views."""

    def __init__(self, lb: Balancer, config: DashboardConfig) -> None:
        self.lb = lb
        self.config = config
        self.batches = max(1, round(config.window_s / config.interval_s))
        self.seq = 0
        self._prev_t: float | None = None
        self._prev_requests: dict[str, int] = {}
        self._prev_ok: dict[str, int] = {}
        self._prev_kinds: dict[str, int] = {}
        self._prev_total = 0
        self._window: dict[str, deque[np.ndarray]] = {}

    def reset(self) -> None:
        """Forget the previous snapshot (the first after a pause has no rates and an empty latency window)."""
        self._prev_t = None
        self._window.clear()

    def take(self, *, now: float, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
        lb, state = self.lb, self.lb.state
        elapsed = None if self._prev_t is None else max(1e-9, now - self._prev_t)
        relayed = self._relayed()
        entries = list(state.backends.values())
        shown = entries[:self.config.max_rows]
        total = sum(e.requests for e in entries)
        picked = total - self._prev_total
        rows = [self._row(e, now, elapsed, picked, relayed.get(e.id, {}), nodes.get(e.id)) for e in shown]
        kinds = self._kinds(entries, relayed)
        rejections = {kind: {"total": n, "per_s": None if elapsed is None else
                             max(0, n - self._prev_kinds.get(kind, 0)) / elapsed} for kind, n in kinds.items()}
        follower = state.follower
        self.seq += 1
        snapshot = {
            "seq": self.seq, "t_s": now, "interval_s": self.config.interval_s, "window_s": self.config.window_s,
            "balancer": {"id": lb.id, "strategy": lb.config.strategy, "requests": total,
                         "per_s": None if elapsed is None else max(0, picked) / elapsed,
                         "in_flight": sum(e.active for e in entries)},
            "membership": {"source": "registry" if lb.config.registry else "static", "registry": lb.config.registry,
                           "members": len(entries), "healthy": sum(1 for e in entries if e.health.healthy),
                           "available": sum(1 for e in entries if e.available(now)),
                           "max_backends": lb.config.max_backends,
                           "left_out": follower.left_out if follower is not None else 0,
                           "refused": len(follower.refused) if follower is not None else 0},
            "rejections": rejections,
            "backends": rows, "shown": len(rows), "total": len(entries),
        }
        self._prev_t, self._prev_total, self._prev_kinds = now, total, kinds
        self._prev_requests = {e.id: e.requests for e in entries}
        for gone in self._window.keys() - state.backends.keys():
            del self._window[gone]
        return snapshot

    def _relayed(self) -> dict[str, dict[int, int]]:
        """Responses relayed so far, by backend and status (the metrics' counts)."""
        out: dict[str, dict[int, int]] = {}
        for (backend, status), n in list(self.lb.metrics.counts_by.items()):
            by_status = out.setdefault(backend, {})
            by_status[status] = by_status.get(status, 0) + n
        return out

    def _kinds(self, entries: list[BackendEntry], relayed: dict[str, dict[int, int]]) -> dict[str, int]:
        kinds = {"no_healthy_backend": self.lb.no_backend, "failed": 0}
        for statuses in relayed.values():
            for status, n in statuses.items():
                if status >= 400:
                    kinds[str(status)] = kinds.get(str(status), 0) + n
        for e in entries:
            fives = sum(n for status, n in relayed.get(e.id, {}).items() if status >= 500)
            kinds["failed"] += max(0, e.errors - fives)  # a re-joined backend's books start at 0 again
        return kinds

    def _row(self, e: BackendEntry, now: float, elapsed: float | None, picked: int, relayed: dict[int, int],
             node: dict[str, Any] | None) -> dict[str, Any]:
        sent = e.requests - self._prev_requests.get(e.id, e.requests)
        p50 = p95 = None
        window = self._window.setdefault(e.id, deque(maxlen=self.batches))
        ok = sum(n for status, n in relayed.items() if 200 <= status < 400)
        if elapsed is not None:  # the first snapshot only sets the baseline
            recent = getattr(e.driver, "recent", ())
            new = min(max(0, ok - self._prev_ok.get(e.id, ok)), len(recent))
            window.append(np.fromiter(itertools.islice(reversed(recent), new), float, count=new))
        self._prev_ok[e.id] = ok
        samples = sum(len(batch) for batch in window)
        if samples:
            p50, p95 = (float(v) * 1000 for v in np.percentile(np.concatenate(list(window)), (50, 95)))
        ejector = None if e.ejector is None else e.ejector.status(now=now)["state"]
        return {
            "id": e.id, "url": e.url, "weight": e.weight, "healthy": e.health.healthy, "available": e.available(now),
            "ejector": ejector, "in_flight": e.active, "requests": e.requests, "errors": e.errors,
            "per_s": None if elapsed is None else max(0, sent) / elapsed,
            "share": None if elapsed is None or picked <= 0 else max(0, sent) / picked,
            "p50_ms": p50, "p95_ms": p95, "samples": samples,
            "last_check": str(getattr(e.driver, "last_check", ""))[:200],
            "node": node or {"breaker": None, "queue": None, "reach": "not polled yet"},
        }


# -- the streams -----------------------------------------------------------------------------------------------
class Dashboard:
    """The viewers, the shared snapshot task and its latest event (see the module docstring)."""

    def __init__(self, lb: Balancer, config: DashboardConfig) -> None:
        self.lb = lb
        self.config = config
        self.snapshot = Snapshot(lb, config)
        self.polls = NodePolls(config)
        self.viewers = 0
        self.closed = False
        self.version = 0            # snapshots published so far
        self.latest: bytes = b""    # the newest, as one SSE event
        self._published = asyncio.Event()
        self._wanted = asyncio.Event()

    def join(self) -> bool:
        """One more stream, if there is room; False past ``max_streams`` or once shutting down."""
        if self.closed or self.viewers >= self.config.max_streams:
            return False
        self.viewers += 1
        self._wanted.set()
        return True

    def leave(self) -> None:
        self.viewers -= 1

    async def next_event(self, seen: int) -> tuple[bytes, int] | None:
        """The newest event after version ``seen`` (waiting for it), or None once the dashboard closes."""
        while not self.closed:
            if self.version > seen and self.latest:
                return self.latest, self.version
            await self._published.wait()
        return None

    def publish(self, event: bytes) -> None:
        self.latest = event
        self.version += 1
        woken, self._published = self._published, asyncio.Event()
        woken.set()

    def close(self) -> None:
        """End every stream (the app is shutting down)."""
        self.closed = True
        self._published.set()
        self._wanted.set()

    async def run(self) -> None:
        """The one snapshot task: every ``interval_s`` while a stream is open, idle otherwise."""
        loop = asyncio.get_running_loop()
        while not self.closed:
            await self._wanted.wait()
            self.snapshot.reset()
            self.latest = b""  # a snapshot from before the pause is stale
            while self.viewers > 0 and not self.closed:
                started = loop.time()
                try:
                    await self.tick()
                except Exception:  # noqa: BLE001 - a bug here must not end the dashboard for good
                    log.exception("dashboard snapshot failed")
                await asyncio.sleep(max(0.0, started + self.config.interval_s - loop.time()))
            if self.viewers <= 0:
                self._wanted.clear()

    async def tick(self) -> None:
        """Poll the shown nodes, take one snapshot, publish it."""
        entries = list(itertools.islice(self.lb.state.backends.values(), self.config.max_rows))
        await self.polls.round(entries)
        data = self.snapshot.take(now=self.lb.clock(), nodes=self.polls.views)
        self.publish(b"data: " + json.dumps(data, separators=(",", ":"), allow_nan=False).encode() + b"\n\n")


DASHBOARD = web.AppKey("dashboard", Dashboard)
PAGES = web.AppKey("dashboard_pages", dict)


def _static(name: str) -> bytes:
    return resources.files("live").joinpath("static", name).read_bytes()


async def page(request: web.Request) -> web.StreamResponse:
    """``GET /dashboard``: the page."""
    return web.Response(body=request.app[PAGES]["dashboard.html"], content_type="text/html", charset="utf-8",
                        headers={"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                                 "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"})


async def static_file(request: web.Request) -> web.StreamResponse:
    """``GET /dashboard/<file>``: the page's script and style; any other path under ``/dashboard/`` is a 404
    of the balancer's own (never proxied)."""
    name = request.match_info["file"]
    if name in _STATIC:
        return web.Response(body=request.app[PAGES][name], content_type=_STATIC[name], charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})
    return json_error(404, "not_found", f"no dashboard file {name!r}; the page is GET /dashboard")


async def events(request: web.Request) -> web.StreamResponse:
    """``GET /dashboard/events``: the snapshots as Server-Sent Events, one per interval, until the viewer
    leaves or the balancer stops; ``503 dashboard_busy`` past ``max_streams``."""
    dash = request.app[DASHBOARD]
    headers = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    if request.method == "HEAD":
        return web.Response(headers=headers)
    if not dash.join():
        limit = dash.config.max_streams
        return json_error(503, "dashboard_busy",
                           f"{limit} dashboard streams are open already, the most this balancer serves at once "
                           "(--dashboard-max-streams)", headers={"Retry-After": "5"}, max_streams=limit)
    response = web.StreamResponse(headers=headers)
    try:
        await response.prepare(request)
        await response.write(b"retry: %d\n\n" % RECONNECT_MS)
        seen = 0
        while True:
            got = await dash.next_event(seen)
            if got is None:
                break
            event, seen = got
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await response.write(event)
    except (ConnectionError, asyncio.TimeoutError):
        request.protocol.force_close()  # the viewer left or stopped reading
    finally:
        dash.leave()
    return response


async def _running(app: web.Application) -> Any:
    dash = app[DASHBOARD]
    await dash.polls.open()
    task = asyncio.create_task(dash.run())
    yield
    dash.close()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await dash.polls.close()


async def _shutdown(app: web.Application) -> None:
    app[DASHBOARD].close()  # before the server waits for its handlers: the streams end now


def add_dashboard(app: web.Application, lb: Balancer, config: DashboardConfig | None = None) -> Dashboard:
    """Serve the dashboard from ``app`` (the balancer's): ``GET /dashboard``, ``/dashboard/events`` and
    ``/dashboard/<file>``. Register it before the proxy's catch-all route, which would take these paths."""
    dash = Dashboard(lb, config or DashboardConfig())
    app[DASHBOARD] = dash
    app[PAGES] = {name: _static(name) for name in ("dashboard.html", *_STATIC)}
    app.router.add_get("/dashboard", page)
    app.router.add_get("/dashboard/events", events)
    app.router.add_get("/dashboard/{file:.*}", static_file)
    app.on_shutdown.append(_shutdown)
    app.cleanup_ctx.append(_running)
    return dash
