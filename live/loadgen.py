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

**Bounded, whatever the machine.** The generator sends for ``duration_s`` and
no longer (give or take ``SEND_GRACE_S``): arrivals it had not sent when its
time was up are recorded as *not sent* (``out_of_time``) rather than sent later, so a rate far above what this
machine can send ends on time instead of trickling out for minutes. It holds
at most ``max_in_flight`` requests outstanding (wrk2's connections, k6's
``maxVUs``); an arrival due while that many are outstanding is not sent
either (``max_in_flight``). Both count as failed requests of their own kind
(``errors_detail.not_sent``) and make the run say the generator fell behind.
After the duration it waits for the responses still outstanding at most
``drain_s``; what has not come back by then is recorded as a timeout. No
request is lost and no exception escapes as a traceback: every request's
exception is caught and counted, and the loop's exception handler counts
whatever else the loop reports (``loop_errors``).

**Did it keep up?** Lateness matters only as far as it moves the latencies
the run reports, so the verdict compares the response times measured from the
schedule (what the run reports) with the same responses measured from when
each request really left: if the generator's own delay moved the mean, p50 or
p99 by more than ``LAG_SHARE`` of it (and more than ``LAG_FLOOR_MS``), or it
sent fewer than ``1 - MAX_RATE_SHORTFALL`` of the scheduled requests, it fell
behind. A busy machine that sends 1% of the requests 6 ms late under
responses of 10-40 ms moves them by a fraction of a millisecond: a note, not
a failure.

Every request carries ``X-Client-ID`` (one of ``client-0`` .. ``client-N-1``,
drawn as in the simulator), which the balancer passes on and the nodes trust
from it, so per-client rate limiting works behind the balancer. The response
is read back as an outcome with :func:`core.results.outcome_of`; the node that
served it is its ``X-Node-ID`` (or the ``backend`` a balancer error names),
and its service time the node's own ``service_ms`` (in the body of an OK answer,
in the error object of a failed one: failed work kept a worker busy too). Rows go into a
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
from live.limits import DEFAULT_MAX_IN_FLIGHT
from live.upstream import ConnectFailed, UpstreamError, UpstreamPool

__all__ = ["LoadGenerator", "clock"]

NAN = float("nan")
#: The generator fell behind when its own delay moved the reported mean, p50 or p99 by more than this
#: fraction of it ...
LAG_SHARE = 0.10
#: ... and by more than this many milliseconds: about the round trip every live response carries anyway
#: (two HTTP hops on loopback; uvloop's timers have 1 ms resolution), so less is within the run's own noise.
LAG_FLOOR_MS = 2.0
#: ... or when it sent fewer requests than the schedule asked, by more than this fraction.
MAX_RATE_SHORTFALL = 0.02
#: A p99 send delay above this is worth a note even when it did not move the latencies.
NOTE_LAG_P99_MS = 5.0
#: Seconds past the duration the generator still sends arrivals that were due before it (a loop a moment
#: late at the end); arrivals still unsent then are "out of time".
SEND_GRACE_S = 0.5


