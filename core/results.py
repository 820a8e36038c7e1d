"""Per-request records and the results summary, one schema for simulated and live runs.

Theory of operation
-------------------
A run records one flat row per request: when it arrived, which node took it
(-1: none), when its service started (NaN: never served), when its response
was complete, and how it ended (:class:`Outcome`). The simulator and the live
load generator append rows as responses complete; :func:`summarize` turns the
rows into the results JSON both modes share::

    {"scenario", "mode", "seed", "strategy", "duration_s",
     "requests": {"sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors"},
     "errors_detail": {"server", "connect", "no_backend", "timeout", "not_sent"},
     "throughput_rps", "latency_ms": {mean, p50, p90, p95, p99, max},
     "nodes": {id: {"requests", "share", "utilization", "latency_ms": {...}}}}

Only requests that arrived inside the measurement window ``[warmup_s,
duration_s)`` count; latency is the response time (arrival to complete
response) of requests that ended OK. ``not_sent`` are the arrival times of
requests a live load generator had scheduled but never sent (too many
outstanding, or the run's time was up): they count as sent and failed, so the
counts still add up to the simulator's for the same arrivals.

Rows go into ``array.array`` columns: appending costs about as much as a list
append, memory is 8 bytes a value rather than a boxed float, and
``numpy.frombuffer`` reads the columns without copying.
"""

from __future__ import annotations

import enum
from array import array
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

if TYPE_CHECKING:
    from core.scenario import Scenario

__all__ = ["ERROR_CODES", "LATENCY_KEYS", "OUTCOME_STATUS", "Outcome", "RequestLog", "latency_stats", "outcome_of",
           "scenario_results", "summarize"]


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


class RequestLog:
    """Columns of per-request rows; append with :meth:`record`."""

    __slots__ = ("arrival", "node", "start", "end", "outcome")

    def __init__(self) -> None:
        self.arrival = array("d")
        self.node = array("i")
        self.start = array("d")
        self.end = array("d")
        self.outcome = array("b")

    def record(self, arrival: float, node: int, start: float, end: float, outcome: int) -> None:
        self.arrival.append(arrival)
        self.node.append(node)
        self.start.append(start)
        self.end.append(end)
        self.outcome.append(outcome)

    def __len__(self) -> int:
        return len(self.arrival)

    def columns(self) -> dict[str, np.ndarray]:
        """The rows as numpy arrays (zero-copy views)."""
        def view(col: array, dtype: Any) -> np.ndarray:
            return np.frombuffer(col, dtype=dtype) if len(col) else np.empty(0, dtype=dtype)
        return {
            "arrival": view(self.arrival, np.float64),
            "node": view(self.node, np.intc),
            "start": view(self.start, np.float64),
            "end": view(self.end, np.float64),
            "outcome": view(self.outcome, np.int8),
        }


def latency_stats(seconds: np.ndarray) -> dict[str, float | None]:
    """Mean, percentiles and max of response times, in milliseconds (None when empty)."""
    if seconds.size == 0:
        return {k: None for k in LATENCY_KEYS}
    ms = seconds * 1000.0
    p50, p90, p95, p99 = np.percentile(ms, [50, 90, 95, 99])
    return {"mean": float(ms.mean()), "p50": float(p50), "p90": float(p90), "p95": float(p95),
            "p99": float(p99), "max": float(ms.max())}


def summarize(log: RequestLog, *, scenario: str, mode: str, seed: int, strategy: str, duration_s: float,
              warmup_s: float, node_ids: Sequence[str], node_workers: Sequence[int],
              extra: dict[str, Any] | None = None, not_sent: Sequence[float] | np.ndarray = ()) -> dict[str, Any]:
    """The results JSON of one run (see the module docstring)."""
    c = log.columns()
    window = (c["arrival"] >= warmup_s) & (c["arrival"] < duration_s)
    unsent_at = np.asarray(not_sent, dtype=np.float64)
    unsent = int(((unsent_at >= warmup_s) & (unsent_at < duration_s)).sum())
    outcome, node = c["outcome"][window], c["node"][window]
    response = (c["end"] - c["arrival"])[window]
    ok = outcome == Outcome.OK
    counts = np.bincount(outcome.astype(np.intp), minlength=len(Outcome))
    measured_s = duration_s - warmup_s
    routed = int((node >= 0).sum())

    # Utilization: the part of every service interval that lies inside the window,
    # whenever the request arrived (a backlog served later still kept workers busy).
    served_all = ~np.isnan(c["start"])
    busy = np.clip(np.minimum(c["end"], duration_s) - np.maximum(c["start"], warmup_s), 0.0, None)

    nodes: dict[str, Any] = {}
    for i, (node_id, workers) in enumerate(zip(node_ids, node_workers)):
        mine = node == i
        n = int(mine.sum())
        nodes[node_id] = {
            "requests": n,
            "share": n / routed if routed else 0.0,
            "utilization": float(busy[served_all & (c["node"] == i)].sum()) / (workers * measured_s),
            "latency_ms": latency_stats(response[mine & ok]),
        }

    result = {
        "scenario": scenario,
        "mode": mode,
        "seed": seed,
        "strategy": strategy,
        "duration_s": duration_s,
        "warmup_s": warmup_s,
        "requests": {
            "sent": int(window.sum()) + unsent,
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
        "latency_ms": latency_stats(response[ok]),
        "nodes": nodes,
    }
    if extra:
        result.update(extra)
    return result


def scenario_results(log: RequestLog, scenario: Scenario, *, mode: str, not_sent: Sequence[float] | np.ndarray = (),
                     **extra: Any) -> dict[str, Any]:
    """:func:`summarize` for a run of ``scenario`` (its window, nodes and offered load), plus ``extra`` keys."""
    s = scenario
    open_loop = s.workload.arrival != "closed"
    return summarize(
        log, scenario=s.name, mode=mode, seed=s.seed, strategy=s.balancer.strategy, duration_s=s.duration_s,
        warmup_s=s.warmup_s, node_ids=[n.id for n in s.nodes], node_workers=[n.workers for n in s.nodes],
        not_sent=not_sent,
        extra={"offered_rate_per_s": s.workload.rate_per_s if open_loop else None,
               "load": s.workload.rate_per_s / s.capacity_per_s if open_loop else None, **extra})
