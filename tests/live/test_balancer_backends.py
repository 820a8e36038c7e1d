"""The balancer's backends, live: a hung node, a registration flood, refused addresses (issue 11, items 10, 4, 2).

* A node SIGSTOPped under steady load (50 requests/s through a balancer with two
  real node processes) stops getting new requests within 2 health intervals:
  the balancer's own record of the last request it sent there says so.
* A registry listing 5,000 members at loopback addresses where nothing listens
  plus one real node: the balancer follows at most ``max_backends``, warns once,
  and the real node stays healthy and serves 30 of 30 requests.
* Registry members at addresses outside the allowed networks, or at the
  balancer's own address, are skipped (one WARNING, counted); ``--nodes`` ones
  are a usage error at start.

The balancer runs in the test's process (its books are read directly), the hung
node in its own (SIGSTOP needs one). Every wait polls a state with a deadline;
every process started is stopped by PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
import socketserver
import subprocess
import threading
import time
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest
from aiohttp import web
from click.testing import CliRunner

from experiments.cli_balancer import balancer_command
from live.backends import backends_stats, listening
from live.balancer import STATE, Balancer, BalancerConfig, make_balancer_app
from live.node import NodeConfig, make_node_app
from solutions.impl import strategy_class
from tests.live.polling import until
from tests.live.procs import TESTBED, Proc, request, wait_until

INTERVAL_S = 1.0  # the default --health-interval


def balancer_app(clock: Callable[[], float] | None = None, **config: Any) -> web.Application:
    cfg = BalancerConfig(seed=1, **config)
    return make_balancer_app(cfg, strategy_cls=strategy_class(cfg.strategy, "solution"), clock=clock)


async def followed_and_healthy(lb: Balancer, backend_id: str) -> Any:
    """Wait until the balancer follows ``backend_id`` and its check has passed; its entry."""
    async def serving() -> bool:
        entry = lb.state.backends.get(backend_id)
        return entry is not None and entry.health.healthy
    await until(serving, timeout_s=10, what=f"{backend_id} followed and checked")
    return lb.state.backends[backend_id]


def in_rotation(stats: dict[str, Any]) -> bool:
    return bool(stats["healthy"]) and stats["ejector"] != "OPEN"


@contextlib.contextmanager
def node_processes(n: int) -> Iterator[list[Proc]]:
    started: list[Proc] = []
    try:
        for i in range(n):
            started.append(Proc("node", "--port", "0", "--id", f"node-{i + 1}", "--workers", "4",
                                "--load-factor", "5"))
        yield started
    finally:
        for p in started:
            p.send(signal.SIGCONT)  # a stopped process cannot act on SIGTERM
            p.stop()


class SteadyLoad:
    """Open-loop GETs at ``rate_per_s`` until stopped; every request's status is kept."""

    def __init__(self, session: aiohttp.ClientSession, url: str, rate_per_s: float) -> None:
        self.session, self.url, self.rate_per_s = session, url, rate_per_s
        self.requests: list[asyncio.Task[int]] = []
        self._runner = asyncio.create_task(self._run())

    async def _one(self) -> int:
        async with self.session.get(self.url) as resp:
            await resp.read()
            return resp.status

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        start = loop.time()
        while True:
            self.requests.append(asyncio.create_task(self._one()))
            await asyncio.sleep(max(0.0, start + len(self.requests) / self.rate_per_s - loop.time()))

    async def stop(self) -> None:
        self._runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner

    async def statuses(self, timeout_s: float) -> list[int]:
        done = await asyncio.wait_for(asyncio.gather(*self.requests, return_exceptions=True), timeout_s)
        return [s if isinstance(s, int) else -1 for s in done]


def slow_health_app() -> web.Application:
    """A backend that serves ``/work`` at once but takes 5 s to answer ``/health``: out after its first
    check, and each later check of it lasts the whole check timeout."""
    async def health(request: web.Request) -> web.Response:
        await asyncio.sleep(5)
        return web.json_response({"status": "ok"})

    async def work(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"X-Node-ID": "slow-health"})
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/work", work)
    return app


