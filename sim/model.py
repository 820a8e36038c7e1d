"""The SimPy model: a balancer and nodes built from the same core objects as the live runtime.

Theory of operation
-------------------
Simulated time is ``env.now`` in seconds; every core object gets it as ``now``.
A request goes through exactly what a live request goes through:

1. **Balancer**: :class:`core.balancer_state.BalancerState`, the live
   balancer's own books. The core strategy picks from immutable ``Backend``
   snapshots (in-flight count, workers as weight, health, latency EWMA). A node
   that is down refuses the connection: the balancer marks it unhealthy and
   retries once on another node. Active health checks run every
   ``health_check_interval_s``. The per-backend *ejector* counts 5xx and
   refused connections and takes a failing node out of rotation for a while;
   core's stall rule (:mod:`core.outlier`) ejects a node that holds requests
   and has answered none for far longer than usual (a fault's huge
   ``extra_latency_ms`` is how a scenario hangs a node), judged at each pick
   and on the health-check tick, as in the live balancer.
2. **Node**: :class:`core.node_pipeline.NodePipeline`, the live node's own
   request path: the per-client token bucket (429), the backpressure gate
   (429), the circuit breaker guarding the node's work (503), and ``workers``
   servers with a FIFO queue. A service time is drawn from the node's
   distribution (mean ``load_factor_ms``) plus any fault latency, and a
   fault's ``error_rate`` turns the response into a 5xx that the breaker counts.

Scheduled faults switch error rate, latency and ``down`` on and off; a node
that goes down loses what it held (recorded as server errors) and comes back
as a fresh process, with fresh middleware state.

Cost per request. Arrivals are one process (one timeout per arrival); a
request's service is one timeout whose callback completes it and starts the
next in the queue. That is two SimPy events per request, where the textbook
process-per-request model with a ``Resource`` needs five or more, so the
model's extra work (snapshots, strategy, middleware, records) fits in the
time that saves. Random numbers are drawn from numpy in chunks.

Bounded memory. Each response is one row appended to a
:class:`core.results.RequestLog` that holds 64K rows at most: a full chunk is
folded into the run's :class:`core.summary.RunSummary` (and written to the
``--keep-requests`` file, :mod:`sim.requests_file`) and forgotten, so a run of
ten million requests needs no more memory than a short one. ``keep_rows=True``
keeps every row in ``sim.log`` instead (tests, small runs); the results are
the same either way.

Timeline. The same chunks also fold into a :class:`core.timeline.Timeline`
(per ``interval_s``, overall and per node), and the core objects' own state
changes go beside it: the balancer's (health, ejector) and the node
breakers' event logs are drained on each health-check tick and at the end,
and the scenario's faults are listed from the scenario. A node that crashes
starts afresh: a breaker it left not CLOSED shows as reset ("restarted") when
it comes back. ``timeline=False`` keeps none.

Nothing here decides policy: admission, breaking, picking, retrying and health
are all ``core`` calls; this module moves simulated time.
"""

from __future__ import annotations

import os
import random
from typing import Any, Callable, Iterator, cast

import numpy as np
import simpy

from core.balancer_state import Attempt, BalancerState
from core.node_pipeline import NodePipeline, Rejected, Ticket
from core.rate_limiter import TokenBucket
from core.results import CHUNK_ROWS, OUTCOME_STATUS, Outcome, RequestLog, new_summary, scenario_results
from core.scenario import NodeSpec, Scenario
from core.events import restart_event
from core.strategies import STRATEGIES, BaseStrategy, NoHealthyBackend
from core.timeline import TIMELINE_NODES, Timeline, breaker_events
from core.workload import (
    ARRIVAL_STREAM, CLIENT_STREAM, NODE_STREAM, chunks, client_ids, node_chunk_size, open_loop, service_times,
    strategy_seed, streams, think_times,
)
from sim.requests_file import RequestsFile

__all__ = ["PROGRESS_STEPS", "Progress", "Simulation"]

#: progress(simulated_now_s, duration_s), called PROGRESS_STEPS times over a run's duration and once at its end.
Progress = Callable[[float, float], Any]
PROGRESS_STEPS = 200

