"""The balancer's background work on its backends: health checks, the stall tick, following the registry.

Theory of operation
-------------------
**Health checks.** One task wakes at each tick of core's fixed schedule
(:meth:`core.balancer_state.BalancerState.due_checks`: ten ticks per health
interval, the backends spread over them; it sleeps at most ``MAX_TICK_S``, so
a new member is checked at once whatever the interval) and hands the due backends to at
most ``health_concurrency`` checks at a time; the others wait their turn in
arrival order, and a backend whose last check is still waiting or running is
not queued twice. However many backends there are, the proxy path shares the
event loop with a bounded number of checks. A check is ``GET /health`` with
its own timeout (``health_timeout_s``, by default half the interval: see
:mod:`core.health`); its status alone says whether it passed (a 200 whose
body is ``ok``, not JSON, passes), and a JSON object body may carry
``workers``, the backend's weight, cut to ``core.registry_follower.MAX_WEIGHT``.
Core's health tracker decides what a run of results means. On the same tick, :meth:`~core.balancer_state.BalancerState.tick`
ejects backends that hold requests and have gone silent (:mod:`core.outlier`;
the pick path judges the backend it picks as well), each stall is logged, and
the books' state changes (health flips, timed with the check's ``now``, and
ejector transitions) go to the balancer's ring for ``GET /lb-events``.

**Following the registry.** With ``--registry``, ``GET /nodes`` is polled every
``refresh_s``; :class:`core.registry_follower.RegistryFollower` says what an
unchanged list needs (nothing) and what a changed one does: members gone and
idle leave, new or moved members are admitted (below) and join *held*, out of
rotation until their first health check passes, and members past
``max_backends`` are left out. Each poll that leaves members out or refuses
some says so in one WARNING. A restarted registry (its listing names a new
``instance``) lists only the nodes that have registered again so far: the
follower keeps the others for the registry's TTL meanwhile (the refill
window, :mod:`core.registry_follower`), with one WARNING when it starts.

**Warming up** (Envoy's cluster warming). The balancer learns its backends
before it listens: :func:`running` is the app's cleanup context, which aiohttp
runs before the listening socket opens, and it first awaits :func:`warm_up`:
the registry's first listing applied (a failed poll tried again every
``WARMUP_RETRY_S``), then one round of checks of every backend in the books.
So no client meets a balancer that answers 503 only because it has just
started and holds its members out until their first check. The warm-up is
bounded by ``warmup_timeout_s`` (``--warmup-timeout``, default 2 s; 0: none):
past it, one WARNING says what was missing and the balancer listens anyway,
the checks still running going on in the background.

The warm-up keeps its own deadline (loop time) and does not count on being
cancelled through aiohttp: each registry poll is given at most the time left
(and ``REGISTRY_TIMEOUT_S``), and the loop looks at the deadline before each
try. A poll whose aiohttp timeout fell due with the warm-up's own cancellation
used to come back as an ordinary ``TimeoutError`` (aiohttp's timer turns the
cancellation into one and uncancels the task), the expired
``asyncio.timeout`` never fired again, and a registry that accepted
connections and never answered kept the balancer polling forever, never
listening (and so never seeing SIGTERM, which ``live.serve`` acts on once
listening).

**Admitting a backend.** Every address, from ``--nodes`` at start
(:func:`check_nodes`: a refused one is a usage error) or from the registry (a
refused one is skipped and counted), must resolve only into
``allow_backends`` (default :meth:`core.addresses.AllowList.default_for` the
balancer's ``--host``; :func:`live.resolve.check_backend`) and must not be the
balancer's own listening address (:class:`core.registry_follower.OwnAddress`;
the port comes from ``--port`` or, with port 0, from :func:`listening`).

The proxy path itself is :mod:`live.balancer`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import ipaddress
import json
import logging
import socket
from collections import deque
from typing import Any, AsyncIterator, Callable, Iterable, Protocol

import aiohttp

from core.addresses import AddressError, AllowList
from core.balancer_state import BackendEntry, BalancerState
from core.health import counts_as_failure, default_health_timeout_s
from core.outlier import StallRule
from core.registry_follower import (Listed, OwnAddress, Plan, RegistryFollower, Source, parse_listing, parse_source,
                                     weight)
from live.http import cancel_and_wait
from live.resolve import check_backend, resolve_host

__all__ = ["NOT_CHECKED", "HealthChecks", "admit", "apply_listing", "backends_stats", "check_nodes",
           "entry_stats", "follow_registry", "health_checks", "health_timeout_s", "listening", "own_address",
           "poll_registry", "running", "stall_rule", "warm_up"]

log = logging.getLogger("testbed.balancer")

#: The most of a backend's ``/health`` body a check reads (it is a few hundred bytes).
MAX_HEALTH_BODY = 64 * 1024
#: The longest the health task sleeps: how late a new member's first check and the stall tick may be
#: (the check schedule's own ticks are a tenth of the interval apart: 0.1 s by default).
MAX_TICK_S = 0.1
#: How many new registry members are resolved and checked at once.
ADMIT_CONCURRENCY = 32
#: A registry poll's timeout (seconds).
REGISTRY_TIMEOUT_S = 2.0
#: During the warm-up, the wait before another registry poll when one failed (the registry may be starting too).
WARMUP_RETRY_S = 0.1
#: A backend's ``last_check`` before its first check has ended.
NOT_CHECKED = "not checked yet"


class BalancerConfig(Protocol):
    """What this module reads of :class:`live.balancer.BalancerConfig` (named here, not imported:
    ``live.balancer`` imports this module)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def nodes(self) -> tuple[str, ...]: ...
    @property
    def registry(self) -> str | None: ...
    @property
    def refresh_s(self) -> float: ...
    @property
    def health_interval_s(self) -> float: ...
    @property
    def health_timeout_s(self) -> float | None: ...
    @property
    def health_concurrency(self) -> int: ...
    @property
    def stall_after_s(self) -> float | None: ...
    @property
    def stall_factor(self) -> float: ...
    @property
    def max_backends(self) -> int: ...
    @property
    def allow_backends(self) -> str | None: ...
    @property
    def warmup_timeout_s(self) -> float: ...