async def test_a_sigstopped_node_gets_no_new_request_later_than_two_health_intervals(aiohttp_server) -> None:
    """Two real nodes and a backend whose checks always time out, 50 requests/s. node-2 is stopped just
    after one of its checks passed: the worst moment for a balancer that waits for checks. Without
    passive detection its next check comes an interval later and fails a timeout after that; had the
    rounds waited for the slowest check (interval + timeout apart), later still."""
    loop = asyncio.get_running_loop()
    slow = await aiohttp_server(slow_health_app())
    with node_processes(2) as (node_1, node_2):
        app = balancer_app(nodes=(node_1.url, node_2.url, str(slow.make_url("")).rstrip("/")))  # defaults
        server = await aiohttp_server(app)
        lb: Balancer = app[STATE]
        hung = lb.state.backends[node_2.url]
        checks: list[tuple[str, bool, float]] = []  # (backend, passed, when): what the balancer concluded
        book_check = lb.state.checked

        def checked(entry: Any, ok: bool, **timed: Any) -> None:
            checks.append((entry.id, ok, loop.time()))
            book_check(entry, ok, **timed)
        lb.state.checked = checked  # type: ignore[method-assign]  # observe, then do as before
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            load = SteadyLoad(session, str(server.make_url("/work")), rate_per_s=50)
            try:
                async def both_serving() -> bool:
                    return hung.requests >= 20 and lb.state.backends[node_1.url].requests >= 20
                await until(both_serving, timeout_s=15, what="both nodes serving")
                seen = len(checks)

                async def node_2_just_checked() -> bool:
                    return any(b == node_2.url and ok for b, ok, _ in checks[seen:])
                await until(node_2_just_checked, timeout_s=10, what="a passing check of node-2")
                node_2.send(signal.SIGSTOP)
                t_stop = loop.time()  # the balancer's clock is the loop's (time.monotonic)
                sent_before = hung.requests

                async def out_of_rotation() -> bool:
                    async with session.get(server.make_url("/lb-stats")) as resp:
                        return not in_rotation((await resp.json())["backends"][node_2.url])
                await until(out_of_rotation, timeout_s=15, what="the hung node out of rotation (/lb-stats)")
                out_after_s = loop.time() - t_stop

                # Keep the load on past 2 health intervals, then read the balancer's own records.
                async def two_intervals_and_a_second_passed() -> bool:
                    return loop.time() > t_stop + 2 * INTERVAL_S + 1.0
                await until(two_intervals_and_a_second_passed, timeout_s=10, what="the observation window")
                last_sent_after_s = (hung.last_sent or 0.0) - t_stop
                sent_while_hung = hung.requests - sent_before
                failed_check_s = next((t - t_stop for b, ok, t in checks if b == node_2.url and not ok), None)
                await load.stop()
            finally:
                node_2.send(signal.SIGCONT)
            statuses = await load.statuses(timeout_s=40)  # those the hung node held end when it resumes

            async def back_in_rotation() -> bool:
                async with session.get(server.make_url("/work")) as resp:  # traffic for the probe
                    assert resp.status == 200
                async with session.get(server.make_url("/lb-stats")) as resp:
                    return in_rotation((await resp.json())["backends"][node_2.url])
            await until(back_in_rotation, timeout_s=20, what="the resumed node back in rotation")

    print(f"SIGSTOP at 50 req/s: out of rotation per /lb-stats {out_after_s:.2f} s after the stop; "
          f"{sent_while_hung} requests sent to it after the stop, the last {last_sent_after_s:.2f} s after; "
          f"its first failed check {failed_check_s} s after; stalls found {hung.stall.stalls}")
    assert last_sent_after_s <= 2 * INTERVAL_S, (
        f"a request went to the hung node {last_sent_after_s:.2f} s after SIGSTOP (more than 2 health intervals)")
    assert statuses.count(200) == len(statuses), f"not all 200: {sorted(set(statuses))}"


# -- a registration flood -------------------------------------------------------------------------------
@pytest.fixture
def dead_port() -> Iterator[int]:
    """A port held (bound on every address, never listening): a connection to any 127.x.y.z there is refused."""
    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        yield s.getsockname()[1]


