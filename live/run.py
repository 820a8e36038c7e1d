"""``testbed live run``: one scenario on real processes, summarized like a simulated run.

Theory of operation
-------------------
:func:`run_live` starts the scenario's :class:`live.cluster.Cluster`, sends
its workload with a :class:`live.loadgen.LoadGenerator` and plays its faults
on schedule, from the same time origin as the workload:

* ``error_rate`` / ``extra_latency_ms``: ``POST /admin/faults`` on the node at
  ``start_s``, ``DELETE`` at ``end_s`` (the simulator's fault, set and cleared),
  with the cluster's random admin token (:attr:`live.cluster.Cluster.admin_token`);
* ``down``: SIGKILL at ``start_s`` (what the node held fails), the same node
  command on the same port at ``end_s``; it registers again and the balancer
  takes it back.

The records become the results JSON of :func:`core.results.summarize` with
``"mode": "live"``, plus how well the generator offered the load
(``"generator"``), what happened to the faults (``"faults"``), and the
round-trip time of ``/health`` through the balancer measured just before the
load starts (``"overhead_ms"``): the part of a live response time that is
neither queueing nor service, which the simulator does not model. With
``keep_requests`` every request's row is written too, as ``testbed sim run
--keep-requests`` writes them (an ``.npz`` of :data:`core.results.COLUMNS`). However the
run ends (done, Ctrl-C, SIGTERM, a process dying, an error) the cluster is
stopped before this returns or raises.

With ``dashboard`` the runner prints the balancer's dashboard URL
(``GET /dashboard``, :mod:`live.dashboard`) once the cluster is up, before the
load starts; the balancer serves it for as long as the run lasts.

Before a load of ``PROBE_FROM_PER_S`` or more starts, the runner also measures
how many requests per second this machine carries through the balancer right
now (``GET /health`` from 32 loops for half a second); a rate above that is
named in a warning before the run, which then ends on time anyway (the generator sends for the
duration only, holds at most ``max_in_flight`` requests, and waits at most
``drain_s`` for the last responses; see :mod:`live.loadgen`).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from typing import Any, Callable, Sequence

import numpy as np

from core.results import RequestLog, scenario_results
from core.scenario import Fault, Scenario
from live.cluster import ChildFailed, Cluster
from live.limits import DEFAULT_MAX_IN_FLIGHT, default_drain_s
from live.server_limits import raise_open_file_limit
from live.loadgen import LoadGenerator, clock
from live.upstream import UpstreamError, UpstreamPool

__all__ = ["LiveRunError", "Progress", "run_live", "write_requests"]

#: Open-loop rates from which the runner measures what this machine carries before the load. Below it (the
#: machine carried 1,100-4,000 requests/s when measured, busy or not) the probe is skipped: it leaves the
#: balancer with a pool of warm connections to every node, which changes what a node crash fails.
PROBE_FROM_PER_S = 500.0

#: progress(elapsed_s, sent, completed, in_flight) while the run goes on.
Progress = Callable[[float, int, int, int], Any]


class LiveRunError(RuntimeError):
    """The run could not be carried out (a process failed to start or died); the message says which."""


async def _fault(cluster: Cluster, node_id: str, fault: Fault, t0: float, log: list[dict[str, Any]]) -> None:
    pool = UpstreamPool(timeout_s=5.0)
    headers = [("Content-Type", "application/json"), ("Authorization", f"Bearer {cluster.admin_token}")]

    async def admin(method: str, body: bytes) -> str:
        try:
            status, _, text = await pool.request(cluster.nodes[node_id].url, method, "/admin/faults", headers, body)
            return "ok" if status == 200 else f"answered {status}: {text[:200].decode(errors='replace')}"
        except (UpstreamError, asyncio.TimeoutError) as exc:
            return f"failed: {exc or type(exc).__name__}"

    def note(action: str, result: str) -> None:
        log.append({"node": node_id, "at_s": round(clock() - t0, 3), "action": action, "result": result})

    try:
        await asyncio.sleep(max(0.0, t0 + fault.start_s - clock()))
        if fault.down:
            await cluster.crash(node_id)
            note("crash (SIGKILL)", "ok")
        else:
            body = json.dumps({"error_rate": fault.error_rate, "extra_latency_ms": fault.extra_latency_ms}).encode()
            note(f"faults on: error_rate={fault.error_rate:g} extra_latency_ms={fault.extra_latency_ms:g}",
                 await admin("POST", body))
        await asyncio.sleep(max(0.0, t0 + fault.end_s - clock()))
        if fault.down:
            note("restart", "ok" if await cluster.restart(node_id) else "failed")
        else:
            note("faults off", await admin("DELETE", b""))
    finally:
        pool.close()


async def _ticker(gen: LoadGenerator, progress: Progress) -> None:
    while True:
        await asyncio.sleep(0.25)
        if gen.t0:
            progress(clock() - gen.t0, gen.sent, gen.completed, gen.in_flight)


async def live_run(scenario: Scenario, *, command: Sequence[str], impl: str = "auto",
                   echo: Callable[[str], Any] = print, progress: Progress | None = None,
                   max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, drain_s: float | None = None,
                   keep_requests: str | os.PathLike[str] | None = None, dashboard: bool = False) -> dict[str, Any]:
    """Run ``scenario`` live (see the module docstring) and return its results dict. ``command`` starts a
    ``testbed`` process (see :class:`live.cluster.Cluster`); ``max_in_flight`` bounds the requests
    outstanding, ``drain_s`` the wait for them after the duration (None: the balancer's timeout and a margin,
    :func:`live.limits.default_drain_s`, as long as the simulator waits); ``keep_requests`` is a path to
    write every request's row to; ``dashboard``: print the dashboard's URL once the cluster is up."""
    s = scenario
    if drain_s is None:
        drain_s = default_drain_s(s.balancer.timeout_s)
    try:
        async with Cluster(s, command=command, impl=impl, echo=echo) as cluster:
            assert cluster.balancer is not None
            if dashboard:
                echo(f"dashboard: {cluster.balancer.url}/dashboard (up while the run lasts)")
            gen = LoadGenerator(cluster.balancer.url, s.workload, seed=s.seed, duration_s=s.duration_s,
                                node_ids=[n.id for n in s.nodes], timeout_s=s.balancer.timeout_s + 5.0,
                                max_in_flight=max_in_flight, drain_s=drain_s)
            fault_log: list[dict[str, Any]] = []
            overhead = await gen.probe_overhead()
            if s.workload.arrival != "closed" and s.workload.rate_per_s >= PROBE_FROM_PER_S:
                capacity = await gen.probe_capacity()
                if s.workload.rate_per_s > capacity:
                    echo(f"WARNING: asked {s.workload.rate_per_s:,.0f} requests/s, but this machine carries about "
                         f"{capacity:,.0f}/s through the balancer right now (measured just now): the generator "
                         f"cannot offer that; the run ends on time ({s.duration_s:g} s, then at most {drain_s:g} s "
                         "for the last responses) and counts what it could not send")
            echo(f"sending {_describe(s)} to the balancer for {s.duration_s:g} s")
            run = asyncio.create_task(gen.run())
            await asyncio.sleep(0)  # let the generator fix its time origin first
            t0 = gen.t0 or clock()
            helpers = [asyncio.create_task(_fault(cluster, spec.id, f, t0, fault_log))
                       for spec in s.nodes for f in spec.faults]
            if progress is not None:
                helpers.append(asyncio.create_task(_ticker(gen, progress)))
            died = asyncio.create_task(cluster.failed.wait())
            try:
                await asyncio.wait([run, died], return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in (*helpers, died):
                    task.cancel()
                await asyncio.gather(*helpers, died, return_exceptions=True)
            if not run.done():
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
                raise LiveRunError(cluster.failure)
            run.result()
            stats = gen.generator_stats(s.warmup_s)
    except ChildFailed as exc:
        raise LiveRunError(str(exc)) from None
    if keep_requests is not None:
        write_requests(keep_requests, gen.log)
    return scenario_results(gen.log, s, mode="live", not_sent=gen.not_sent, live_requests=len(gen.log),
                            generator=stats, overhead_ms=overhead, faults=fault_log)


def write_requests(path: str | os.PathLike[str], log: RequestLog) -> None:
    """Every row ``log`` holds to ``path``, as ``numpy.savez`` writes them (no ``.npz`` added to the name)."""
    columns: dict[str, Any] = log.columns()  # Any: savez's own allow_pickle keyword is a bool
    try:
        with open(path, "wb") as fh:
            np.savez(fh, **columns)
    except OSError as exc:
        raise LiveRunError(f"{path}: cannot write the requests there ({exc.strerror or exc})") from None


def _describe(s: Scenario) -> str:
    w = s.workload
    if w.arrival == "closed":
        return f"a closed loop of {w.clients} clients (think {w.think_time_ms:g} ms)"
    return f"{w.arrival} arrivals at {w.rate_per_s:g}/s from {w.clients} client{'s' * (w.clients != 1)}"


def run_live(scenario: Scenario, *, command: Sequence[str], impl: str = "auto",
             echo: Callable[[str], Any] = print, progress: Progress | None = None,
             max_in_flight: int = DEFAULT_MAX_IN_FLIGHT, drain_s: float | None = None,
             keep_requests: str | os.PathLike[str] | None = None, dashboard: bool = False) -> dict[str, Any]:
    """:func:`live_run` in a fresh event loop (uvloop unless ``TESTBED_LOOP=asyncio``).

    Ctrl-C and SIGTERM cancel the run: the cluster is stopped, then
    ``KeyboardInterrupt`` propagates. Raises :class:`LiveRunError` when a process fails.
    """
    raise_open_file_limit()  # the generator holds up to max_in_flight connections; the children inherit it

    async def main() -> dict[str, Any]:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            return await live_run(scenario, command=command, impl=impl, echo=echo, progress=progress,
                                  max_in_flight=max_in_flight, drain_s=drain_s, keep_requests=keep_requests,
                                  dashboard=dashboard)
        except asyncio.CancelledError:
            raise KeyboardInterrupt from None
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    if os.environ.get("TESTBED_LOOP", "auto") != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            return uvloop.run(main())
    return asyncio.run(main())
