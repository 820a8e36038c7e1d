"""The live load generator: a scenario's workload sent to the balancer, one record per request.

Theory of operation
-------------------
**Open loop** (``poisson``, ``constant``): arrival times come from
:func:`core.workload.open_loop`, the very sequence the simulator uses for the
same seed, and each request is sent at its time whatever happened to the
earlier ones: a slow system cannot slow down the offered load. A request's
response time is measured from its *scheduled* time, so when the generator
itself runs late, that delay is counted against the system rather than
silently dropped (the "coordinated omission" wrk2 corrects for). How late the
generator sent each request is kept too: if it fell behind, the run says so
(:meth:`LoadGenerator.generator_stats`) instead of passing its own delay off as
the system's latency.

**Closed loop** (``closed``): ``clients`` tasks, each sending one request,
waiting for the response, thinking for an exponential time, and so on.

Every request carries ``X-Client-ID`` (one of ``client-0`` .. ``client-N-1``,
drawn as in the simulator), which the balancer passes on and the nodes trust
from it, so per-client rate limiting works behind the balancer. The response
is read back as an outcome with :func:`core.results.outcome_of`; the node that
served it is its ``X-Node-ID`` (or the ``backend`` a balancer error names),
and its service time the node's own ``service_ms``. Rows go into a
:class:`core.results.RequestLog`, exactly like the simulator's.

Times come from ``time.perf_counter``, not the event loop's clock: uvloop's
``loop.time()`` is libuv's cached loop time in whole milliseconds, too coarse
for response times of a few milliseconds.
"""

from __future__ import annotations

import asyncio
import json
import math
from array import array
from time import perf_counter as clock
from typing import Any, Sequence

import numpy as np

from core.results import Outcome, RequestLog, outcome_of
from core.scenario import Workload
from core.workload import client_ids, open_loop, streams, think_times
from live.upstream import ConnectFailed, UpstreamError, UpstreamPool

__all__ = ["LoadGenerator", "clock"]

NAN = float("nan")
#: The generator is behind when the 99th percentile of its send delay is past this.
MAX_LAG_P99_MS = 5.0
#: ... or when it sent fewer requests per second than the schedule asked, by more than this fraction.
MAX_RATE_SHORTFALL = 0.02


