"""Prometheus metrics for the live processes (``GET /metrics``), via prometheus-client.

Each app owns a ``CollectorRegistry`` of its own, so several servers in one
process (the tests, the benchmarks) never mix their numbers. Path labels are
limited to the known endpoints, so a scan of random URLs cannot blow up the
number of series.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["BalancerMetrics", "NodeMetrics", "RegistryMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NODE_PATHS = {"/health", "/work", "/stats", "/queue-stats", "/circuit-status", "/discovery-status", "/peers",
               "/metrics", "/admin/faults"}


def _observe(counts: dict[tuple[str, int], int], hists: dict[str, list[float]], label: str, status: int,
             seconds: float) -> None:
    """Count one response under (label, status) and add its latency to label's histogram
    (bucket counts, +Inf last, then the sum)."""
    key = (label, status)
    counts[key] = counts.get(key, 0) + 1
    hist = hists.get(label)
    if hist is None:
        hist = hists[label] = [0.0] * (len(_BUCKETS) + 2)
    hist[bisect_left(_BUCKETS, seconds)] += 1
    hist[-1] += seconds


class NodeMetrics:
    """Request counts and latency kept in plain dicts and lists on the hot path (no locks: one
    event loop thread), turned into Prometheus metric families only when ``/metrics`` is read."""

    def __init__(self, node_id: str) -> None:
        self.node = node_id
        self.counts_by: dict[tuple[str, int], int] = {}
        self.rejections: dict[str, int] = {}
        self.hist: dict[str, list[float]] = {}  # path -> bucket counts (+inf last), then sum
        self._state: Any = None
        self.registry = CollectorRegistry()
        self.registry.register(_NodeCollector(self))

    def observe(self, path: str, status: int, seconds: float) -> None:
        if path not in _NODE_PATHS:
            path = "other"
        _observe(self.counts_by, self.hist, path, status, seconds)

    def rejected(self, reason: str) -> None:
        self.rejections[reason] = self.rejections.get(reason, 0) + 1

    def counts(self) -> dict[str, int]:
        """Responses by status code, for ``/stats``."""
        out: dict[str, int] = {}
        for (_, status), n in self.counts_by.items():
            out[str(status)] = out.get(str(status), 0) + n
        return out

    def render(self, state: Any) -> bytes:
        self._state = state
        return generate_latest(self.registry)


class _NodeCollector(Collector):
    def __init__(self, metrics: NodeMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Any]:
        m, node = self.m, self.m.node
        requests = CounterMetricFamily("testbed_node_requests", "Requests answered, by path and status",
                                       labels=["node", "path", "status"])
        for (path, status), n in sorted(m.counts_by.items()):
            requests.add_metric([node, path, str(status)], n)
        yield requests
        rejections = CounterMetricFamily("testbed_node_rejections", "Requests refused or failed, by reason",
                                         labels=["node", "reason"])
        for reason, n in sorted(m.rejections.items()):
            rejections.add_metric([node, reason], n)
        yield rejections
        latency = HistogramMetricFamily("testbed_node_latency_seconds", "Time to answer, by path",
                                        labels=["node", "path"])
        for path, hist in sorted(m.hist.items()):
            _histogram(latency, [node, path], hist)
        yield latency
        state = m._state
        if state is None:
            return
        for name, doc, value in [
                ("testbed_node_in_flight", "Requests inside the node", state.active),
                ("testbed_node_queue_depth", "Requests waiting for a worker", state.pipeline.waiting),
                ("testbed_node_busy_workers", "Workers serving a request", state.pipeline.busy)]:
            g = GaugeMetricFamily(name, doc, labels=["node"])
            g.add_metric([node], value)
            yield g
        breaker = state.pipeline.breaker
        if breaker is not None:
            g = GaugeMetricFamily("testbed_node_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                                  labels=["node"])
            g.add_metric([node], {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}[
                breaker.status(now=state.clock())["state"]])
            yield g


class RegistryMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("testbed_registry_requests", "Requests answered, by path and status",
                                ["path", "status"], registry=self.registry)
        self.changes = Counter("testbed_registry_membership_changes", "Membership changes, by kind", ["kind"],
                               registry=self.registry)
        self.members = Gauge("testbed_registry_members", "Members, by status", ["status"], registry=self.registry)

    def render(self, counts: dict[str, int]) -> bytes:
        for status, n in counts.items():
            self.members.labels(status).set(n)
        return generate_latest(self.registry)


class BalancerMetrics:
    """Per-backend request counts and latency in plain dicts on the hot path, exposed on scrape."""

    def __init__(self) -> None:
        self.counts_by: dict[tuple[str, int], int] = {}
        self.hist: dict[str, list[float]] = {}
        self._backends: list[tuple[str, int, bool]] = []
        self.registry = CollectorRegistry()
        self.registry.register(_BalancerCollector(self))

    def observe(self, backend: str, status: int, seconds: float) -> None:
        _observe(self.counts_by, self.hist, backend, status, seconds)

    def render(self, backends: Iterable[tuple[str, int, bool]]) -> bytes:
        self._backends = list(backends)
        return generate_latest(self.registry)


def _histogram(family: HistogramMetricFamily, labels: list[str], hist: list[float]) -> None:
    cumulative, buckets = 0.0, []
    for bound, n in zip([*map(str, _BUCKETS), "+Inf"], hist[:-1]):
        cumulative += n
        buckets.append((bound, cumulative))
    family.add_metric(labels, buckets, hist[-1])


class _BalancerCollector(Collector):
    def __init__(self, metrics: BalancerMetrics) -> None:
        self.m = metrics

    def collect(self) -> Iterable[Any]:
        requests = CounterMetricFamily("testbed_lb_requests", "Proxied requests, by backend and status",
                                       labels=["backend", "status"])
        for (backend, status), n in sorted(self.m.counts_by.items()):
            requests.add_metric([backend, str(status)], n)
        yield requests
        latency = HistogramMetricFamily("testbed_lb_latency_seconds", "Time to answer through the balancer",
                                        labels=["backend"])
        for backend, hist in sorted(self.m.hist.items()):
            _histogram(latency, [backend], hist)
        yield latency
        active = GaugeMetricFamily("testbed_lb_active", "Requests in flight, by backend", labels=["backend"])
        healthy = GaugeMetricFamily("testbed_lb_backend_healthy", "1 if the backend gets traffic", labels=["backend"])
        for name, n, ok in self.m._backends:
            active.add_metric([name], n)
            healthy.add_metric([name], 1 if ok else 0)
        yield active
        yield healthy
