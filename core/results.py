"""Per-request records and the results summary, one schema for simulated and live runs.

Theory of operation
-------------------
A run records one flat row per request: when it arrived, which node took it
(-1: none), when its service started (NaN: never served), when its response
was complete, and how it ended (:class:`Outcome`). The simulator and the live
load generator append rows to a :class:`RequestLog` as responses complete; the
rows are folded, chunk by chunk, into a :class:`core.summary.RunSummary`
(counts, busy time, response-time sketches), which :func:`results_of` turns
into the results JSON both modes share::

    {"scenario", "mode", "seed", "strategy", "duration_s",
     "requests": {"sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors"},
     "errors_detail": {"server", "connect", "no_backend", "timeout", "not_sent"},
     "throughput_rps", "latency_ms": {mean, p50, p90, p95, p99, max},
     "nodes": {id: {"requests", "share", "utilization", "latency_ms": {...}}}}

Only requests that arrived inside the measurement window ``[warmup_s,
duration_s)`` count; latency is the response time (arrival to complete
response) of requests that ended OK: mean and max exact, the percentiles from
a t-digest (exact up to 4000 responses, within 0.5% beyond; see
:mod:`core.summary`). ``not_sent`` are the arrival times of requests a live
load generator had scheduled but never sent (too many outstanding, or the
run's time was up): they count as sent and failed, so the counts still add up
to the simulator's for the same arrivals.

Bounded or kept. Rows go into ``array.array`` columns (appending costs about
as much as a list append, 8 bytes a value rather than a boxed float). A log
that does not keep its rows hands every ``chunk_rows`` of them to its sinks
(the summary's fold, a file) and forgets them: memory stays bounded however
long the run. A log that keeps them (the default: a live run, a test reading
every row) hands them over, in the same chunks, when flushed. Either way the
summary folds the same chunks, so keeping the rows changes no figure.
"""

from __future__ import annotations

import enum
import sys
from array import array
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

import numpy as np

from core.summary import Latencies, RunSummary

if TYPE_CHECKING:
    from core.scenario import Scenario

__all__ = ["CHUNK_ROWS", "COLUMNS", "Columns", "ERROR_CODES", "LATENCY_KEYS", "OUTCOME_STATUS", "Outcome", "RequestLog",
           "Sink", "latency_stats", "new_summary", "outcome_of", "results_of", "scenario_results", "summarize"]


class Outcome(enum.IntEnum):
    OK = 0
    RATE_LIMITED = 1   # 429 from the node's token bucket
    BACKPRESSURE = 2   # 429 from the node's backpressure gate
    CIRCUIT_OPEN = 3   # 503 from the node's circuit breaker
    SERVER_ERROR = 4   # 5xx from the work itself (or the node crashed mid-request)
    CONNECT_ERROR = 5  # the node could not be reached
    NO_BACKEND = 6     # the balancer had no healthy backend
    TIMEOUT = 7        # the balancer gave up waiting for the node (504)


#: The HTTP status a client sees for each outcome (what the live processes answer).
OUTCOME_STATUS = {Outcome.OK: 200, Outcome.RATE_LIMITED: 429, Outcome.BACKPRESSURE: 429, Outcome.CIRCUIT_OPEN: 503,
                  Outcome.SERVER_ERROR: 500, Outcome.CONNECT_ERROR: 502, Outcome.NO_BACKEND: 503,
                  Outcome.TIMEOUT: 504}

#: The ``error.code`` of the live processes' JSON errors, read back as outcomes (see :func:`outcome_of`).
ERROR_CODES = {
    "rate_limited": Outcome.RATE_LIMITED, "backpressure": Outcome.BACKPRESSURE, "circuit_open": Outcome.CIRCUIT_OPEN,
    "client_bulkhead": Outcome.BACKPRESSURE,  # the per-client bound on what is inside: shedding, per client
    "work_failed": Outcome.SERVER_ERROR, "backend_error": Outcome.SERVER_ERROR,  # a node that died mid-request
    "backend_unreachable": Outcome.CONNECT_ERROR, "no_healthy_backend": Outcome.NO_BACKEND,
    "backend_timeout": Outcome.TIMEOUT,
}


def outcome_of(status: int, code: str | None = None) -> Outcome:
    """How a client reads a live response: the JSON error's ``code`` when it names an outcome,
    else the status (200 OK, 429 rate limited, 504 timeout, anything else a server error)."""
    if status == 200:
        return Outcome.OK
    known = ERROR_CODES.get(code) if code else None
    if known is not None:
        return known
    return {429: Outcome.RATE_LIMITED, 504: Outcome.TIMEOUT}.get(status, Outcome.SERVER_ERROR)

