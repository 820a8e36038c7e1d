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

**The timeline** (``"timeline"``, :mod:`core.timeline`, the simulator's
schema, begun by :meth:`core.timeline.Timeline.for_scenario` as the
simulator's is): the generator's rows fold into it in ``interval_s`` intervals
(the rows' times are already the run's: 0 is the first arrival's clock),
beside the faults **as played**, not as scheduled: a ``fault`` event (named as
:func:`core.timeline.fault_pair` names the scheduled one) at each time the
fault log (``"faults"``) records, when the SIGKILL was sent, when the restarted
node listened again (a restart that took 4 s ends its span 4 s late), when
``POST`` / ``DELETE /admin/faults`` were answered; an action that failed adds
none (a fault never switched off lasts to the end). Beside them, the
state changes each process recorded itself, never guessed by the runner
(:class:`StateWatch`), read every ``interval_s`` (kept within
``POLL_MIN_S``-``POLL_MAX_S``: each change carries its own time, so the
period only bounds what a bounded record could lose meanwhile) and once at
the end:

* the balancer's health flips and ejector transitions (``GET /lb-events``);
* the registry's membership changes (``GET /events``, turned into events by
  :func:`core.timeline.membership_events`);
* each node breaker's transitions (the ``transitions`` of ``GET
  /circuit-status``, its last 20, deduplicated by time; also read just before
  the node is crashed). A crashed node comes back with a fresh breaker: if the
  old one was not CLOSED, a ``breaker <old> -> CLOSED "restarted"`` event at
  the new process's start says so (:func:`core.events.restart_event`), as the
  simulator does at its recovery. Transitions the breaker made between two
  reads beyond those 20 (its ``generation`` moved further) count as missed.

Every process stamps its changes with ``time.monotonic``, and the generator
its rows with ``time.perf_counter``: on Linux both read CLOCK_MONOTONIC, one
clock for every process of this machine, so a change at ``at`` happened at
run time ``at - t0`` (the offset between the two clocks is measured once, in
case they differ). Changes before time 0 (the cluster starting) are left out;
events the processes' rings or histories pushed out before they were read
are counted in the timeline's ``"events_missed"`` (there only when not 0).
So is a read that is the last chance and fails: the read of a breaker just
before its node is crashed (no answer within ``LAST_READ_S``), or any read at
the end; its process's changes since the read before are lost, how many cannot
be known, so it counts one. The run says so: a warning, and for a pre-crash
read a line in the fault log.

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
import math
import os
import signal
import time
from dataclasses import replace
from typing import Any, Callable, Sequence

import numpy as np

from core.events import TimelineEvent, restart_event
from core.registry import MembershipChange
from core.results import RequestLog, scenario_results
from core.scenario import Fault, Scenario
from core.timeline import TIMELINE_NODES, Timeline, fault_pair, membership_events
from live.cluster import ChildFailed, Cluster
from live.limits import DEFAULT_MAX_IN_FLIGHT, default_drain_s
from live.server_limits import raise_open_file_limit
from live.loadgen import LoadGenerator, clock
from live.upstream import UpstreamError, UpstreamPool

__all__ = ["LiveRunError", "Progress", "StateWatch", "fault_schedule", "live_timeline", "run_live", "write_requests"]

#: Open-loop rates from which the runner measures what this machine carries before the load. Below it (the
#: machine carried 1,100-4,000 requests/s when measured, busy or not) the probe is skipped: it leaves the
#: balancer with a pool of warm connections to every node, which changes what a node crash fails.
PROBE_FROM_PER_S = 500.0

#: The runner reads the processes' state changes every timeline interval, but at least this often ...
POLL_MAX_S = 1.0
#: ... and at most this often (a timeline of 10 ms intervals needs no reads a hundred times a second).
POLL_MIN_S = 0.25
#: A read of a process's state changes waits at most this long (seconds).
POLL_TIMEOUT_S = 2.0
#: The read of a node's breaker just before the node is crashed waits at most this long: the crash stays on time.
LAST_READ_S = 0.25

#: progress(elapsed_s, sent, completed, in_flight) while the run goes on.
Progress = Callable[[float, int, int, int], Any]


class LiveRunError(RuntimeError):
    """The run could not be carried out (a process failed to start or died); the message says which."""