class FakeRegistry:
    """``GET /nodes`` answering whatever ``members`` holds (id -> address), as registry ``instance``
    (None: the body does not say) with ``ttl_s``."""

    def __init__(self, instance: str | None = None, ttl_s: float = 5.0) -> None:
        self.members: dict[str, str] = {}
        self.instance, self.ttl_s = instance, ttl_s
        self.polls = 0
        self.app = web.Application()
        self.app.router.add_get("/nodes", self.nodes)

    async def nodes(self, request: web.Request) -> web.Response:
        self.polls += 1
        nodes = [{"id": k, "address": v, "metadata": {"workers": 1}} for k, v in self.members.items()]
        body: dict[str, Any] = {"nodes": nodes, "count": len(nodes)}
        if self.instance is not None:
            body["registry"] = {"instance": self.instance, "ttl_s": self.ttl_s, "heartbeat_interval_s": 2.0}
        return web.json_response(body)

    async def polled(self, times: int) -> None:
        """Until ``times`` more polls have been answered."""
        target = self.polls + times

        async def done() -> bool:
            return self.polls >= target
        await until(done, timeout_s=10, what=f"{times} more registry polls")


@contextlib.asynccontextmanager
async def registry_and_node(aiohttp_server: Any, registry: FakeRegistry | None = None
                            ) -> AsyncIterator[tuple[FakeRegistry, str, str]]:
    registry = registry or FakeRegistry()
    registry_server = await aiohttp_server(registry.app)
    node_server = await aiohttp_server(make_node_app(NodeConfig(node_id="real")))
    yield registry, str(registry_server.make_url("")).rstrip("/"), str(node_server.make_url("")).rstrip("/")


async def test_a_registration_flood_is_capped_and_the_real_node_keeps_serving(aiohttp_server, dead_port,
                                                                             caplog) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.balancer")
    async with registry_and_node(aiohttp_server) as (registry, registry_url, node_url):
        registry.members["real"] = node_url
        app = balancer_app(registry=registry_url, refresh_s=0.1)
        server = await aiohttp_server(app)
        lb: Balancer = app[STATE]

        real = await followed_and_healthy(lb, "real")
        transitions = real.health.transitions  # 1: held until its first check passed

        registry.members.update({f"junk-{i}": f"http://127.1.{i // 250}.{i % 250 + 1}:{dead_port}"
                                 for i in range(5000)})
        async def capped() -> bool:
            return len(lb.state.backends) == lb.config.max_backends
        await until(capped, timeout_s=20, what="the balancer at its cap")
        polls = registry.polls

        async def junk_checked() -> bool:  # every junk member has failed its first check
            return registry.polls >= polls + 3 and all(
                e.driver.last_check != "not checked yet" for e in lb.state.backends.values())
        await until(junk_checked, timeout_s=30, what="a first check of every backend")

        async with aiohttp.ClientSession() as session:
            statuses, served_by = [], set()
            for _ in range(30):
                async with session.get(server.make_url("/work")) as resp:
                    await resp.read()
                    statuses.append(resp.status)
                    served_by.add(resp.headers.get("X-Node-ID"))
            async with session.get(server.make_url("/lb-stats")) as resp:
                stats = await resp.json()

    assert statuses == [200] * 30 and served_by == {"real"}
    assert len(stats["backends"]) == 1000 and stats["backends"]["real"]["healthy"]
    assert real.health.transitions == transitions, "the real node was taken out while the flood was checked"
    assert lb.state.backends["real"] is real
    assert backends_stats(lb) == {"max_backends": 1000, "left_out": 4001, "refused": 0}
    left_out = [r.getMessage() for r in caplog.records if "left out" in r.getMessage()]
    assert left_out == ["left out 4001 registry member(s): the balancer follows at most 1000 backends "
                        "(--max-backends)"], left_out  # once: later polls list the same members