NAN = float("nan")
_OK, _RATE, _BP, _OPEN, _ERR, _CONN, _NONE, _TIMEOUT = (int(o) for o in Outcome)
_STATUS = [OUTCOME_STATUS[o] for o in Outcome]  # the status each outcome answers, by outcome number


class Request:
    __slots__ = ("arrival", "client", "node", "start", "attempt", "done")

    def __init__(self, arrival: float, client: str, done: simpy.Event | None = None) -> None:
        self.arrival = arrival
        self.client = client
        self.node = -1
        self.start = NAN
        self.attempt: Attempt | None = None  # the balancer's, once a node took the request
        self.done = done


class SimNode:
    """One node: the core request path (:class:`core.node_pipeline.NodePipeline`) served in simulated time."""

    def __init__(self, sim: Simulation, index: int, spec: NodeSpec, rng: np.random.Generator,
                 limiter_cls: type[TokenBucket]) -> None:
        self.sim, self.index, self.spec = sim, index, spec
        self.env = sim.env
        self.pipeline = NodePipeline(spec, limiter_cls)
        size = node_chunk_size(len(sim.scenario.nodes))
        self.service = service_times(spec.service, spec.load_factor_ms / 1000.0, rng, chunk_size=size)
        self.uniform = chunks(rng.random, size)
        self.up = True
        self.error_rate = 0.0
        self.extra_latency_s = 0.0
        self.breaker_at_crash = "CLOSED"

    # -- the request path ----------------------------------------------------
    def accept(self, req: Request) -> None:
        now = self.env.now
        admitted = self.pipeline.admit(req.client, now=now, payload=req)
        if isinstance(admitted, Rejected):
            return self.sim.finish(req, int(admitted.outcome), now)
        if admitted.started:
            self._serve(admitted, now)

    def _serve(self, ticket: Ticket, now: float) -> None:
        ticket.payload.start = now
        delay = next(self.service) + self.extra_latency_s
        self.env.timeout(delay, ticket).callbacks.append(self._complete)

    def _complete(self, event: simpy.Event) -> None:
        ticket = cast(Ticket, event.value)  # the value _serve scheduled the timeout with
        if ticket.generation != self.pipeline.generation:
            return  # the node crashed meanwhile; the request was already recorded
        now = self.env.now
        failed = self.error_rate > 0.0 and next(self.uniform) < self.error_rate
        following = self.pipeline.complete(ticket, failed=failed, now=now)
        self.sim.finish(ticket.payload, _ERR if failed else _OK, now)
        if following is not None:
            self._serve(following, now)

    # -- faults --------------------------------------------------------------
    def crash(self) -> None:
        """Go down: everything held fails now; the process comes back fresh when it recovers."""
        now = self.env.now
        self.up = False
        self.sim.drain_breaker(self, now)  # what was due by now (a cool-down) happened before the crash
        breaker = self.pipeline.breaker
        self.breaker_at_crash = breaker.state.name if breaker is not None else "CLOSED"
        for ticket in self.pipeline.crash():
            self.sim.finish(ticket.payload, _ERR, now)

    def recover(self) -> None:
        self.up = True
        restarted = restart_event(self.spec.id, self.breaker_at_crash, self.env.now)
        if restarted is not None and self.sim.timeline is not None:
            self.sim.timeline.add_events([restarted])
        self.breaker_at_crash = "CLOSED"