class Balancer(Protocol):
    """What this module uses of :class:`live.balancer.Balancer`."""

    @property
    def config(self) -> BalancerConfig: ...
    @property
    def state(self) -> BalancerState: ...
    @property
    def session(self) -> aiohttp.ClientSession | None: ...
    @property
    def clock(self) -> Callable[[], float]: ...
    def join(self, backend_id: str, url: str, weight: int) -> BackendEntry: ...
    def drain_events(self) -> None: ...


def health_timeout_s(config: BalancerConfig) -> float:
    """The health checks' timeout: ``--health-timeout``, by default half the interval; never past the interval."""
    given = config.health_timeout_s
    timeout = default_health_timeout_s(config.health_interval_s) if given is None else given
    return min(timeout, config.health_interval_s)


def stall_rule(config: BalancerConfig) -> StallRule | None:
    """The hung-backend rule: silent for ``max(stall_after_s, stall_factor * EWMA)``; None when off."""
    floor = health_timeout_s(config) if config.stall_after_s is None else config.stall_after_s
    return StallRule(floor, config.stall_factor) if floor > 0 else None


def allow_list(config: BalancerConfig) -> AllowList:
    """``--allow-backends`` (CIDRs, or ``any``), by default loopback only when bound to loopback."""
    text = config.allow_backends
    return AllowList.parse(text) if text is not None else AllowList.default_for(config.host)


# -- warming up ---------------------------------------------------------------------------------------------
@contextlib.asynccontextmanager
async def running(lb: Balancer) -> AsyncIterator[None]:
    """The balancer's background work around its serving: :func:`warm_up` first (the app's startup, so
    before it listens), then the health checks and the registry poll until the balancer stops."""
    checks = HealthChecks(lb)
    tasks: list[asyncio.Task[None]] = []
    try:
        polled = await warm_up(lb, checks)
        tasks.append(asyncio.create_task(health_checks(lb, checks)))
        if lb.config.registry:
            tasks.append(asyncio.create_task(follow_registry(lb, polled=polled)))
        yield
    finally:
        await cancel_and_wait(*tasks)
        await checks.close()