LATENCY_KEYS = ("mean", "p50", "p90", "p95", "p99", "max")


#: The row format: column name -> dtype (what :meth:`RequestLog.columns` gives and ``--keep-requests`` writes).
COLUMNS: dict[str, Any] = {"arrival": np.float64, "node": np.intc, "start": np.float64, "end": np.float64,
                           "outcome": np.int8}

#: Rows a log holds before it hands them on: 64K rows are ~1.9 MB, and big enough that folding them costs a
#: few numpy calls per 65,536 requests.
CHUNK_ROWS = 65_536

Columns = dict[str, np.ndarray]
#: Takes one chunk of rows (its own copies: it may keep them).
Sink = Callable[[Columns], Any]


class RequestLog:
    """Columns of per-request rows; append with :meth:`record`, hand them to the sinks with :meth:`flush`.

    ``keep=True`` (default) keeps every row (:meth:`columns`); ``keep=False`` holds at most ``chunk_rows``:
    each full chunk goes to the sinks and is forgotten (see the module docstring). ``len()`` counts every row
    recorded."""

    __slots__ = ("arrival", "node", "start", "end", "outcome", "chunk_rows", "keep", "sinks", "_handed", "_dropped",
                 "_flush_at")

    def __init__(self, *, keep: bool = True, sinks: Iterable[Sink] = (), chunk_rows: int = CHUNK_ROWS) -> None:
        if chunk_rows < 1:
            raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
        self.arrival = array("d")
        self.node = array("i")
        self.start = array("d")
        self.end = array("d")
        self.outcome = array("b")
        self.chunk_rows, self.keep, self.sinks = chunk_rows, keep, list(sinks)
        self._handed = 0   # rows held that the sinks already have
        self._dropped = 0  # rows handed on and forgotten
        self._flush_at = sys.maxsize if keep else chunk_rows

    def record(self, arrival: float, node: int, start: float, end: float, outcome: int) -> None:
        self.arrival.append(arrival)
        self.node.append(node)
        self.start.append(start)
        self.end.append(end)
        self.outcome.append(outcome)
        if len(self.outcome) >= self._flush_at:
            self.flush()

    def flush(self) -> None:
        """Hand every row the sinks do not have yet to each of them, ``chunk_rows`` at a time; a log that
        does not keep its rows then forgets them."""
        held = len(self.outcome)
        for lo in range(self._handed, held, self.chunk_rows):
            hi = min(lo + self.chunk_rows, held)
            chunk = {name: np.array(getattr(self, name)[lo:hi], dtype=dtype) for name, dtype in COLUMNS.items()}
            for sink in self.sinks:
                sink(chunk)
        self._handed = held
        if not self.keep:
            for name in COLUMNS:
                del getattr(self, name)[:]
            self._dropped += held
            self._handed = 0

    def __len__(self) -> int:
        return self._dropped + len(self.outcome)

    def columns(self) -> Columns:
        """The rows held (every row, when the log keeps them) as numpy arrays (zero-copy views)."""
        def view(col: array, dtype: Any) -> np.ndarray:
            return np.frombuffer(col, dtype=dtype) if len(col) else np.empty(0, dtype=dtype)
        return {name: view(getattr(self, name), dtype) for name, dtype in COLUMNS.items()}


def new_summary(*, warmup_s: float, duration_s: float, nodes: int) -> RunSummary:
    """An empty :class:`core.summary.RunSummary` of this module's outcomes."""
    return RunSummary(warmup_s=warmup_s, duration_s=duration_s, nodes=nodes, outcomes=len(Outcome), ok=Outcome.OK)


def latency_stats(latencies: Latencies) -> dict[str, float | None]:
    """Mean, percentiles and max of response times, in milliseconds (None when empty)."""
    if not latencies.count:
        return {k: None for k in LATENCY_KEYS}
    return {"mean": latencies.mean_s * 1000.0,
            **{f"p{q}": latencies.quantile_s(q / 100) * 1000.0 for q in (50, 90, 95, 99)},
            "max": latencies.max_s * 1000.0}