class LoadGenerator:
    """Sends ``workload`` to ``url`` for ``duration_s``; read :attr:`log` and :meth:`generator_stats` after.

    ``max_in_flight`` bounds the outstanding requests, ``drain_s`` the wait for them after the duration
    (seconds; default ``timeout_s``: every request has its answer or its timeout by then); ``timeout_s``
    bounds each request."""

    def __init__(self, url: str, workload: Workload, *, seed: int, duration_s: float, node_ids: Sequence[str],
                 timeout_s: float = 35.0, path: str = "/work", max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
                 drain_s: float | None = None) -> None:
        if drain_s is None:
            drain_s = timeout_s
        if max_in_flight < 1:
            raise ValueError(f"max_in_flight must be at least 1, got {max_in_flight}")
        if drain_s < 0:
            raise ValueError(f"drain_s must be 0 or more, got {drain_s}")
        self.url = url
        self.workload = workload
        self.seed = seed
        self.duration_s = duration_s
        self.path = path
        self.max_in_flight = max_in_flight
        self.drain_s = drain_s
        self.pool = UpstreamPool(timeout_s=timeout_s, max_idle=4096)
        self.index = {node_id: i for i, node_id in enumerate(node_ids)}
        self.log = RequestLog()
        self.lag = array("d")   # seconds between a request's scheduled time and its sending, by row of the log
        self.unsent = {"max_in_flight": array("d"), "out_of_time": array("d")}  # arrival times, by reason
        self.sent = 0
        self.completed = 0
        self.peak_in_flight = 0
        self.cut = 0            # requests still outstanding when the drain ended (recorded as timeouts)
        self.loop_errors: dict[str, int] = {}
        self.capacity_per_s: float | None = None
        self.t0 = 0.0
        self._draining_over = False
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def in_flight(self) -> int:
        return self.sent - self.completed

    @property
    def not_sent(self) -> np.ndarray:
        """Arrival times of every request scheduled but never sent."""
        return np.concatenate([np.frombuffer(a, dtype=np.float64) if len(a) else np.empty(0)
                               for a in self.unsent.values()])

    async def run(self) -> None:
        """Send the workload for the duration, then wait for the responses at most ``drain_s``."""
        loop = asyncio.get_running_loop()
        previous = loop.get_exception_handler()
        loop.set_exception_handler(self._loop_error)
        self.t0 = clock()
        try:
            if self.workload.arrival == "closed":
                for loop_of_one_client in self._closed():
                    self._start(loop_of_one_client)
                await asyncio.sleep(max(0.0, self.t0 + self.duration_s - clock()))
            else:
                await self._open()
            await self._drain()
        finally:
            for task in self._tasks:
                task.cancel()
            self.pool.close()
            loop.set_exception_handler(previous)

    async def _drain(self) -> None:
        if not self._tasks:
            return
        left = self.t0 + self.duration_s + self.drain_s - clock()
        _, pending = await asyncio.wait(list(self._tasks), timeout=max(0.0, left))
        if pending:
            self._draining_over = True  # what is cancelled now is recorded as a timeout
            for task in pending:
                task.cancel()
            await asyncio.wait(pending)

    def _start(self, coro: Any) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._finished)
        self.peak_in_flight = max(self.peak_in_flight, len(self._tasks))

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:  # retrieved: never a "never retrieved" traceback
            self._count(task.exception())

    def _count(self, exc: BaseException | None) -> None:
        name = type(exc).__name__ if exc is not None else "error"
        self.loop_errors[name] = self.loop_errors.get(name, 0) + 1

    def _loop_error(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        self._count(context.get("exception"))  # counted and reported in the stats, never printed

    async def _open(self) -> None:
        rngs = streams(self.seed, 2)
        t, t0, end = 0.0, self.t0, self.duration_s
        arrivals = open_loop(self.workload, rngs[0], rngs[1])
        behind = 0
        for gap, client in arrivals:
            t += gap
            if t >= end:
                return
            delay = t0 + t - clock()
            if delay > 0:
                behind = 0
                await asyncio.sleep(delay)
            elif clock() - t0 >= end + SEND_GRACE_S:
                break  # time is up with arrivals still due: not sent
            else:
                behind += 1
                if behind % 64 == 0:
                    await asyncio.sleep(0)  # running late: catch up, but let responses in now and then
            if len(self._tasks) >= self.max_in_flight:
                self.unsent["max_in_flight"].append(t)
                continue
            self._start(self._one(t, client))
        late = self.unsent["out_of_time"]
        late.append(t)
        for gap, _ in arrivals:
            t += gap
            if t >= end:
                return
            late.append(t)

    def _closed(self) -> list[Any]:
        think = think_times(self.workload, streams(self.seed, 1)[0])
        return [self._client(client, think) for client in client_ids(self.workload)]

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
            # Still outstanding when the drain ended: the client gave up waiting. Otherwise the run was stopped.
            outcome = Outcome.TIMEOUT if self._draining_over else Outcome.CONNECT_ERROR
            self.cut += self._draining_over
            raise
        except Exception as exc:  # anything else the transport throws: counted, recorded, never a traceback
            self._count(exc)
        finally:
            if end != end:  # NaN: no response
                end = clock() - self.t0
            self.completed += 1
            self.lag.append(max(0.0, sent - arrival))
            self.log.record(arrival, node, start, end, outcome)

    def _read(self, status: int, headers: list[tuple[str, str]], body: bytes, end: float) -> tuple[int, float, Outcome]:
        node_id = next((v for k, v in headers if k.lower() == "x-node-id"), None)
        try:
            data = json.loads(body) if body else {}
        except ValueError:
            data = {}
        if not isinstance(data, dict):
            data = {}
        error = data.get("error")
        if not isinstance(error, dict):
            error = {}
        outcome = outcome_of(status, error.get("code"))
        node_id = node_id or error.get("backend")
        node = self.index.get(node_id, -1) if node_id else -1
        start = NAN
        # A node's service time: in the body of an OK answer, in the error object of failed work
        # (``work_failed``); refusals and the balancer's own errors did no work and carry none.
        service_ms = data.get("service_ms") if outcome is Outcome.OK else error.get("service_ms")
        if isinstance(service_ms, (int, float)) and math.isfinite(service_ms):
            start = end - service_ms / 1000.0
        return node, start, outcome

    async def probe_capacity(self, seconds: float = 0.5, concurrency: int = 32) -> float:
        """Requests per second this machine carries through the balancer right now: ``concurrency``
        loops of ``GET /health`` (no work on the nodes) for ``seconds``, before the load starts.
        An open-loop rate well above it cannot be offered; the run says so before it starts."""
        done = 0
        started = clock()
        end = started + seconds

        async def loop() -> None:
            nonlocal done
            while clock() < end:
                try:
                    await self.pool.request(self.url, "GET", "/health", [("X-Client-ID", "testbed-capacity-probe")],
                                            b"")
                except (UpstreamError, asyncio.TimeoutError, OSError):
                    return
                done += 1

        await asyncio.gather(*(loop() for _ in range(concurrency)))
        self.capacity_per_s = done / max(clock() - started, 1e-9)
        return self.capacity_per_s

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
        """How well the generator offered the load: asked vs scheduled vs sent rate, its send delay, how much
        of that delay is in the reported latencies, what it did not send, and its verdict (see the module
        docstring)."""
        w = self.workload
        c = self.log.columns()
        lag = np.frombuffer(self.lag, dtype=np.float64) if len(self.lag) else np.empty(0)
        window_s = self.duration_s - warmup_s
        in_window = (c["arrival"] >= warmup_s) & (c["arrival"] < self.duration_s)
        not_sent = {why: int(((a >= warmup_s) & (a < self.duration_s)).sum())
                    for why, a in ((k, np.frombuffer(v, dtype=np.float64) if len(v) else np.empty(0))
                                   for k, v in self.unsent.items())}
        sent = int(in_window.sum())
        scheduled = sent + sum(not_sent.values())
        lag_ms = lag * 1000.0 if lag.size else np.zeros(1)
        stats: dict[str, Any] = {
            "asked_rate_per_s": None if w.arrival == "closed" else w.rate_per_s,
            "scheduled_rate_per_s": scheduled / window_s,
            "sent_rate_per_s": sent / window_s,
            "lag_ms": {"p50": float(np.percentile(lag_ms, 50)), "p99": float(np.percentile(lag_ms, 99)),
                       "max": float(lag_ms.max())},
            "lag_in_latency_ms": self._lag_in_latency(c, lag, in_window),
            "clients": w.clients,
            "max_in_flight": self.max_in_flight,
            "peak_in_flight": self.peak_in_flight,
            "not_sent": not_sent,
            "drain_s": self.drain_s,
            "cut_at_drain": self.cut,
            "loop_errors": dict(self.loop_errors),
            "capacity_per_s": self.capacity_per_s,
        }
        problems, notes = [], []
        for key, moved in stats["lag_in_latency_ms"]["moved"].items():
            if moved is not None and moved > max(LAG_FLOOR_MS, LAG_SHARE * stats["lag_in_latency_ms"]["reported"][key]):
                problems.append(f"its own delay moved the {key} latency by {moved:.1f} ms of "
                                f"{stats['lag_in_latency_ms']['reported'][key]:.1f} (limit {LAG_SHARE:.0%}, "
                                f"at least {LAG_FLOOR_MS:g} ms); 1% of requests went out more than "
                                f"{stats['lag_ms']['p99']:.1f} ms late")
                break
        if not_sent["max_in_flight"]:
            problems.append(f"it did not send {not_sent['max_in_flight']} requests because {self.max_in_flight} "
                            "were outstanding (--max-in-flight)")
        late = (f" ({not_sent['out_of_time']} not sent when its time was up)" if not_sent["out_of_time"] else "")
        if w.arrival != "closed" and sent < (1 - MAX_RATE_SHORTFALL) * scheduled:
            problems.append(f"it sent {stats['sent_rate_per_s']:.1f} requests/s of the "
                            f"{stats['scheduled_rate_per_s']:.1f}/s scheduled{late}")
        elif late:
            notes.append(f"it sent {sent} of the {scheduled} requests scheduled{late}")
        if problems and self.capacity_per_s is not None and w.arrival != "closed":
            problems.append(f"this machine carried {self.capacity_per_s:,.0f} requests/s through the balancer "
                            "just before the run")
        if not problems and stats["lag_ms"]["p99"] > NOTE_LAG_P99_MS:
            notes.append(f"1% of the requests went out more than {stats['lag_ms']['p99']:.1f} ms late (a busy "
                         "machine); that moved the reported latencies by at most "
                         f"{max(v or 0.0 for v in stats['lag_in_latency_ms']['moved'].values()):.2f} ms")
        if self.cut:
            notes.append(f"{self.cut} requests still outstanding {self.drain_s:g} s after the end were recorded "
                         "as timeouts (--drain)")
        if self.loop_errors:
            notes.append("unexpected errors, counted and recorded as server errors: "
                         + ", ".join(f"{k} {v}" for k, v in self.loop_errors.items()))
        stats["kept_up"] = not problems
        stats["problems"] = problems
        stats["notes"] = notes
        return stats

    @staticmethod
    def _lag_in_latency(c: dict[str, np.ndarray], lag: np.ndarray, in_window: np.ndarray) -> dict[str, Any]:
        """The reported response times (from the schedule) against the same responses timed from when each
        request left: how much of the mean, p50 and p99 is the generator's own delay (ms)."""
        keys = ("mean", "p50", "p99")
        rows = in_window & (c["outcome"] == Outcome.OK)
        if not rows.any():
            rows = in_window
        if not rows.any():
            return {"reported": dict.fromkeys(keys), "moved": dict.fromkeys(keys)}
        reported = (c["end"] - c["arrival"])[rows] * 1000.0
        from_send = reported - lag[rows] * 1000.0

        def figures(ms: np.ndarray) -> dict[str, float]:
            p50, p99 = np.percentile(ms, [50, 99])
            return {"mean": float(ms.mean()), "p50": float(p50), "p99": float(p99)}

        r, f = figures(reported), figures(from_send)
        return {"reported": r, "moved": {k: r[k] - f[k] for k in keys}}