class LoadGenerator:
    """Sends ``workload`` to ``url`` for ``duration_s``; read :attr:`log` and :meth:`generator_stats` after."""

    def __init__(self, url: str, workload: Workload, *, seed: int, duration_s: float, node_ids: Sequence[str],
                 timeout_s: float = 35.0, path: str = "/work") -> None:
        self.url = url
        self.workload = workload
        self.seed = seed
        self.duration_s = duration_s
        self.path = path
        self.pool = UpstreamPool(timeout_s=timeout_s, max_idle=4096)
        self.index = {node_id: i for i, node_id in enumerate(node_ids)}
        self.log = RequestLog()
        self.lag = array("d")   # seconds between a request's scheduled time and its sending, by request
        self.sent_at = array("d")
        self.sent = 0
        self.completed = 0
        self.t0 = 0.0
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed

    async def run(self) -> None:
        """Send the whole workload, then wait for every response (each bounded by the timeout)."""
        self.t0 = clock()
        try:
            if self.workload.arrival == "closed":
                await self._closed()
            else:
                await self._open()
            if self._tasks:
                await asyncio.wait(list(self._tasks))
        finally:
            for task in self._tasks:
                task.cancel()
            self.pool.close()

    async def _open(self) -> None:
        rngs = streams(self.seed, 2)
        t, t0, end = 0.0, self.t0, self.duration_s
        behind = 0
        for gap, client in open_loop(self.workload, rngs[0], rngs[1]):
            t += gap
            if t >= end:
                break
            delay = t0 + t - clock()
            if delay > 0:
                behind = 0
                await asyncio.sleep(delay)
            else:
                behind += 1
                if behind % 64 == 0:
                    await asyncio.sleep(0)  # running late: catch up, but let responses in now and then
            task = asyncio.create_task(self._one(t, client))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _closed(self) -> None:
        think = think_times(self.workload, streams(self.seed, 1)[0])
        await asyncio.gather(*(self._client(client, think) for client in client_ids(self.workload)))

    async def _client(self, client: str, think: Any) -> None:
        t0, end = self.t0, self.duration_s
        t = 0.0
        while True:
            t += next(think)
            if t >= end:
                return
            delay = t0 + t - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await self._one(t, client)
            t = clock() - t0  # thinking starts when the response is in

    async def _one(self, arrival: float, client: str) -> None:
        """One request, recorded exactly once however it ends."""
        sent = clock() - self.t0
        self.sent += 1
        self.lag.append(max(0.0, sent - arrival))
        self.sent_at.append(sent)
        node, start, outcome, end = -1, NAN, Outcome.SERVER_ERROR, NAN
        try:
            status, headers, body = await self.pool.request(self.url, "GET", self.path,
                                                            [("X-Client-ID", client)], b"")
            end = clock() - self.t0
            node, start, outcome = self._read(status, headers, body, end)
        except ConnectFailed:
            outcome = Outcome.CONNECT_ERROR
        except asyncio.TimeoutError:
            outcome = Outcome.TIMEOUT
        except (UpstreamError, OSError):
            pass  # the connection broke mid-exchange: a server error, as the simulator counts a crash
        except asyncio.CancelledError:
            outcome = Outcome.CONNECT_ERROR  # the run was stopped with this request in flight
            raise
        finally:
            if end != end:  # NaN: no response
                end = clock() - self.t0
            self.completed += 1
            self.log.record(arrival, node, start, end, outcome)

    def _read(self, status: int, headers: list[tuple[str, str]], body: bytes, end: float) -> tuple[int, float, Outcome]:
        node_id = next((v for k, v in headers if k.lower() == "x-node-id"), None)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        error = data.get("error") if isinstance(data.get("error"), dict) else {}
        outcome = outcome_of(status, error.get("code"))
        node_id = node_id or error.get("backend")
        node = self.index.get(node_id, -1) if node_id else -1
        start = NAN
        service_ms = data.get("service_ms") if outcome is Outcome.OK else None
        if isinstance(service_ms, (int, float)) and math.isfinite(service_ms):
            start = end - service_ms / 1000.0
        return node, start, outcome

    async def probe_overhead(self, n: int = 40, gap_s: float = 0.01) -> dict[str, Any]:
        """Round trips of ``GET /health`` through the balancer, one at a time, before the load starts:
        what every live response time carries on top of queueing and service (two HTTP hops and the
        processes waking up), which the simulator does not model."""
        times = []
        for _ in range(n):
            started = clock()
            try:
                await self.pool.request(self.url, "GET", "/health", [("X-Client-ID", "testbed-overhead-probe")], b"")
            except (UpstreamError, asyncio.TimeoutError):
                continue
            times.append((clock() - started) * 1000.0)
            await asyncio.sleep(gap_s)
        if not times:
            return {"p50": None, "mean": None, "samples": 0}
        return {"p50": float(np.percentile(times, 50)), "mean": float(np.mean(times)), "samples": len(times)}

    def generator_stats(self, warmup_s: float) -> dict[str, Any]:
        """How well the generator offered the load: asked vs scheduled vs sent rate, and its send delay."""
        w = self.workload
        lag_ms = np.frombuffer(self.lag, dtype=np.float64) * 1000.0 if len(self.lag) else np.zeros(1)
        sent_at = np.frombuffer(self.sent_at, dtype=np.float64) if len(self.sent_at) else np.zeros(0)
        window = self.duration_s - warmup_s
        arrivals = self.log.columns()["arrival"]
        scheduled = int(((arrivals >= warmup_s) & (arrivals < self.duration_s)).sum())
        sent = int(((sent_at >= warmup_s) & (sent_at < self.duration_s)).sum())
        stats: dict[str, Any] = {
            "asked_rate_per_s": None if w.arrival == "closed" else w.rate_per_s,
            "scheduled_rate_per_s": scheduled / window,
            "sent_rate_per_s": sent / window,
            "lag_ms": {"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99)),
                       "max": float(lag_ms.max())},
            "clients": w.clients,
        }
        problems = []
        if stats["lag_ms"]["p99"] > MAX_LAG_P99_MS:
            problems.append(f"it sent 1% of the requests more than {stats['lag_ms']['p99']:.1f} ms late "
                            f"(limit {MAX_LAG_P99_MS:g} ms)")
        if w.arrival != "closed" and sent < (1 - MAX_RATE_SHORTFALL) * scheduled:
            problems.append(f"it sent {stats['sent_rate_per_s']:.1f} requests/s of the "
                            f"{stats['scheduled_rate_per_s']:.1f}/s scheduled")
        stats["kept_up"] = not problems
        stats["problems"] = problems
        return stats