def results_of(summary: RunSummary, *, scenario: str, mode: str, seed: int, strategy: str, node_ids: Sequence[str],
               node_workers: Sequence[int], extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The results JSON of one run from its summary (see the module docstring)."""
    tally = summary.window
    counts, per_node = tally.by_outcome(), tally.by_node()
    unsent, measured_s = summary.not_sent, summary.measured_s
    routed = int(per_node.sum())
    nodes = {node_id: {
        "requests": int(per_node[i]),
        "share": int(per_node[i]) / routed if routed else 0.0,
        "utilization": float(summary.busy_s[i]) / (workers * measured_s),
        "latency_ms": latency_stats(tally.node_latency[i]),
    } for i, (node_id, workers) in enumerate(zip(node_ids, node_workers))}

    result = {
        "scenario": scenario,
        "mode": mode,
        "seed": seed,
        "strategy": strategy,
        "duration_s": summary.duration_s,
        "warmup_s": summary.warmup_s,
        "requests": {
            "sent": int(counts.sum()) + unsent,
            "ok": int(counts[Outcome.OK]),
            "rate_limited": int(counts[Outcome.RATE_LIMITED]),
            "backpressure": int(counts[Outcome.BACKPRESSURE]),
            "circuit_open": int(counts[Outcome.CIRCUIT_OPEN]),
            "errors": int(counts[Outcome.SERVER_ERROR] + counts[Outcome.CONNECT_ERROR] + counts[Outcome.NO_BACKEND]
                          + counts[Outcome.TIMEOUT] + unsent),
        },
        "errors_detail": {
            "server": int(counts[Outcome.SERVER_ERROR]),
            "connect": int(counts[Outcome.CONNECT_ERROR]),
            "no_backend": int(counts[Outcome.NO_BACKEND]),
            "timeout": int(counts[Outcome.TIMEOUT]),
            "not_sent": unsent,
        },
        "throughput_rps": int(counts[Outcome.OK]) / measured_s,
        "latency_ms": latency_stats(tally.latency),
        "nodes": nodes,
    }
    if extra:
        result.update(extra)
    return result


def summarize(log: RequestLog, *, scenario: str, mode: str, seed: int, strategy: str, duration_s: float,
              warmup_s: float, node_ids: Sequence[str], node_workers: Sequence[int],
              extra: dict[str, Any] | None = None, not_sent: Sequence[float] | np.ndarray = ()) -> dict[str, Any]:
    """The results JSON of the rows ``log`` holds, folded as a run folds them (see the module docstring)."""
    summary = _fold(log, warmup_s=warmup_s, duration_s=duration_s, nodes=len(node_ids), not_sent=not_sent)
    return results_of(summary, scenario=scenario, mode=mode, seed=seed, strategy=strategy, node_ids=node_ids,
                      node_workers=node_workers, extra=extra)


def _fold(log: RequestLog, *, warmup_s: float, duration_s: float, nodes: int,
          not_sent: Sequence[float] | np.ndarray) -> RunSummary:
    summary = new_summary(warmup_s=warmup_s, duration_s=duration_s, nodes=nodes)
    c = log.columns()
    for lo in range(0, len(c["outcome"]), log.chunk_rows):
        summary.fold({k: v[lo:lo + log.chunk_rows] for k, v in c.items()})
    summary.fold_not_sent(not_sent)
    return summary


def scenario_results(source: RequestLog | RunSummary, scenario: Scenario, *, mode: str,
                     not_sent: Sequence[float] | np.ndarray = (), **extra: Any) -> dict[str, Any]:
    """The results JSON of a run of ``scenario`` (its window, nodes and offered load), plus ``extra`` keys:
    from a summary folded as the run went, or from the rows of a log that kept them (and the arrival times
    of the requests a load generator never sent)."""
    s = scenario
    if isinstance(source, RequestLog):
        source = _fold(source, warmup_s=s.warmup_s, duration_s=s.duration_s, nodes=len(s.nodes), not_sent=not_sent)
    elif len(not_sent):
        raise ValueError("not_sent goes with a log; fold it into a summary with RunSummary.fold_not_sent")
    open_loop = s.workload.arrival != "closed"
    return results_of(
        source, scenario=s.name, mode=mode, seed=s.seed, strategy=s.balancer.strategy,
        node_ids=[n.id for n in s.nodes], node_workers=[n.workers for n in s.nodes],
        extra={"offered_rate_per_s": s.workload.rate_per_s if open_loop else None,
               "load": s.workload.rate_per_s / s.capacity_per_s if open_loop else None, **extra})
