"""Timelines: a run per interval, overall and per node, and its state changes; one schema for sim and live.

Theory of operation
-------------------
A run's results (:mod:`core.results`) say what its measurement window added
up to; a :class:`Timeline` says how it went. It folds the same chunks of
request rows (``arrival``, ``node``, ``start``, ``end``, ``outcome``) the
run's summary folds, as they are handed on, and keeps per interval of
``interval_s`` seconds, overall and per node:

* ``requests`` and each outcome: ``ok``, ``rate_limited``, ``backpressure``,
  ``circuit_open``, ``errors`` (5xx, refused connections, no backend,
  timeouts) of the requests whose response **completed** in the interval, as
  a scraper of the servers' counters would count them. (The run's window
  counts requests by arrival; a timeline counts what happened when.)
* ``throughput_rps``: OK responses completed in the interval per second;
* ``p50_ms``, ``p95_ms``, ``p99_ms``: response time (arrival to response)
  of those OK responses, from a t-digest of ``INTERVAL_CENTROIDS``
  centroids per interval and node (exact up to that many responses; null
  when there were none);
* ``in_flight``: requests sent and not yet answered at the interval's end
  (what a gauge scraped then reads);
* ``share`` (per node): its part of the interval's requests that a node
  took; ``utilization`` (per node, and the overall mean): the time its
  workers spent serving inside the interval over ``workers * interval_s``.

The first interval starts at the run's time 0 (the first arrival's clock);
intervals go on past ``duration_s`` while responses still complete (the
drain), at most ``MAX_INTERVALS`` of them (:func:`default_interval_s` is one
second, or longer for a run of more than an hour); a row later than that is counted
in ``"later"``.

State changes are :class:`TimelineEvent` values (a time, a target, a kind,
from, to) handed in by the driver from the core objects' own event logs:
the node breakers', the balancer's (:meth:`core.balancer_state.BalancerState.drain_events`:
health and ejector), the registry's membership changes
(:func:`membership_events`) and the scenario's faults
(:func:`fault_events`, the same for a simulated and a live run).

:meth:`Timeline.as_dict` is the ``"timeline"`` of the results JSON, in
columns, so ``pandas.DataFrame(timeline["overall"], index=timeline["t"])``
reads it directly::

    {"interval_s": 1.0, "t": [0.0, 1.0, ...], "later": 0,
     "overall": {"requests": [...], "ok": [...], ..., "in_flight": [...], "utilization": [...]},
     "nodes": {"node-1": {"requests": [...], ..., "share": [...], "utilization": [...]}, ...},
     "nodes_omitted": 0,
     "events": [{"t": 20.0, "target": "node-1", "kind": "health", "from": "up", "to": "down"}, ...]}

Per-node series are kept for at most ``node_series`` nodes (default
``TIMELINE_NODES``); a run over more nodes keeps the overall series only and
says how many it left out in ``"nodes_omitted"``. Memory is the counters and
digests of ``intervals x (nodes + 1)``, whatever the number of requests.

Pure numbers: no I/O, no clock; the same chunks fold into the same timeline.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
from fastdigest import TDigest, merge_all

from core.events import TimelineEvent, breaker_events, membership_events, restart_event
from core.results import Outcome

if TYPE_CHECKING:
    from core.scenario import Fault, Scenario

__all__ = ["EVENT_KINDS", "INTERVAL_CENTROIDS", "MAX_INTERVALS", "SERIES", "TIMELINE_NODES", "Timeline",
           "TimelineEvent", "breaker_events", "check_interval_s", "default_interval_s", "fault_events", "fault_pair",
           "membership_events", "restart_event", "smallest_interval_s"]

#: Intervals a timeline holds at most (an hour of 1 s intervals): a longer run needs a larger interval.
MAX_INTERVALS = 3600
#: Per-node series for at most this many nodes by default.
TIMELINE_NODES = 100
#: Centroids of each interval's t-digest: exact up to this many responses an interval and node (a digest
#: costs 4.6-7.9 KB, measured, while its interval is open).
INTERVAL_CENTROIDS = 200
#: An interval's percentiles settle (its digests reduced to three numbers) once the newest completion is this many
#: seconds past its end, or twice the balancer's timeout (:meth:`Timeline.for_scenario`): a response completes
#: at most a timeout after it was sent.
SETTLE_S = 30.0

#: The series of the overall part, in order; a node's adds ``share``.
SERIES = ("requests", "ok", "rate_limited", "backpressure", "circuit_open", "errors", "throughput_rps",
          "p50_ms", "p95_ms", "p99_ms", "in_flight", "utilization")
#: What an event is about: a node's breaker, the balancer's view of a backend (health, ejector), the registry's
#: membership, a scheduled fault.
EVENT_KINDS = ("breaker", "ejector", "health", "membership", "fault")

def smallest_interval_s(duration_s: float) -> float:
    """The smallest interval (seconds, three significant digits, rounded up) that fits a run of ``duration_s``
    in ``MAX_INTERVALS`` intervals."""
    least = duration_s / MAX_INTERVALS
    if least <= 0:
        return 0.0
    unit = 10.0 ** (math.floor(math.log10(least)) - 2)
    smallest = math.ceil(least / unit - 1e-9) * unit
    while duration_s / float(f"{smallest:.3g}") > MAX_INTERVALS + 1e-6:  # float rounding: step up until it fits
        smallest += unit
    return float(f"{smallest:.3g}")


def check_interval_s(interval_s: float, duration_s: float) -> None:
    """ValueError, naming the problem, unless ``interval_s`` is a positive number of seconds that cuts a run of
    ``duration_s`` into at most ``MAX_INTERVALS`` intervals (the message names the smallest that would)."""
    if not (isinstance(interval_s, (int, float)) and math.isfinite(interval_s) and interval_s > 0):
        raise ValueError(f"an interval must be a positive number of seconds, got {interval_s!r}")
    if duration_s / interval_s > MAX_INTERVALS + 1e-6:  # as floats first: a tiny interval overflows an integer
        needed = duration_s / interval_s
        count = f"{math.ceil(needed - 1e-9):,}" if needed < 1e15 else "over 10^15"
        raise ValueError(f"a run of {duration_s:g} s in intervals of {interval_s:g} s needs {count} intervals, "
                         f"more than a timeline holds ({MAX_INTERVALS:,}); give an interval of "
                         f"{smallest_interval_s(duration_s):g} s or more")


def default_interval_s(duration_s: float) -> float:
    """One second, or for a run too long for ``MAX_INTERVALS`` of them the first of 2, 5, 10, 20, 50, ...
    seconds that fits."""
    step = 1.0
    while duration_s / step > MAX_INTERVALS:
        step *= 2.5 if str(step).startswith("2") else 2.0
    return step


_OUTCOMES = len(Outcome)
_ERRORS = [int(o) for o in (Outcome.SERVER_ERROR, Outcome.CONNECT_ERROR, Outcome.NO_BACKEND, Outcome.TIMEOUT)]
_QUANTILES = (("p50_ms", 0.50), ("p95_ms", 0.95), ("p99_ms", 0.99))


def fault_pair(node_id: str, fault: Fault) -> tuple[TimelineEvent, TimelineEvent]:
    """One fault's two ``fault`` events, as scheduled: ``ok`` -> what (``down``, ``error_rate 0.5``,
    ``extra_latency_ms 200``) at its start, back to ``ok`` at its end. A live run re-dates them to when it played
    them."""
    what = ", ".join(part for part in (
        "down" if fault.down else "",
        f"error_rate {fault.error_rate:g}" if fault.error_rate else "",
        f"extra_latency_ms {fault.extra_latency_ms:g}" if fault.extra_latency_ms else "") if part) or "none"
    return (TimelineEvent(fault.start_s, node_id, "fault", "ok", what),
            TimelineEvent(fault.end_s, node_id, "fault", what, "ok"))


def fault_events(scenario: Scenario) -> list[TimelineEvent]:
    """The scenario's faults as scheduled (:func:`fault_pair`), node by node: what a simulated run plays."""
    return [event for node in scenario.nodes for f in node.faults for event in fault_pair(node.id, f)]