class _Breaker:
    """What the runner knows of one node's breaker: the process it last read, its state, its newest change."""

    __slots__ = ("pid", "state", "generation", "last_at", "keys_at_last", "retired")

    def __init__(self) -> None:
        self.pid: int | None = None
        self.state = "CLOSED"
        self.generation = 0
        self.last_at = -math.inf
        self.keys_at_last: set[tuple[Any, ...]] = set()
        self.retired: set[int] = set()  # processes crashed since: a late answer of theirs is ignored


class StateWatch:
    """The live processes' own records of their state changes, read into events on the run's clock (see the
    module docstring). ``t0`` is the run's time 0 on ``time.monotonic``."""

    def __init__(self, cluster: Cluster, t0: float) -> None:
        self.cluster = cluster
        self.t0 = t0
        self.pool = UpstreamPool(timeout_s=POLL_TIMEOUT_S)
        self.quick = UpstreamPool(timeout_s=LAST_READ_S)
        self.events: list[TimelineEvent] = []
        self.changes: list[MembershipChange] = []
        self.next = {"balancer": 0, "registry": 0}
        self.missed = 0
        self.lost: list[str] = []  # last-chance reads that failed, said in words (each counted in missed)
        self.breakers = {spec.id: _Breaker() for spec in cluster.scenario.nodes if spec.circuit_breaker}

    def close(self) -> None:
        self.pool.close()
        self.quick.close()

    async def _get(self, url: str, path: str, pool: UpstreamPool | None = None) -> Any:
        """The JSON of a 200 answer, or None (the process is gone, slow, or said no: nothing learned)."""
        try:
            status, _, body = await (pool or self.pool).request(url, "GET", path, [], b"")
            return json.loads(body) if status == 200 else None
        except (UpstreamError, asyncio.TimeoutError, ValueError):
            return None

    async def poll(self, *, last: bool = False) -> None:
        """Read every process once; ``last``: the read at the end, after which nothing is read again (a read
        that fails then counts in :attr:`missed`, and is named in :attr:`lost`)."""
        names = ["the balancer's /lb-events", "the registry's /events",
                 *(f"{n}'s breaker" for n in self.breakers)]
        done = await asyncio.gather(self._balancer(), self._registry(), *(self.breaker(n) for n in self.breakers))
        if last:
            for name, ok in zip(names, done):
                if not ok:
                    self.lose(f"{name} could not be read at the end of the run")

    def lose(self, what: str) -> None:
        """A last-chance read failed: what its process changed since the read before is lost, how much cannot
        be known; it counts one in :attr:`missed`."""
        self.missed += 1
        self.lost.append(f"{what}: its state changes since the read before are not on the timeline "
                         "(counted in events_missed)")

    async def run(self, period_s: float) -> None:
        while True:
            await self.poll()
            await asyncio.sleep(period_s)

    def _ring(self, name: str, body: Any) -> list[Any]:
        """The new entries of a ``GET /...events?since=N`` answer (and where to read from next)."""
        if not isinstance(body, dict) or not isinstance(body.get("events"), list):
            return []
        self.next[name] = int(body.get("next", self.next[name]))
        self.missed += int(body.get("missed", 0))
        return [e for e in body["events"] if isinstance(e, dict)]

    async def _balancer(self) -> bool:
        """Read the balancer's new events; False when the read failed."""
        lb = self.cluster.balancer
        if lb is None:
            return True
        body = await self._get(lb.url, f"/lb-events?since={self.next['balancer']}")
        for e in self._ring("balancer", body):
            try:
                self.events.append(TimelineEvent.from_dict(e, self.t0))
            except (KeyError, TypeError, ValueError):
                continue
        return body is not None

    async def _registry(self) -> bool:
        """Read the registry's new membership changes; False when the read failed."""
        registry = self.cluster.registry
        if registry is None:
            return True
        body = await self._get(registry.url, f"/events?since={self.next['registry']}")
        for e in self._ring("registry", body):
            try:
                self.changes.append(MembershipChange(str(e["kind"]), str(e["node_id"]), float(e["at"])))
            except (KeyError, TypeError, ValueError):
                continue
        return body is not None

    async def breaker(self, node_id: str, *, last: bool = False) -> bool:
        """Read one node's breaker (``last``: just before a crash, waiting at most ``LAST_READ_S``); False
        when the read failed (no node process to read is no failure)."""
        child = self.cluster.nodes.get(node_id)
        if child is None or not child.running:
            return True
        pid, started_at = child.pid, child.started_at
        body = await self._get(child.url, "/circuit-status", self.quick if last else None)
        if isinstance(body, dict) and isinstance(body.get("transitions"), list):
            self._breaker_read(node_id, pid, started_at, body)
            return True
        return False

    def _breaker_read(self, node_id: str, pid: int, started_at: float, body: dict[str, Any]) -> None:
        b = self.breakers[node_id]
        if pid in b.retired:
            return
        if b.pid is not None and pid != b.pid:  # a new process: its breaker starts CLOSED
            b.retired.add(b.pid)
            restarted = restart_event(node_id, b.state, started_at - self.t0)
            if restarted is not None:
                self.events.append(restarted)
            b.state, b.generation = "CLOSED", 0
        b.pid = pid
        taken = 0
        for tr in body["transitions"]:
            try:
                at, old, new, signal_ = float(tr["at"]), str(tr["from"]), str(tr["to"]), str(tr["signal"])
            except (KeyError, TypeError, ValueError):
                continue
            key = (at, old, new, signal_)
            if at < b.last_at or (at == b.last_at and key in b.keys_at_last):
                continue  # read before
            if at > b.last_at:
                b.last_at, b.keys_at_last = at, set()
            b.keys_at_last.add(key)
            self.events.append(TimelineEvent(at - self.t0, node_id, "breaker", old, new, signal_))
            b.state = new
            taken += 1
        generation = body.get("generation")
        if isinstance(generation, int):
            self.missed += max(0, generation - b.generation - taken)
            b.generation = max(b.generation, generation)

    def timeline_events(self) -> list[TimelineEvent]:
        """Every change read, on the run's clock, from time 0 on."""
        events = self.events + membership_events(self.changes, self.t0)
        return [e for e in events if e.t >= 0]