class BlackHole:
    """A TCP server that accepts connections and never answers; counts how many it holds at once."""

    def __init__(self) -> None:
        self.open = 0
        self.most_open = 0
        self.accepted = 0
        self.server: asyncio.AbstractServer | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    async def _hold(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.open += 1
        self.accepted += 1
        self.most_open = max(self.most_open, self.open)
        try:
            while await reader.read(65536):
                pass
        except ConnectionError:
            pass
        finally:
            self.open -= 1
            self.writers.discard(writer)
            writer.close()

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._hold, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for writer in list(self.writers):
            writer.close()
        await self.server.wait_closed()


async def test_health_checks_of_many_hung_backends_run_a_few_at_a_time(aiohttp_server) -> None:
    """200 registry members at an address that accepts and never answers: their checks (each ending
    at the 0.5 s timeout) run at most --health-concurrency at a time, and the real node beside them
    stays healthy and serves every request."""
    hole = BlackHole()
    async with registry_and_node(aiohttp_server) as (registry, registry_url, node_url), hole as hole_url:
        registry.members["real"] = node_url
        app = balancer_app(registry=registry_url, refresh_s=0.1, health_concurrency=8)
        server = await aiohttp_server(app)
        lb: Balancer = app[STATE]

        real = await followed_and_healthy(lb, "real")
        transitions = real.health.transitions
        registry.members.update({f"hung-{i}": hole_url for i in range(200)})

        async def many_checks() -> bool:
            return hole.accepted >= 40
        await until(many_checks, timeout_s=20, what="checks of the hung members")
        async with aiohttp.ClientSession() as session:
            statuses = []
            for _ in range(30):
                async with session.get(server.make_url("/work")) as resp:
                    await resp.read()
                    statuses.append(resp.status)
        most_open = hole.most_open

    print(f"200 hung members, --health-concurrency 8: at most {most_open} checks open at once; "
          f"{hole.accepted} checks of them so far")
    assert most_open <= 8, most_open
    assert statuses == [200] * 30
    assert real.health.transitions == transitions


async def test_registry_members_at_refused_addresses_or_the_balancer_itself_are_skipped(aiohttp_server,
                                                                                       caplog) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.balancer")
    async with registry_and_node(aiohttp_server) as (registry, registry_url, node_url):
        app = balancer_app(registry=registry_url, refresh_s=0.1)
        server = await aiohttp_server(app)
        lb: Balancer = app[STATE]
        listening(lb, server.port)  # what `testbed balancer` does once bound
        registry.members.update({
            "metadata": "http://169.254.169.254:80", "decimal": "http://2852039166:80",
            "mapped": "http://[::ffff:169.254.169.254]:80", "lan": "http://10.0.0.5:5001",
            "itself": f"http://127.0.0.1:{server.port}", "bad-port": "http://127.0.0.1:99999",
            "real": node_url})

        async def followed() -> bool:
            return "real" in lb.state.backends and backends_stats(lb)["refused"] == 6
        await until(followed, timeout_s=10, what="the registry's members followed or refused")
        async def real_checked() -> bool:
            return lb.state.backends["real"].health.healthy
        await until(real_checked, timeout_s=10, what="the real node's first check")
        async with aiohttp.ClientSession() as session:
            async with session.get(server.make_url("/work")) as resp:
                assert resp.status == 200 and resp.headers["X-Node-ID"] == "real"
        polls = registry.polls
        async def more_polls() -> bool:
            return registry.polls >= polls + 3
        await until(more_polls, timeout_s=10, what="three more polls")

    assert list(lb.state.backends) == ["real"]
    warnings = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("refused 6 registry member(s)"), warnings
    assert "169.254.169.254 is not in the allowed backend networks" in warnings[0]


async def test_a_registry_member_is_held_until_its_first_check_passes(aiohttp_server) -> None:
    async with registry_and_node(aiohttp_server) as (registry, registry_url, node_url):
        registry.members["real"] = node_url
        app = balancer_app(registry=registry_url, refresh_s=0.1, health_interval_s=60)
        await aiohttp_server(app)
        lb: Balancer = app[STATE]

        async def joined() -> bool:
            return "real" in lb.state.backends
        await until(joined, timeout_s=10, what="the member followed")
        entry = lb.state.backends["real"]
        # A 60 s interval: had the member joined healthy, nothing would have checked it before now.
        async def checked() -> bool:
            return entry.driver.last_check == "200"
        await until(checked, timeout_s=10, what="its first check, at once")
        assert entry.health.healthy


@pytest.mark.parametrize("args, words", [
    (["--nodes", "169.254.169.254:80"], "169.254.169.254 is not in the allowed backend networks"),
    (["--nodes", "2852039166:80"], "169.254.169.254 is not in the allowed backend networks"),
    (["--nodes", "http://[::ffff:169.254.169.254]:80"], "not in the allowed backend networks"),
    (["--nodes", "5001", "--port", "5001"], "this balancer's own address"),
    (["--nodes", "5001,5002", "--max-backends", "1"], "more than --max-backends 1"),
    (["--nodes", "5001", "--allow-backends", "10.0.0.1/8"], "did you mean 10.0.0.0/8"),
    (["--nodes", "5001", "--health-timeout", "2"], "longer than --health-interval"),
])
def test_refused_nodes_and_bad_flags_are_usage_errors(args: list[str], words: str) -> None:
    result = CliRunner().invoke(balancer_command, args)
    assert result.exit_code == 2 and words in result.output, result.output


# -- a restarted registry, a restarted balancer ------------------------------------------------------------------
async def get_work(session: aiohttp.ClientSession, server: Any) -> tuple[int, str | None]:
    async with session.get(server.make_url("/work")) as resp:
        body = await resp.json()
        return resp.status, resp.headers.get("X-Node-ID") or body.get("error", {}).get("code")


async def test_a_restarted_registry_s_partial_listing_keeps_the_members_for_its_ttl(aiohttp_server, clock,
                                                                                    caplog) -> None:
    """The balancer's clock is the test's: the refill window ends when the test moves it, not before."""
    caplog.set_level(logging.INFO, logger="testbed.balancer")
    async with registry_and_node(aiohttp_server, FakeRegistry("first", ttl_s=5.0)) as (registry, registry_url,
                                                                                          node_url):
        registry.members["real"] = node_url
        app = balancer_app(clock, registry=registry_url, refresh_s=0.02)
        server = await aiohttp_server(app)
        lb: Balancer = app[STATE]
        real = lb.state.backends["real"]
        async with aiohttp.ClientSession() as session:
            assert await get_work(session, server) == (200, "real")
            # The registry restarts: a new instance that has not heard from anybody yet.
            registry.instance, registry.members = "second", {}
            await registry.polled(5)
            assert lb.state.backends.get("real") is real and await get_work(session, server) == (200, "real")
            clock.advance(4.9)
            await registry.polled(3)
            assert lb.state.backends.get("real") is real  # within the new instance's TTL
            clock.advance(0.1)  # its TTL is over and the node never registered again: it goes

            async def gone() -> bool:
                return "real" not in lb.state.backends
            await until(gone, timeout_s=10, what="the unlisted member to leave after the refill window")
            assert await get_work(session, server) == (503, "no_healthy_backend")

            # Back, then deregistered from the same instance: it leaves at the next poll, no window.
            registry.members["real"] = node_url

            async def back() -> bool:
                entry = lb.state.backends.get("real")
                return entry is not None and entry.health.healthy
            await until(back, timeout_s=10, what="the member back")
            del registry.members["real"]
            # At once: the balancer's clock has not moved since the window ended, so no window is in play.
            await until(gone, timeout_s=10, what="the deregistered member to leave")
    kept = [r.getMessage() for r in caplog.records if "new instance" in r.getMessage()]
    assert kept == [f"registry {registry_url} is a new instance (second, was first): the 1 member(s) it does not "
                    "list yet are kept for 5 s (its TTL) while nodes register again"], kept


async def test_the_balancer_listens_once_it_knows_a_healthy_backend(aiohttp_server, caplog) -> None:
    """Registry members are held until their first check passes; the warm-up does the first poll and the
    first checks before the listening socket opens, so the first request is served."""
    caplog.set_level(logging.INFO, logger="testbed.balancer")
    async with registry_and_node(aiohttp_server) as (registry, registry_url, node_url):
        registry.members["real"] = node_url
        app = balancer_app(registry=registry_url, health_interval_s=60, refresh_s=60)
        server = await aiohttp_server(app)
        async with aiohttp.ClientSession() as session:
            assert await get_work(session, server) == (200, "real")
    assert registry.polls == 1
    assert [r.levelname for r in caplog.records if "warm" in r.getMessage()] == ["INFO"]


async def test_a_warm_up_past_its_timeout_listens_anyway_with_one_warning(aiohttp_server, caplog) -> None:
    caplog.set_level(logging.WARNING, logger="testbed.balancer")
    loop = asyncio.get_running_loop()
    async with BlackHole() as registry_url:  # a registry that accepts and never answers
        started = loop.time()
        app = balancer_app(registry=registry_url, warmup_timeout_s=0.3)
        server = await aiohttp_server(app)
        waited_s = loop.time() - started
        async with aiohttp.ClientSession() as session:
            assert await get_work(session, server) == (503, "no_healthy_backend")
    warnings = [r.getMessage() for r in caplog.records if "warm" in r.getMessage()]
    assert warnings == [f"not warm after 0.3 s (--warmup-timeout): no listing from the registry {registry_url} "
                        "(no answer yet); listening anyway"], warnings
    assert waited_s >= 0.3, waited_s  # it did wait (a lower bound only: never an upper one on a busy machine)

    caplog.clear()
    slow = await aiohttp_server(slow_health_app())  # its /health takes 5 s: the check outlasts the warm-up
    app = balancer_app(nodes=(str(slow.make_url("")).rstrip("/"),), warmup_timeout_s=0.3)
    await aiohttp_server(app)
    warnings = [r.getMessage() for r in caplog.records if "warm" in r.getMessage()]
    assert warnings == ["not warm after 0.3 s (--warmup-timeout): 1 of 1 backends not checked yet; listening "
                        "anyway"], warnings


def test_the_warmup_timeout_flag_reaches_a_real_balancer() -> None:
    """`testbed balancer --warmup-timeout` is the config's warm-up: with a registry that refuses connections the
    balancer still listens, and its log names the flag and the value it was given."""
    from tests.live.procs import Proc, free_port

    proc = Proc("balancer", "--port", "0", "--registry", f"http://127.0.0.1:{free_port()}",
                "--warmup-timeout", "0.4", timeout=30)
    try:
        assert any("not warm after 0.4 s (--warmup-timeout)" in line for line in proc.lines)
    finally:
        assert proc.stop() == 0


# -- issue 11 follow-up: a backend's endless response head, a registry that never answers, /health policy ---------
class OddHeads(socketserver.ThreadingTCPServer):
    """A raw backend in threads (a real balancer process talks to it while the test blocks): ``/health`` and
    ``/ok`` answer normally; ``/endless-headers``, ``/endless-value`` write until the peer hangs up;
    ``/fields/N`` answers with N header fields."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), OddHeadsHandler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def __enter__(self) -> OddHeads:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()
        self.server_close()


class OddHeadsHandler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        self.connection.settimeout(30)  # a client that stops reading without hanging up cannot hold us for ever
        try:
            while True:
                line = self.rfile.readline()
                if not line:
                    return
                while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                    pass
                path = line.split(b" ")[1]
                if path == b"/endless-headers":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                    for i in range(10 ** 9):
                        self.wfile.write(b"X-H%d: %s\r\n" % (i, b"a" * 1000))
                elif path == b"/endless-value":
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
                    while True:
                        self.wfile.write(b"a" * 65536)
                elif path.startswith(b"/fields/"):
                    n = int(path.rsplit(b"/", 1)[1])
                    self.wfile.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(n - 2))
                                     + b"Content-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
                else:
                    self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}")
        except OSError:  # the balancer hung up (as it should past the cap), or timed out
            return


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_a_backend_s_endless_response_head_is_a_502_and_the_balancer_s_memory_stays_bounded(procs) -> None:
    with OddHeads() as backend:
        lb = procs("balancer", "--port", "0", "--nodes", backend.url, "--max-response-header-bytes", "32KiB")
        wait_until(lambda: request(f"{lb.url}/ok")[0] == 200, 10, "the raw backend in rotation")
        before = rss_kib(lb.popen.pid)
        for path, words in [("/endless-headers", "response headers over 32768 bytes"),
                            ("/endless-value", "response headers over 32768 bytes"),
                            ("/fields/101", "response headers over 100 fields")]:
            started = time.monotonic()
            status, _, body = request(f"{lb.url}{path}", timeout=20)
            took_s = time.monotonic() - started
            assert status == 502 and body["error"]["code"] == "backend_error", (path, status, body)
            assert words in body["error"]["message"], body
            print(f"{path}: 502 in {took_s:.3f} s; balancer RSS {before / 1024:.1f} MiB before, "
                  f"{rss_kib(lb.popen.pid) / 1024:.1f} MiB after")
            assert request(f"{lb.url}/ok")[0] == 200  # the backend's next normal answer passes
        # 90 fields pass (http.client, reading the relayed answer, itself stops at 100 with the balancer's own)
        status, headers, _ = request(f"{lb.url}/fields/90")
        assert status == 200 and sum(1 for name in headers if name.startswith("X-H")) == 88


def test_a_balancer_whose_registry_never_answers_listens_after_its_warm_up_and_stops_on_sigterm() -> None:
    """The registry accepts connections (the kernel does, into the backlog) and never answers. With the
    warm-up as long as a registry poll's timeout (2 s), aiohttp turned the warm-up's own cancellation into
    an ordinary poll timeout, the warm-up polled for ever and the process never listened (nor exited)."""
    with socket.socket() as hang:
        hang.bind(("127.0.0.1", 0))
        hang.listen(64)
        registry = f"http://127.0.0.1:{hang.getsockname()[1]}"
        lb = Proc("balancer", "--port", "0", "--registry", registry, "--warmup-timeout", "2", timeout=2 + 15)
        try:
            assert request(f"{lb.url}/lb-stats")[0] == 200
            warnings = [line for line in lb.lines if "not warm after" in line]
            assert len(warnings) == 1 and f"no listing from the registry {registry}" in warnings[0], lb.output()
        finally:
            assert lb.stop() == 0, lb.output()

        # SIGTERM while it is still warming up (its first poll is waiting in the backlog): it stops there,
        # with 0, however long the warm-up may still take (an hour here), not once the warm-up is over.
        hang.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            while True:  # empty the backlog of the first balancer's polls
                hang.accept()[0].close()
        hang.settimeout(15)
        early = subprocess.Popen([TESTBED, "balancer", "--port", "0", "--registry", registry,
                                  "--warmup-timeout", "3600"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 text=True)
        try:
            hang.accept()[0].close()  # this balancer's first registry poll: it is in its warm-up
            early.send_signal(signal.SIGTERM)
            out, _ = early.communicate(timeout=15)
            assert early.returncode == 0 and "stopped before listening" in out, out
        finally:
            if early.poll() is None:
                early.kill()
                early.wait(5)


def claims_app(body: bytes, content_type: str = "application/json") -> web.Application:
    """A backend whose ``/health`` answers 200 with ``body``."""
    async def health(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=content_type)

    async def work(request: web.Request) -> web.Response:
        return web.json_response({"ok": True}, headers={"X-Node-ID": "claims"})
    app = web.Application()
    app.router.add_get("/health", health)
    app.router.add_get("/work", work)
    return app


@pytest.mark.parametrize("body, content_type, weight", [
    (b"ok", "text/plain", 1),                                   # not JSON: the 200 alone says healthy
    (b"", "text/plain", 1),
    (b"\xff\xfe", "application/octet-stream", 1),
    (b"[" * 30_000 + b"]" * 30_000, "application/json", 1),      # too deep for json: still healthy
    (b'{"workers": 1000000}', "application/json", 10_000),      # a claim past the cap is cut to it
    (b'{"workers": 10000}', "application/json", 10_000),
    (b'{"workers": 8}', "application/json", 8),
    (b'{"workers": "8"}', "application/json", 1),               # not an integer: no weight taken
    (b'{"workers": 2.5}', "application/json", 1),
    (b'{"workers": true}', "application/json", 1),
    (b'{"workers": 0}', "application/json", 1),
])
async def test_health_status_decides_and_the_claimed_weight_is_capped(aiohttp_server, body: bytes,
                                                                        content_type: str, weight: int) -> None:
    backend = await aiohttp_server(claims_app(body, content_type))
    app = balancer_app(nodes=(str(backend.make_url("")).rstrip("/"),), health_interval_s=60)
    server = await aiohttp_server(app)  # after the warm-up: the first check is done
    entry = next(iter(app[STATE].state.backends.values()))
    assert (entry.driver.last_check, entry.health.healthy, entry.weight) == ("200", True, weight)
    async with aiohttp.ClientSession() as session:
        assert await get_work(session, server) == (200, "claims")