class Timeline:
    """Per-interval series of one run, folded from its request rows; see the module docstring."""

    def __init__(self, *, interval_s: float, duration_s: float, node_ids: Sequence[str], workers: Sequence[int],
                 node_series: int = TIMELINE_NODES, settle_s: float = SETTLE_S) -> None:
        """``settle_s``: how far behind the newest completion an interval's percentiles are settled (its
        digests reduced to three numbers); a row that completes earlier than that, later on, still counts,
        and its latency in ``"unsettled"`` only."""
        check_interval_s(interval_s, duration_s)
        if len(node_ids) != len(workers):
            raise ValueError("node_ids and workers differ in length")
        wanted = math.ceil(duration_s / interval_s - 1e-9)
        self.interval_s = float(interval_s)
        self.duration_s = float(duration_s)
        self.node_ids = list(node_ids)
        self.workers = np.asarray(workers, dtype=np.float64)
        self.per_node = len(node_ids) <= node_series
        self.settle_s = max(float(settle_s), 0.0)
        # Groups: 0 is "no node" (the balancer had none), 1 + i is node i; or one group for all when per-node
        # series are not kept.
        self._groups = len(node_ids) + 1 if self.per_node else 1
        self._size = 0
        empty = np.zeros((0, self._groups), dtype=np.float64)
        self._counts: np.ndarray = np.zeros((0, self._groups, _OUTCOMES), dtype=np.int64)
        self._sent: np.ndarray = empty.astype(np.int64)
        self._done: np.ndarray = empty.astype(np.int64)
        self._busy: np.ndarray = empty
        self._full: np.ndarray = empty.copy()
        self._settled: np.ndarray = np.zeros((0, self._groups + 1, len(_QUANTILES)))  # [:, -1]: overall
        self._grow(max(1, wanted))
        self._digests: dict[int, TDigest] = {}  # interval * groups + group -> digest of OK response times
        self._settled_to = 0   # intervals below this one have settled percentiles and no digests
        self._last_end = 0.0   # the newest completion folded (seconds)
        self._events: list[TimelineEvent] = []
        self.later = 0         # rows that completed after MAX_INTERVALS intervals
        self.unsettled = 0     # OK responses that came after their interval settled: counted, not in percentiles

    @classmethod
    def for_scenario(cls, scenario: Scenario, *, interval_s: float | None = None,
                     node_series: int = TIMELINE_NODES, scheduled_faults: bool = True) -> Timeline:
        """A run of ``scenario``'s timeline: its nodes and workers, intervals of ``interval_s`` (None:
        :func:`default_interval_s`), settled a balancer timeout behind (a response can be no later), and with
        ``scheduled_faults`` its faults already listed (:func:`fault_events`; a live run lists them as it
        played them instead). The simulator and the live runner both start here."""
        s = scenario
        timeline = cls(interval_s=default_interval_s(s.duration_s) if interval_s is None else interval_s,
                       duration_s=s.duration_s, node_ids=[n.id for n in s.nodes], workers=[n.workers for n in s.nodes],
                       node_series=node_series, settle_s=max(SETTLE_S, 2.0 * s.balancer.timeout_s))
        if scheduled_faults:
            timeline.add_events(fault_events(s))
        return timeline

    def _grow(self, size: int) -> None:
        """Hold at least ``size`` intervals (the counters grow as responses complete later). The counters by
        arrival and completion have one row more: where rows past ``MAX_INTERVALS`` go, so that they still
        count as in flight in every interval shown."""
        if size <= self._size:
            return
        size = min(MAX_INTERVALS, max(size, 2 * self._size))

        def grown(a: np.ndarray, rows: int, fill: float = 0) -> np.ndarray:
            out = np.full((rows, *a.shape[1:]), fill, dtype=a.dtype)
            out[:a.shape[0]] = a
            return out
        self._counts = grown(self._counts, size)  # (interval, group, outcome), by completion
        self._sent = grown(self._sent, size + 1)  # (interval, group): requests by arrival interval
        self._done = grown(self._done, size + 1)  # the same by completion interval
        self._busy = grown(self._busy, size)      # seconds served in the first and last interval of a service
        self._full = grown(self._full, size + 1)  # whole intervals between them, as differences (seconds)
        self._settled = grown(self._settled, size, math.nan)
        self._size = size

    # -- folding ----------------------------------------------------------------
    def fold(self, columns: Mapping[str, np.ndarray]) -> None:
        """Add one chunk of rows (the columns of :data:`core.results.COLUMNS`)."""
        arrival, node, start, end, outcome = (columns[k] for k in ("arrival", "node", "start", "end", "outcome"))
        if not arrival.size:
            return
        step, g = self.interval_s, self._groups
        group = (node.astype(np.int64) + 1) if self.per_node else np.zeros(node.size, dtype=np.int64)
        group = np.clip(group, 0, g - 1)
        done = np.floor(np.maximum(end, 0.0) / step).astype(np.int64)
        self._grow(int(done.max()) + 1)
        size = self._size
        sent = np.minimum(np.floor(np.maximum(arrival, 0.0) / step).astype(np.int64), size)
        late = done >= size
        if late.any():
            # Past the last interval: counted in "later", and in flight in every interval after its arrival.
            self.later += int(late.sum())
            done = np.minimum(done, size)
        self._sent += np.bincount(sent * g + group, minlength=self._sent.size).reshape(self._sent.shape)
        self._done += np.bincount(done * g + group, minlength=self._done.size).reshape(self._done.shape)
        self._last_end = max(self._last_end, float(end.max()))
        if late.any():
            keep = ~late
            arrival, node, start, end, outcome, done, group = (
                a[keep] for a in (arrival, node, start, end, outcome, done, group))

        key = done * g + group
        self._counts += np.bincount(key * _OUTCOMES + outcome.astype(np.int64),
                                    minlength=self._counts.size).reshape(self._counts.shape)
        served = ~np.isnan(start) & (node >= 0)
        if served.any():
            self._fold_busy(start[served], end[served], group[served])
        ok = outcome == Outcome.OK
        if ok.any():
            self._fold_latency(key[ok], (end - arrival)[ok])
        self._settle(min(size, int((self._last_end - self.settle_s) // step)))

    def _fold_busy(self, start: np.ndarray, end: np.ndarray, group: np.ndarray) -> None:
        """Each service interval ``[start, end)`` split over the timeline's intervals: the first and last
        partly (``_busy``), the ones between wholly (a difference array, ``_full``)."""
        step, g, size = self.interval_s, self._groups, self._size
        # A response cut off by the balancer's timeout ends (for the client) before its service may even start:
        # such a row adds nothing, as in the run's summary.
        start = np.minimum(np.maximum(start, 0.0), end)
        a = np.floor(start / step).astype(np.int64)
        b = np.minimum(np.floor(end / step).astype(np.int64), size - 1)
        end = np.minimum(end, size * step)
        same = a == b
        first = np.where(same, end - start, (a + 1) * step - start)
        self._busy += np.bincount(a * g + group, weights=first, minlength=self._busy.size).reshape(self._busy.shape)
        apart = ~same & (b > a)
        if apart.any():
            last = end[apart] - b[apart] * step
            self._busy += np.bincount(b[apart] * g + group[apart], weights=last,
                                      minlength=self._busy.size).reshape(self._busy.shape)
            between = b[apart] - a[apart] > 1
            if between.any():
                lo, hi, grp = a[apart][between] + 1, b[apart][between], group[apart][between]
                flat = self._full.size
                self._full += (np.bincount(lo * g + grp, minlength=flat)
                               - np.bincount(hi * g + grp, minlength=flat)).reshape(self._full.shape) * step

    def _fold_latency(self, key: np.ndarray, response_s: np.ndarray) -> None:
        """OK response times into the digest of their (interval, group), one batch per digest; those of an
        interval already settled are only counted (``unsettled``)."""
        fresh = key >= self._settled_to * self._groups
        if not fresh.all():
            self.unsettled += int((~fresh).sum())
            key, response_s = key[fresh], response_s[fresh]
            if not key.size:
                return
        order = np.argsort(key, kind="stable")
        key, response_s = key[order], response_s[order]
        cuts = np.flatnonzero(np.diff(key)) + 1
        digests = self._digests
        for lo, hi in zip([0, *cuts.tolist()], [*cuts.tolist(), key.size]):
            k = int(key[lo])
            digest = digests.get(k)
            if digest is None:
                digest = digests[k] = TDigest(INTERVAL_CENTROIDS)
            digest.batch_update(response_s[lo:hi])  # type: ignore[arg-type]  # any float buffer

    def _settle(self, upto: int) -> None:
        """Reduce the digests of the intervals below ``upto`` to their percentiles (per group and overall):
        memory holds digests for the last ``settle_s`` of completions only."""
        g, digests = self._groups, self._digests
        for k in range(self._settled_to, max(upto, self._settled_to)):
            parts = []
            for group in range(g):
                digest = digests.pop(k * g + group, None)
                if digest is not None:
                    parts.append(digest)
                    self._settled[k, group] = [digest.quantile(q) for _, q in _QUANTILES]
            if parts:
                overall = parts[0] if len(parts) == 1 else merge_all(parts)
                self._settled[k, g] = [overall.quantile(q) for _, q in _QUANTILES]
        self._settled_to = max(upto, self._settled_to)

    def add_events(self, events: Iterable[TimelineEvent]) -> None:
        """State changes to show beside the series (any order; the output is sorted by time)."""
        self._events.extend(events)

    # -- reading ------------------------------------------------------------------
    def _span(self) -> int:
        """Intervals to show: up to the run's end, and on while responses still completed."""
        wanted = max(1, math.ceil(self.duration_s / self.interval_s - 1e-9))
        done = np.flatnonzero(self._counts.sum(axis=(1, 2)))
        return min(self._size, max(wanted, int(done[-1]) + 1 if done.size else 0))

    def as_dict(self) -> dict[str, Any]:
        """The ``"timeline"`` of the results JSON (see the module docstring). Every interval's percentiles
        are settled by then (the run is over)."""
        self._settle(self._size)
        n, g, step = self._span(), self._groups, self.interval_s
        counts = self._counts[:n]
        in_flight = (np.cumsum(self._sent, axis=0) - np.cumsum(self._done, axis=0))[:n]
        busy = (self._busy + np.cumsum(self._full, axis=0)[:-1])[:n]
        # The time each interval covers: all of it, but the last, which ends with the run (or its last response).
        end_s = min(max(self.duration_s, self._last_end), n * step)
        covered = np.clip(end_s - np.arange(n) * step, 0.0, step)
        covered[covered <= 0] = step
        settled = np.round(self._settled[:n] * 1000.0, 6)

        def series(c: np.ndarray, flight: np.ndarray, quantiles: np.ndarray) -> dict[str, list[Any]]:
            out: dict[str, list[Any]] = {
                "requests": c.sum(axis=1).tolist(),
                "ok": c[:, Outcome.OK].tolist(),
                "rate_limited": c[:, Outcome.RATE_LIMITED].tolist(),
                "backpressure": c[:, Outcome.BACKPRESSURE].tolist(),
                "circuit_open": c[:, Outcome.CIRCUIT_OPEN].tolist(),
                "errors": c[:, _ERRORS].sum(axis=1).tolist(),
                "throughput_rps": (c[:, Outcome.OK] / covered).tolist(),
            }
            for i, (name, _) in enumerate(_QUANTILES):
                out[name] = [None if math.isnan(v) else v for v in quantiles[:, i].tolist()]
            out["in_flight"] = flight.tolist()
            return out

        overall = series(counts.sum(axis=1), in_flight.sum(axis=1), settled[:, g])
        capacity = float(self.workers.sum())
        overall["utilization"] = (busy.sum(axis=1) / (capacity * covered) if capacity else np.zeros(n)).tolist()

        nodes: dict[str, dict[str, list[Any]]] = {}
        if self.per_node:
            routed = counts[:, 1:, :].sum(axis=2)  # requests a node took, per interval and node
            total = routed.sum(axis=1)
            for i, node_id in enumerate(self.node_ids):
                s = series(counts[:, i + 1, :], in_flight[:, i + 1], settled[:, i + 1])
                s["share"] = [float(r / t) if t else None for r, t in zip(routed[:, i].tolist(), total.tolist())]
                s["utilization"] = (busy[:, i + 1] / (self.workers[i] * covered)).tolist()
                nodes[node_id] = s
        return {
            "interval_s": step,
            "t": [round(k * step, 9) for k in range(n)],
            "end_s": round(end_s, 9),
            "later": self.later,
            "unsettled": self.unsettled,
            "overall": overall,
            "nodes": nodes,
            "nodes_omitted": 0 if self.per_node else len(self.node_ids),
            "events": [e.as_dict() for e in sorted(self._events, key=lambda e: (e.t, e.target, e.kind))],
        }