class Simulation:
    """One run of a scenario. Build it, call :meth:`run`, read :meth:`results`."""

    def __init__(self, scenario: Scenario, *, strategy_cls: type[BaseStrategy] | None = None,
                 limiter_cls: type[TokenBucket] | None = None, keep_rows: bool = False,
                 chunk_rows: int = CHUNK_ROWS, timeline: bool = True, interval_s: float | None = None,
                 timeline_nodes: int = TIMELINE_NODES) -> None:
        """``strategy_cls`` and ``limiter_cls`` default to the classes in ``core`` (the exercises'
        own, stubs included); whose code runs is the caller's choice (``solutions.impl.simulate``).
        ``keep_rows`` keeps every request's row in :attr:`log` (memory grows with the run); the rows are
        folded into the summary ``chunk_rows`` at a time either way. ``timeline`` keeps a timeline of
        ``interval_s`` (None: :func:`core.timeline.default_interval_s`), with per-node series for up to
        ``timeline_nodes`` nodes."""
        self.scenario = scenario
        self.env = simpy.Environment()
        self.summary = new_summary(warmup_s=scenario.warmup_s, duration_s=scenario.duration_s,
                                   nodes=len(scenario.nodes))
        self.timeline = (Timeline.for_scenario(scenario, interval_s=interval_s, node_series=timeline_nodes)
                         if timeline else None)
        sinks = [self.summary.fold] if self.timeline is None else [self.summary.fold, self.timeline.fold]
        self.log = RequestLog(keep=keep_rows, sinks=sinks, chunk_rows=chunk_rows)
        self._files: list[RequestsFile] = []
        rngs = streams(scenario.seed, NODE_STREAM + len(scenario.nodes))  # who uses which: core.workload
        self._rng_arrivals, self._rng_clients = rngs[ARRIVAL_STREAM], rngs[CLIENT_STREAM]
        strategy_cls = strategy_cls or STRATEGIES[scenario.balancer.strategy]
        self.balancer = BalancerState(scenario.balancer, strategy_cls(rng=random.Random(strategy_seed(scenario.seed))))
        self.nodes = [SimNode(self, i, spec, rngs[NODE_STREAM + i], limiter_cls or TokenBucket)
                      for i, spec in enumerate(scenario.nodes)]
        for node in self.nodes:
            self.balancer.add(node.spec.id, weight=node.spec.workers).driver = node
        self.in_flight = 0
        self.arrivals_open = True
        self._timeout_s = scenario.balancer.timeout_s

    # -- balancer ------------------------------------------------------------
    def dispatch(self, req: Request, exclude: tuple[str, ...] = ()) -> None:
        """The balancer's part: pick through core's books, send, and retry a refused connection once."""
        now = self.env.now
        balancer = self.balancer
        try:
            attempt = balancer.pick(now=now, exclude=exclude, number=len(exclude) + 1)
        except NoHealthyBackend:
            self.in_flight += 1
            return self.finish(req, _NONE, now)
        node: SimNode = attempt.backend.driver
        req.node = node.index
        if not node.up:  # a refused connection
            balancer.refused(attempt, now=now)
            if balancer.may_retry(attempt):
                return self.dispatch(req, exclude=(*exclude, node.spec.id))
            self.in_flight += 1
            return self.finish(req, _CONN, now)
        req.attempt = attempt
        self.in_flight += 1
        node.accept(req)

    def finish(self, req: Request, outcome: int, now: float) -> None:
        """A response is complete: settle it in the balancer's books and record it.

        A response later than the balancer's ``timeout_s`` reached the client as a 504
        at ``arrival + timeout_s``. (The live balancer also stops counting the request
        against the node at that moment; here the count drops when the node is done,
        which only differs for a node that is already hopelessly behind.)
        """
        self.in_flight -= 1
        if now - req.arrival > self._timeout_s:
            outcome, now = _TIMEOUT, req.arrival + self._timeout_s
        if req.attempt is not None:
            self.balancer.answered(req.attempt, status=_STATUS[outcome], elapsed_s=now - req.arrival, now=now)
        self.log.record(req.arrival, req.node, req.start, now, outcome)
        if req.done is not None:
            req.done.succeed()

    # -- processes -----------------------------------------------------------
    def _open_arrivals(self) -> Any:
        env, end = self.env, self.scenario.duration_s
        dispatch, timeout = self.dispatch, env.timeout
        for gap, client in open_loop(self.scenario.workload, self._rng_arrivals, self._rng_clients):
            yield timeout(gap)
            if env.now >= end:
                break
            dispatch(Request(env.now, client))
        self.arrivals_open = False

    def _closed_client(self, client: str, think: Iterator[float]) -> Any:
        env, end = self.env, self.scenario.duration_s
        while True:
            yield env.timeout(next(think))
            if env.now >= end:
                break
            done = env.event()
            self.dispatch(Request(env.now, client, done))
            yield done

    def _closed_arrivals(self) -> Any:
        w = self.scenario.workload
        think = think_times(w, self._rng_arrivals)
        clients = [self.env.process(self._closed_client(client, think)) for client in client_ids(w)]
        yield simpy.AllOf(self.env, clients)
        self.arrivals_open = False

    def _health_checks(self) -> Any:
        interval = self.scenario.balancer.health_check_interval_s
        while self.arrivals_open or self.in_flight:
            yield self.env.timeout(interval)
            now = self.env.now
            for entry in self.balancer.backends.values():
                self.balancer.checked(entry, entry.driver.up, now=now)
            self.balancer.tick(now=now)  # hung backends the strategy no longer picks (core.outlier)
            self.drain_events(now)

    # -- the timeline's state changes ------------------------------------------
    def drain_breaker(self, node: SimNode, now: float) -> None:
        """The node's breaker's changes up to ``now`` into the timeline (before a crash replaces the breaker)."""
        breaker = node.pipeline.breaker
        if breaker is not None:
            changes = breaker.drain_events(now=now)
            if self.timeline is not None:
                self.timeline.add_events(breaker_events(node.spec.id, "breaker", changes))

    def drain_events(self, now: float) -> None:
        """Every core object's state changes up to ``now`` into the timeline (and out of their bounded logs)."""
        events = self.balancer.drain_events(now=now)
        for node in self.nodes:
            self.drain_breaker(node, now)
        if self.timeline is not None:
            self.timeline.add_events(events)

    def _fault(self, node: SimNode, start: float, end: float, error_rate: float, extra_ms: float,
               down: bool) -> Any:
        yield self.env.timeout(start)
        if down:
            node.crash()
        node.error_rate, node.extra_latency_s = error_rate, extra_ms / 1000.0
        yield self.env.timeout(end - start)
        node.error_rate, node.extra_latency_s = 0.0, 0.0
        if down:
            node.recover()

    # -- running -------------------------------------------------------------
    def keep_requests(self, path: str | os.PathLike[str]) -> Simulation:
        """Also write every request's row to the ``.npz`` at ``path`` as the run goes (:mod:`sim.requests_file`);
        raises :class:`sim.requests_file.RequestsFileError` at once when it cannot be written there."""
        self._files.append(RequestsFile(path))
        self.log.sinks.append(self._files[-1])
        return self

    def run(self, *, progress: Progress | None = None) -> Simulation:
        """Simulate the whole scenario: arrivals for ``duration_s``, then until the last response.
        ``progress`` (if given) is called with ``(simulated_now_s, duration_s)`` as the run goes."""
        try:
            self._run(progress)
            self.log.flush()
            self.drain_events(self.env.now)
            for f in self._files:
                f.close()
        except BaseException:
            for f in self._files:
                f.discard()
            raise
        return self

    def _run(self, progress: Progress | None) -> None:
        env = self.env
        if self.scenario.workload.arrival == "closed":
            env.process(self._closed_arrivals())
        else:
            env.process(self._open_arrivals())
        env.process(self._health_checks())
        for node in self.nodes:
            for f in node.spec.faults:
                env.process(self._fault(node, f.start_s, f.end_s, f.error_rate, f.extra_latency_ms, f.down))
        if progress is None:
            env.run()
            return
        # In slices of simulated time: a stop event at each slice's end runs before the events due then,
        # and moves none of them, so the run is the same event for event.
        duration_s = self.scenario.duration_s
        for i in range(1, PROGRESS_STEPS + 1):
            env.run(until=duration_s * i / PROGRESS_STEPS)
            progress(min(env.now, duration_s), duration_s)
        env.run()  # the responses still outstanding at the end
        progress(duration_s, duration_s)

    def results(self) -> dict[str, Any]:
        """The results JSON (:mod:`core.results`) of the run, from its summary."""
        extra: dict[str, Any] = {"simulated_requests": len(self.log)}
        if self.timeline is not None:
            extra["timeline"] = self.timeline.as_dict()
        return scenario_results(self.summary, self.scenario, mode="sim", **extra)

