"""Fault tests under load: a real cluster (a registry, nodes, a balancer following the registry) and an
open-loop client through the balancer, with every request stamped on the clock the faults are stamped on.

Theory of operation
-------------------
A fault test starts the processes with the console command (:class:`tests.live.procs.Proc`: port 0, the
"listening on" line, stopped by PID), runs :class:`OpenLoopLoad` through the balancer, injects a fault
(a signal to one process, a restart on the same port) and judges afterwards, request by request, from
its :class:`Outcome`: when it was sent, when it ended, which backend served it (``X-Backend``, or the
``backend`` field of the balancer's JSON error), and whether it failed.

One clock. The load and the test share one event loop; send times, end times and fault times are all
``loop.time()`` (monotonic seconds). So "sent after the kill" and "in flight when it died" are
comparisons of numbers, not guesses. A request's *send* time is when the client handed it to aiohttp:
the balancer routes it a little later, never earlier, which makes "sent after T and routed to X" a
conservative witness of "routed to X after T".

Open loop. Request ``i`` is sent at ``start + i / rate_per_s`` whatever earlier requests are doing (a
hung backend must not slow the arrivals down, or the test would measure less than it claims), on a
connector without a connection limit. The load is bounded three ways: by ``max_duration_s`` (so by
``rate * max_duration_s`` requests), by each request's ``request_timeout_s``, and by :meth:`stop`, which the
test calls once it has seen the states it waits for. A load's duration is never used to wait for a
state: tests poll for states (:func:`tests.live.polling.until`), with :func:`throttled` checks so that
polling ``/lb-stats`` does not become load of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import json
import signal
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Sequence

import aiohttp

from tests.live.procs import Proc

__all__ = ["Cluster", "OpenLoopLoad", "Outcome", "get_json", "start_all", "stopped", "throttled"]


@dataclass(frozen=True)
class Outcome:
    """One request of the load. Times are ``loop.time()`` seconds."""

    sent_at: float
    done_at: float
    status: int | None   # None: no HTTP response at all
    backend: str | None  # X-Backend, or the balancer's error body's "backend"
    error: str | None    # None when 200; else the JSON error code, or "refused", "disconnected", "timeout", ...

    @property
    def ok(self) -> bool:
        """A 200. Anything else (a 5xx, a connection error, a timeout) is a request the client lost."""
        return self.status == 200

    def in_flight_at(self, t0: float, t1: float) -> bool:
        """Sent before ``t1`` and not over before ``t0``: possibly in flight at an instant in ``[t0, t1]``."""
        return self.sent_at <= t1 and self.done_at >= t0


class OpenLoopLoad:
    """``GET url`` at ``rate_per_s``, open loop, until :meth:`stop` or ``max_duration_s``; see the module
    docstring. :meth:`run` returns once every request sent has ended (each within ``request_timeout_s``)."""

    def __init__(self, url: str, *, rate_per_s: float, max_duration_s: float, request_timeout_s: float) -> None:
        self.url = url
        self.rate_per_s = rate_per_s
        self.max_duration_s = max_duration_s
        self.request_timeout_s = request_timeout_s
        self.outcomes: list[Outcome] = []
        self._stop = asyncio.Event()

    def stop(self) -> None:
        """Send nothing more; :meth:`run` still waits for what is out."""
        self._stop.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = aiohttp.ClientTimeout(total=self.request_timeout_s)
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout) as session:
            tasks: list[asyncio.Task[None]] = []
            start = loop.time()
            for i in range(int(self.rate_per_s * self.max_duration_s)):
                due = start + i / self.rate_per_s
                if due > loop.time():
                    try:  # the schedule's gap, cut short by stop(): not a wait for a state
                        await asyncio.wait_for(self._stop.wait(), due - loop.time())
                    except asyncio.TimeoutError:
                        pass
                if self._stop.is_set():
                    break
                tasks.append(asyncio.create_task(self._one(session, loop)))
            try:
                await asyncio.gather(*tasks)
            finally:
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _one(self, session: aiohttp.ClientSession, loop: asyncio.AbstractEventLoop) -> None:
        sent = loop.time()
        status: int | None = None
        backend: str | None = None
        error: str | None = None
        try:
            async with session.get(self.url) as resp:
                body = await resp.read()
                status, backend = resp.status, resp.headers.get("X-Backend")
                if status != 200:
                    error, from_body = _error_of(body)
                    backend = backend or from_body
        except aiohttp.ClientConnectorError as exc:
            error = "refused" if exc.os_error.errno == errno.ECONNREFUSED else f"connect: {exc.os_error}"
        except aiohttp.ServerDisconnectedError:
            error = "disconnected"
        except aiohttp.ClientOSError as exc:
            error = "reset" if exc.errno == errno.ECONNRESET else f"{type(exc).__name__}: {exc}"
        except asyncio.TimeoutError:
            error = "timeout"
        except aiohttp.ClientError as exc:
            error = f"{type(exc).__name__}: {exc}"
        self.outcomes.append(Outcome(sent, loop.time(), status, backend, error))

    # -- what the test reads while the load runs or after --------------------------
    def answered_by(self, backend: str, *, sent_after: float = float("-inf")) -> int:
        """200s from ``backend`` among requests sent after ``sent_after``."""
        return sum(1 for o in self.outcomes if o.ok and o.backend == backend and o.sent_at > sent_after)

    def done_after(self, t: float) -> int:
        """Requests sent after ``t`` that have ended (any way)."""
        return sum(1 for o in self.outcomes if o.sent_at > t)

    def failures(self) -> list[Outcome]:
        return [o for o in self.outcomes if not o.ok]


def _error_of(body: bytes) -> tuple[str, str | None]:
    """(code, backend) of the one JSON error shape; a body of another shape is itself the finding."""
    try:
        err = json.loads(body)["error"]
        return str(err["code"]), err.get("backend")
    except (ValueError, KeyError, TypeError):
        return f"not the JSON error shape: {body[:80]!r}", None


async def get_json(session: aiohttp.ClientSession, url: str) -> Any:
    """``GET url`` -> its JSON (raises on a non-200 or a connection error)."""
    async with session.get(url, timeout=aiohttp.ClientTimeout(total=5.0)) as resp:
        resp.raise_for_status()
        return await resp.json()


def throttled(check: Callable[[], Awaitable[bool]], every_s: float) -> Callable[[], Awaitable[bool]]:
    """``check`` asked at most once per ``every_s`` (False in between): :func:`until` polls every 10 ms,
    which against ``/lb-stats`` (percentiles over up to 10,000 latencies per backend) would be load."""
    last = [float("-inf")]

    async def gated() -> bool:
        now = asyncio.get_running_loop().time()
        if now - last[0] < every_s:
            return False
        last[0] = now
        return await check()
    return gated


def start_all(arg_lists: Sequence[Sequence[str]]) -> list[Proc]:
    """Start processes side by side (each waits for its "listening on" line); if any fails to start,
    stop the others and raise."""
    with concurrent.futures.ThreadPoolExecutor(len(arg_lists)) as pool:
        futures = [pool.submit(Proc, *args) for args in arg_lists]
    started = [f.result() for f in futures if f.exception() is None]
    failed = [f.exception() for f in futures if f.exception() is not None]
    if failed:
        for p in started:
            p.stop()
        raise failed[0]
    return started


class Cluster:
    """A registry, ``len(node_ids)`` nodes registered with it, and a balancer following it, all with the
    default flags but for ``node_args`` and ``balancer_args`` (and the balancer's ``--trust-clients
    127.0.0.1/32``, as the runner starts it). :meth:`stop` stops every process started
    (the stopped one gets SIGCONT first), by PID; processes started again by the test go in ``procs``."""

    def __init__(self, node_ids: Sequence[str] = ("node-1", "node-2", "node-3"), *,
                 node_args: Sequence[str] = (), balancer_args: Sequence[str] = ()) -> None:
        self.procs: list[Proc] = []
        # The load generator is the balancer's one trusted client, as in ``testbed live run``
        # (live/cluster.py balancer_args): its X-Client-IDs reach the nodes.
        self.balancer_args = ("balancer", "--registry", "{registry}", "--trust-clients", "127.0.0.1/32",
                              *balancer_args)
        try:
            self.registry = self.start("registry", "--port", "0")
            self.nodes = dict(zip(node_ids, start_all([
                ("node", "--port", "0", "--id", node_id, "--registry", self.registry.url, *node_args)
                for node_id in node_ids])))
            self.procs += self.nodes.values()
            self.balancer = self.start(*self.balancer_command(port=0))
        except BaseException:
            self.stop()
            raise

    def balancer_command(self, *, port: int) -> list[str]:
        return [a.replace("{registry}", self.registry.url) for a in self.balancer_args] + ["--port", str(port)]

    def start(self, *args: str) -> Proc:
        proc = Proc(*args)
        self.procs.append(proc)
        return proc

    async def start_async(self, *args: str) -> Proc:
        """:meth:`start` off the event loop, so the load keeps its schedule meanwhile."""
        proc = await asyncio.to_thread(Proc, *args)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.send(signal.SIGCONT)
            proc.stop()


async def stopped(proc: Proc, sig: int) -> int:
    """Send ``sig`` to ``proc`` by PID and wait (off the loop) for it to exit."""
    proc.send(sig)
    return await asyncio.to_thread(proc.popen.wait, 15)
