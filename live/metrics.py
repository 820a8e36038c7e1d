"""Prometheus metrics for the live processes (``GET /metrics``), via prometheus-client.

Each app owns a ``CollectorRegistry`` of its own, so several servers in one
process (the tests, the benchmarks) never mix their numbers. Path labels are
limited to the known endpoints, so a scan of random URLs cannot blow up the
number of series.
"""

from __future__ import annotations

from collections import Counter as Tally
from typing import Any, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["BalancerMetrics", "NodeMetrics", "RegistryMetrics"]

_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
_NODE_PATHS = {"/health", "/work", "/stats", "/queue-stats", "/circuit-status", "/discovery-status", "/peers",
               "/metrics", "/admin/faults"}


class NodeMetrics:
    def __init__(self, node_id: str) -> None:
        self.registry = CollectorRegistry()
        labels = {"registry": self.registry}
        self.requests = Counter("testbed_node_requests", "Requests answered, by path and status",
                                ["node", "path", "status"], **labels)
        self.rejections = Counter("testbed_node_rejections", "Requests refused or failed, by reason",
                                  ["node", "reason"], **labels)
        self.latency = Histogram("testbed_node_latency_seconds", "Time to answer, by path", ["node", "path"],
                                 buckets=_BUCKETS, **labels)
        self.in_flight = Gauge("testbed_node_in_flight", "Requests inside the node", ["node"], **labels)
        self.queue = Gauge("testbed_node_queue_depth", "Requests waiting for a worker", ["node"], **labels)
        self.busy = Gauge("testbed_node_busy_workers", "Workers serving a request", ["node"], **labels)
        self.breaker = Gauge("testbed_node_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open",
                             ["node"], **labels)
        self.node = node_id
        self._tally: Tally[str] = Tally()

    def observe(self, path: str, status: int, seconds: float) -> None:
        path = path if path in _NODE_PATHS else "other"
        self.requests.labels(self.node, path, str(status)).inc()
        self.latency.labels(self.node, path).observe(seconds)
        self._tally[str(status)] += 1

    def rejected(self, reason: str) -> None:
        self.rejections.labels(self.node, reason).inc()

    def counts(self) -> dict[str, int]:
        """Responses by status code, for ``/stats``."""
        return dict(self._tally)

    def render(self, state: Any) -> bytes:
        self.in_flight.labels(self.node).set(state.active)
        self.queue.labels(self.node).set(len(state.workers.waiting))
        self.busy.labels(self.node).set(state.workers.busy)
        if state.breaker is not None:
            self.breaker.labels(self.node).set(
                {"CLOSED": 0, "HALF_OPEN": 1, "OPEN": 2}[state.breaker.status(now=state.clock())["state"]])
        return generate_latest(self.registry)


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
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("testbed_lb_requests", "Proxied requests, by backend and status",
                                ["backend", "status"], registry=self.registry)
        self.latency = Histogram("testbed_lb_latency_seconds", "Time to answer through the balancer",
                                 ["backend"], buckets=_BUCKETS, registry=self.registry)
        self.active = Gauge("testbed_lb_active", "Requests in flight, by backend", ["backend"], registry=self.registry)
        self.healthy = Gauge("testbed_lb_backend_healthy", "1 if the backend gets traffic", ["backend"],
                             registry=self.registry)

    def render(self, backends: Iterable[tuple[str, int, bool]]) -> bytes:
        for name, active, healthy in backends:
            self.active.labels(name).set(active)
            self.healthy.labels(name).set(1 if healthy else 0)
        return generate_latest(self.registry)