async def warm_up(lb: Balancer, checks: HealthChecks) -> bool:
    """Learn the backends before listening, within ``warmup_timeout_s``: the registry's first listing applied
    (a failed poll is tried again every ``WARMUP_RETRY_S``), then every backend's first check done. Past the
    timeout, one WARNING says what was missing and the balancer listens anyway (the checks still running go
    on). Returns whether a registry listing was applied."""
    config, state, follower = lb.config, lb.state, follower_of(lb)
    if config.registry and follower.own is None and config.port:
        follower.own = own_address(config.host, config.port)
    timeout_s, started = config.warmup_timeout_s, lb.clock()
    if timeout_s <= 0:
        return False
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    polled, error = not config.registry, None
    try:
        async with asyncio.timeout_at(deadline):  # bounds the listing's admission and the checks
            while not polled:
                left_s = deadline - loop.time()
                if left_s <= 0:
                    raise asyncio.TimeoutError  # even if a cancellation at the deadline was swallowed below
                error = await poll_registry(lb, timeout_s=left_s)
                polled = error is None
                if not polled and left_s < REGISTRY_TIMEOUT_S and loop.time() >= deadline:
                    error = None  # cut short by the warm-up's own end: "no answer yet"
                if not polled:
                    await asyncio.sleep(min(WARMUP_RETRY_S, max(0.0, deadline - loop.time())))
            checks.submit(state.due_checks(now=lb.clock()))
            await checks.settled()
    except asyncio.TimeoutError:
        if not polled:
            missing = f"no listing from the registry {config.registry} ({error or 'no answer yet'})"
        else:
            unchecked = sum(1 for e in state.backends.values() if e.driver.last_check == NOT_CHECKED)
            missing = f"{unchecked} of {len(state.backends)} backends not checked yet"
        log.warning("not warm after %g s (--warmup-timeout): %s; listening anyway", timeout_s, missing)
        return polled
    healthy = sum(1 for e in state.backends.values() if e.health.healthy)
    log.info("warm in %.3f s: %d of %d backends healthy", lb.clock() - started, healthy, len(state.backends))
    return polled


# -- health checks --------------------------------------------------------------------------------------
async def health_checks(lb: Balancer, checks: HealthChecks) -> None:
    """Check each backend's ``/health`` once per interval and run the stall tick, for the balancer's lifetime."""
    state = lb.state
    while True:
        now = lb.clock()
        checks.submit(state.due_checks(now=now))
        state.tick(now=now)
        for s in state.drain_stalls():
            log.warning("backend %s stalled: %d requests in flight and no answer for %.2f s (more than %.2f s): "
                        "ejected", s.backend, s.in_flight, s.silent_s, s.threshold_s)
        lb.drain_events()
        deadline = state.checks.next_deadline()
        wait_s = (deadline if deadline is not None else now) - lb.clock()
        await asyncio.sleep(min(max(0.001, wait_s), MAX_TICK_S))


class HealthChecks:
    """At most ``health_concurrency`` checks running; the rest wait in arrival order. :meth:`settled` waits
    until none is waiting or running (the warm-up's first round)."""

    def __init__(self, lb: Balancer) -> None:
        self.lb = lb
        self.timeout = aiohttp.ClientTimeout(total=health_timeout_s(lb.config))
        self.limit = lb.config.health_concurrency
        self.waiting: deque[BackendEntry] = deque()
        self.pending: set[BackendEntry] = set()  # waiting or running
        self.running: set[asyncio.Task[None]] = set()
        self._quiet = asyncio.Event()
        self._quiet.set()
        lb.state.stall_rule = stall_rule(lb.config)

    def submit(self, entries: Iterable[BackendEntry]) -> None:
        for entry in entries:
            if entry not in self.pending:
                self.pending.add(entry)
                self.waiting.append(entry)
                self._quiet.clear()
        self._launch()

    async def settled(self) -> None:
        """Until every check submitted so far has ended."""
        await self._quiet.wait()

    def _launch(self) -> None:
        backends = self.lb.state.backends
        while self.waiting and len(self.running) < self.limit:
            entry = self.waiting.popleft()
            if backends.get(entry.id) is not entry:  # it left (or moved) while waiting
                self.pending.discard(entry)
                continue
            task = asyncio.create_task(_check(self.lb, entry, self.timeout))
            self.running.add(task)
            task.add_done_callback(functools.partial(self._done, entry))
        if not self.pending:
            self._quiet.set()

    def _done(self, entry: BackendEntry, task: asyncio.Task[None]) -> None:
        self.running.discard(task)
        self.pending.discard(entry)
        if not task.cancelled() and task.exception() is not None:
            log.error("health check of %s failed: %r", entry.id, task.exception())
        self._launch()

    async def close(self) -> None:
        self.waiting.clear()
        await cancel_and_wait(*self.running)