def live_timeline(scenario: Scenario, *, interval_s: float | None = None,
                  node_series: int = TIMELINE_NODES) -> Timeline:
    """:meth:`core.timeline.Timeline.for_scenario` without the scheduled faults: a live run adds the faults as
    it played them (:func:`fault_schedule`)."""
    return Timeline.for_scenario(scenario, interval_s=interval_s, node_series=node_series, scheduled_faults=False)


def fault_schedule(scenario: Scenario) -> list[tuple[str, Fault, TimelineEvent, TimelineEvent]]:
    """Each of the scenario's faults with its node and its two scheduled ``fault`` events
    (:func:`core.timeline.fault_pair`), which :func:`_fault` re-dates at the times it played them."""
    return [(spec.id, f, *fault_pair(spec.id, f)) for spec in scenario.nodes for f in spec.faults]


async def _fault(cluster: Cluster, node_id: str, fault: Fault, t0: float, log: list[dict[str, Any]],
                 watch: StateWatch | None = None, *, scheduled: tuple[TimelineEvent, TimelineEvent] | None = None,
                 played: list[TimelineEvent] | None = None) -> None:
    """Play one fault on schedule and log what happened (``log``); with ``scheduled`` (its start and end
    events), add them to ``played`` dated when each action took effect, for those that did."""
    pool = UpstreamPool(timeout_s=5.0)
    headers = [("Content-Type", "application/json"), ("Authorization", f"Bearer {cluster.admin_token}")]

    async def admin(method: str, body: bytes) -> str:
        try:
            status, _, text = await pool.request(cluster.nodes[node_id].url, method, "/admin/faults", headers, body)
            return "ok" if status == 200 else f"answered {status}: {text[:200].decode(errors='replace')}"
        except (UpstreamError, asyncio.TimeoutError) as exc:
            return f"failed: {exc or type(exc).__name__}"

    def note(action: str, result: str, at: float | None = None) -> float:
        """Log an action; its run time (``at`` on :func:`clock`, or now), as logged."""
        at_s = round((clock() if at is None else at) - t0, 3)
        log.append({"node": node_id, "at_s": at_s, "action": action, "result": result})
        return at_s

    def play(event: int, at_s: float) -> None:
        if scheduled is not None and played is not None:
            played.append(replace(scheduled[event], t=at_s))

    try:
        await asyncio.sleep(max(0.0, t0 + fault.start_s - clock()))
        if fault.down:
            if watch is not None and node_id in watch.breakers and not await watch.breaker(node_id, last=True):
                # Its breaker's last changes die with it: say so, and count them (how many, nobody knows).
                what = f"{node_id}'s breaker did not answer within {LAST_READ_S:g} s before the crash"
                watch.lose(what)
                note("read the breaker before the crash", f"failed: no answer within {LAST_READ_S:g} s (its "
                     "changes since the read before are lost, counted in the timeline's events_missed)")
            killed = clock()
            await cluster.crash(node_id)
            play(0, note("crash (SIGKILL)", "ok", killed))
            on = True
        else:
            body = json.dumps({"error_rate": fault.error_rate, "extra_latency_ms": fault.extra_latency_ms}).encode()
            result = await admin("POST", body)
            at_s = note(f"faults on: error_rate={fault.error_rate:g} extra_latency_ms={fault.extra_latency_ms:g}",
                        result)
            on = result == "ok"
            if on:
                play(0, at_s)
        await asyncio.sleep(max(0.0, t0 + fault.end_s - clock()))
        if fault.down:
            restarted = await cluster.restart(node_id)  # returns once the new process listens
            at_s = note("restart", "ok" if restarted else "failed")
            if restarted:
                play(1, at_s)
        else:
            result = await admin("DELETE", b"")
            at_s = note("faults off", result)
            if on and result == "ok":  # a fault never switched on, or never off, has no end to show
                play(1, at_s)
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
                   keep_requests: str | os.PathLike[str] | None = None, dashboard: bool = False,
                   interval_s: float | None = None, timeline_nodes: int = TIMELINE_NODES) -> dict[str, Any]:
    """Run ``scenario`` live (see the module docstring) and return its results dict. ``command`` starts a
    ``testbed`` process (see :class:`live.cluster.Cluster`); ``max_in_flight`` bounds the requests
    outstanding, ``drain_s`` the wait for them after the duration (None: the balancer's timeout and a margin,
    :func:`live.limits.default_drain_s`, as long as the simulator waits); ``keep_requests`` is a path to
    write every request's row to; ``dashboard``: print the dashboard's URL once the cluster is up;
    ``interval_s``: the timeline's interval (seconds; None: :func:`core.timeline.default_interval_s`, as the
    simulator's; ValueError, before anything starts, for one that is not positive or makes more than
    :data:`core.timeline.MAX_INTERVALS` intervals), with per-node series for up to ``timeline_nodes`` nodes."""
    s = scenario
    if drain_s is None:
        drain_s = default_drain_s(s.balancer.timeout_s)
    timeline = live_timeline(s, interval_s=interval_s, node_series=timeline_nodes)
    played: list[TimelineEvent] = []
    watch: StateWatch | None = None
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
            watch = StateWatch(cluster, t0 + (time.monotonic() - clock()))
            helpers = [asyncio.create_task(_fault(cluster, node_id, f, t0, fault_log, watch, scheduled=(on, off),
                                                  played=played))
                       for node_id, f, on, off in fault_schedule(s)]
            helpers.append(asyncio.create_task(watch.run(min(max(timeline.interval_s, POLL_MIN_S), POLL_MAX_S))))
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
            await watch.poll(last=True)  # the changes since the last read, while every process is still up
    except ChildFailed as exc:
        raise LiveRunError(str(exc)) from None
    finally:
        if watch is not None:
            watch.close()
    if keep_requests is not None:
        write_requests(keep_requests, gen.log)
    for what in watch.lost:
        echo(f"WARNING: {what}")
    timeline.fold(gen.log.columns())
    timeline.add_events(played)
    timeline.add_events(watch.timeline_events())
    line = timeline.as_dict()
    if watch.missed:
        line["events_missed"] = watch.missed
    return scenario_results(gen.log, s, mode="live", not_sent=gen.not_sent, live_requests=len(gen.log),
                            generator=stats, overhead_ms=overhead, faults=fault_log, timeline=line)


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
             keep_requests: str | os.PathLike[str] | None = None, dashboard: bool = False,
             interval_s: float | None = None, timeline_nodes: int = TIMELINE_NODES) -> dict[str, Any]:
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
                                  dashboard=dashboard, interval_s=interval_s, timeline_nodes=timeline_nodes)
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