async def _check(lb: Balancer, backend: BackendEntry, timeout: aiohttp.ClientTimeout) -> None:
    assert lb.session is not None
    try:
        async with lb.session.get(f"{backend.url}/health", timeout=timeout, allow_redirects=False,
                                  headers={"X-Client-ID": "testbed-balancer-health-check"}) as resp:
            ok = not counts_as_failure(resp.status)
            if resp.status == 200:
                claimed = weight(_workers(await resp.content.read(MAX_HEALTH_BODY)))
                if claimed is not None:
                    backend.weight = claimed
            backend.driver.last_check = f"{resp.status}"
    except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
        ok = False
        reason = str(exc) or ("timed out" if isinstance(exc, asyncio.TimeoutError) else "")
        backend.driver.last_check = f"{type(exc).__name__}: {reason}"[:200]
    lb.state.checked(backend, ok, now=lb.clock())


def _workers(body: bytes) -> Any:
    """``workers`` of a ``/health`` body if it is a JSON object, else None: the status alone decides health,
    and a body that is not JSON (``ok``) is no failure."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):  # ValueError: also UnicodeDecodeError; RecursionError: [[[[...]]]]
        return None
    return data.get("workers") if isinstance(data, dict) else None


# -- following the registry ------------------------------------------------------------------------------
def follower_of(lb: Balancer) -> RegistryFollower:
    """The balancer's registry follower (made on first use, with ``max_backends``)."""
    if lb.state.follower is None:
        lb.state.follower = RegistryFollower(lb.config.max_backends, static=lb.config.nodes)
    return lb.state.follower


async def follow_registry(lb: Balancer, *, polled: bool = False) -> None:
    """Poll the registry's ``GET /nodes`` every ``refresh_s`` and follow its membership (the first poll
    after one interval if the warm-up's was applied: ``polled``)."""
    assert lb.config.registry
    while True:
        if polled:
            await asyncio.sleep(lb.config.refresh_s)
        polled = True
        error = await poll_registry(lb)
        if error is not None:
            log.warning("registry %s: %s (keeping the last membership)", lb.config.registry, error)


async def poll_registry(lb: Balancer, *, timeout_s: float = REGISTRY_TIMEOUT_S) -> str | None:
    """One ``GET /nodes``, applied; None if it was, else what went wrong (the membership is unchanged).
    The request (connect, headers and body) takes at most ``timeout_s``, and never more than ``REGISTRY_TIMEOUT_S``."""
    assert lb.session is not None and lb.config.registry
    url = lb.config.registry.rstrip("/") + "/nodes"
    total_s = min(timeout_s, REGISTRY_TIMEOUT_S)
    try:
        async with lb.session.get(url, timeout=aiohttp.ClientTimeout(total=total_s)) as resp:
            if resp.status != 200:
                return f"answered {resp.status}"
            body = await resp.json()
    except asyncio.TimeoutError:
        return f"no answer within {total_s:.3g} s"
    except (aiohttp.ClientError, ValueError) as exc:
        return str(exc) or type(exc).__name__
    if not isinstance(body, dict):
        return "answered JSON that is not an object"
    await apply_listing(lb, parse_listing(body.get("nodes")), parse_source(body))
    return None


async def apply_listing(lb: Balancer, listing: dict[str, Listed], source: Source = Source()) -> None:
    """Follow one listing of the registry: leave, admit and join as core's follower plans. Cancelled
    mid-way (a warm-up past its timeout, shutdown), the next listing is planned in full again."""
    state, follower = lb.state, follower_of(lb)
    previous = follower.instance
    plan = follower.plan(listing, now=lb.clock(), source=source, in_books=len(state.backends),
                         busy=lambda node_id: (e := state.backends.get(node_id)) is not None and e.active > 0)
    if plan is None:
        return
    if plan.new_instance:
        log.warning("registry %s is a new instance (%s, was %s): the %d member(s) it does not list yet are kept "
                    "for %g s (its TTL) while nodes register again", lb.config.registry, source.instance, previous,
                    len(plan.kept), source.refill_s)
    if plan.leave:
        lb.drain_events()  # a leaving backend's ejector takes its undrained transitions with it
    for node_id in plan.leave:
        log.info("backend %s left", node_id)
        state.remove(node_id)
    try:
        await _admit_and_join(lb, plan)
    except BaseException:
        follower.replan()
        raise
    if plan.left_out:
        log.warning("left out %d registry member(s): the balancer follows at most %d backends (--max-backends)",
                    plan.left_out, follower.max_backends)


async def _admit_and_join(lb: Balancer, plan: Plan) -> None:
    state, follower = lb.state, follower_of(lb)
    allow = allow_list(lb.config)
    gate = asyncio.Semaphore(ADMIT_CONCURRENCY)

    async def one(node_id: str, listed: Listed) -> tuple[str, Listed, str | None, str | None]:
        async with gate:
            try:
                return node_id, listed, await admit(listed.url, allow, follower.own), None
            except AddressError as exc:
                return node_id, listed, None, str(exc)
    refused = []
    for node_id, listed, url, reason in await asyncio.gather(*(one(i, m) for i, m in plan.check)):
        if url is None:
            follower.refused_at(node_id, listed)
            state.remove(node_id)  # a member that moved somewhere refused loses its old entry too
            refused.append(f"{node_id} at {listed.url}: {reason}")
            continue
        log.info("backend %s joined at %s", node_id, url)
        entry = lb.join(node_id, url, listed.weight)
        # No traffic until its first health check passes. Untimed: a fresh entry held is a backend arriving,
        # not a healthy one going down, so the books list no health flip for it (its first pass is "up").
        state.hold(entry)
        follower.joined(node_id, listed)
    if refused:
        log.warning("refused %d registry member(s) as backends: %s%s", len(refused),
                    "; ".join(refused[:3]), f"; and {len(refused) - 3} more" if len(refused) > 3 else "")


# -- admitting backends ------------------------------------------------------------------------------------
async def admit(url: str, allow: AllowList, own: OwnAddress | None) -> str:
    """``url`` normalised if every address it resolves to is allowed and none is this balancer's
    own; AddressError naming the problem otherwise."""
    backend = await check_backend(url, allow)
    if own is not None and backend.port == own.port:
        for ip in await resolve_host(backend.host, backend.port):
            if own.reaches(ip, backend.port):
                raise AddressError(f"{backend.url} is this balancer's own address")
    return backend.url


def check_nodes(config: BalancerConfig) -> None:
    """Check ``--nodes`` before the balancer starts: AddressError (a usage error) for the first refused."""
    if len(config.nodes) > config.max_backends:
        raise AddressError(f"{len(config.nodes)} --nodes are more than --max-backends {config.max_backends}")
    own = own_address(config.host, config.port) if config.port else None
    allow = allow_list(config)

    async def check_all() -> None:
        for url in config.nodes:
            try:
                await admit(url, allow, own)
            except AddressError as exc:
                raise AddressError(f"backend {url}: {exc}") from None
    asyncio.run(check_all())


def own_address(host: str, port: int) -> OwnAddress:
    """Where a balancer bound to ``host``:``port`` listens (the host resolved; an unspecified host
    adds this machine's own addresses). Blocking: call it at start."""
    ips: set[str] = set()
    try:
        ips.update(str(info[4][0]) for info in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError):
        ips.add(host)
    if any(_unspecified(ip) for ip in ips):
        try:
            ips.update(str(info[4][0]) for info in socket.getaddrinfo(socket.gethostname(), port,
                                                                       type=socket.SOCK_STREAM))
        except (OSError, UnicodeError):
            pass
    return OwnAddress(frozenset(ips), port)


def _unspecified(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip.split("%", 1)[0]).is_unspecified
    except ValueError:
        return False


def listening(lb: Balancer, port: int) -> None:
    """Tell a balancer the port it is bound to (``serve``'s ``on_listening``, for ``--port 0``): from
    then on a registry member at that address is refused as the balancer itself. Members the warm-up
    followed at that port before it was known are dropped and checked again at the next poll."""
    follower = follower_of(lb)
    own = own_address(lb.config.host, port)
    if follower.own == own:
        return
    for node_id in follower.own_known(own):
        log.info("backend %s dropped: listed at this balancer's port %d, checked again at the next poll",
                 node_id, port)
        lb.state.remove(node_id)


# -- what /lb-stats shows ------------------------------------------------------------------------------------
def backends_stats(lb: Balancer) -> dict[str, Any]:
    """The membership figures for ``/lb-stats``: the cap, members left out past it, members refused."""
    follower = lb.state.follower
    return {"max_backends": lb.config.max_backends,
            "left_out": follower.left_out if follower is not None else 0,
            "refused": len(follower.refused) if follower is not None else 0}


def entry_stats(entry: BackendEntry, now: float) -> dict[str, Any]:
    """One backend's figures for ``/lb-stats`` beside the proxy's: stalls found, time since the last request."""
    return {"stalls": entry.stall.stalls,
            "last_sent_ago_s": None if entry.last_sent is None else max(0.0, now - entry.last_sent)}
