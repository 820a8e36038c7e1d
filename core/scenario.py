"""Scenarios: one description of a run, for the simulator and for live runs alike.

Theory of operation
-------------------
A scenario says what runs (nodes with their workers, service times,
middleware and scheduled faults; a balancer with its strategy) and what load
it gets (open-loop Poisson or constant arrivals, or a closed loop of clients
with think time), for how long, with which seed. It is written as TOML (see
``experiments/scenarios/``); this module turns the parsed mapping into frozen
dataclasses and validates every key on the way, so a bad file fails with one
message naming the key, the value and what is allowed, before anything runs::

    seed.toml: nodes[2].workers = 0: must be an integer >= 1

A ``[[nodes]]`` table with ``count = N`` stands for N nodes alike but for
their ids, ``<id>-1`` .. ``<id>-N`` (a thousand-node scenario is one table);
:meth:`Scenario.with_nodes` changes that number, keeping the offered load.
``to_dict`` writes every node out, so it reads back as the same scenario.

Reading the file is the caller's job (``experiments.scenarios.load``): this
module only sees mappings, so it stays free of I/O like the rest of ``core``.
Units are in the names: ``_s`` seconds, ``_ms`` milliseconds, ``_per_s`` a rate.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from core._validate import ConfigError
from core.circuit_breaker import CircuitBreaker
from core.errors import DataError
from core.strategies import STRATEGIES

__all__ = [
    "ARRIVALS", "BalancerSpec", "BreakerSpec", "Fault", "MAX_NODES", "NodeSpec", "SERVICES", "Scenario",
    "ScenarioError", "Workload",
]

ARRIVALS = ("poisson", "constant", "closed")
MAX_NODES = 10_000  # in one scenario, ``count`` included: each is a simulated (or live) process with its state
SERVICES = ("exponential", "deterministic")


class ScenarioError(DataError, ValueError):
    """A scenario key has a bad value (or is unknown, or missing); ``key`` is its dotted path.

    ``key`` None: the file as a whole is at fault (missing, not TOML, not UTF-8); ``problem`` says where.
    """

    def __init__(self, source: str, key: str | None, value: Any, problem: str) -> None:
        shown = "(missing)" if value is _MISSING else repr(value)
        super().__init__(f"{source}: {problem}" if key is None else f"{source}: {key} = {shown}: {problem}")
        self.source = source
        self.key = key
        self.value = value
        self.problem = problem


class _Missing:
    """The value of a key that is not there: one instance, which pickling keeps one."""

    def __reduce__(self) -> str:
        return "_MISSING"

    def __repr__(self) -> str:
        return "(missing)"


_MISSING = _Missing()


@dataclass(frozen=True)
class Workload:
    """The offered load. ``rate_per_s`` for open loops; ``clients`` distinct client ids
    (and, for ``closed``, that many clients each waiting ``think_time_ms`` on average
    between a response and its next request)."""

    arrival: str = "poisson"
    rate_per_s: float = 10.0
    clients: int = 1
    think_time_ms: float = 0.0


@dataclass(frozen=True)
class Fault:
    """Between ``start_s`` and ``end_s``: requests fail with probability ``error_rate``,
    take ``extra_latency_ms`` longer, or (``down``) the node is not there at all."""

    start_s: float
    end_s: float
    error_rate: float = 0.0
    extra_latency_ms: float = 0.0
    down: bool = False


@dataclass(frozen=True)
class BreakerSpec:
    """Parameters of a :class:`core.circuit_breaker.CircuitBreaker`, checked by the breaker's own
    rules on construction (ConfigError naming the field), so no caller checks them again."""

    failure_threshold: int = 3
    recovery_timeout_s: float = 5.0
    half_open_max_calls: int = 1
    success_threshold: int = 1

    def __post_init__(self) -> None:
        CircuitBreaker(self.failure_threshold, self.recovery_timeout_s, self.half_open_max_calls,
                       self.success_threshold)


@dataclass(frozen=True)
class NodeSpec:
    """One node: ``workers`` requests served at once, the rest wait FIFO; a request on the
    work endpoint takes ``load_factor_ms`` on average, drawn from ``service``."""

    id: str
    workers: int = 1
    load_factor_ms: float = 25.0
    service: str = "exponential"
    rate_limit_per_s: float | None = None
    rate_limit_burst: float | None = None
    backpressure: int | None = None
    circuit_breaker: BreakerSpec | None = None
    faults: tuple[Fault, ...] = ()
    max_per_client: int | None = None  # the client bulkhead: requests of one client inside at most

    @property
    def capacity_per_s(self) -> float:
        """Requests per second the node completes when always busy."""
        return self.workers * 1000.0 / self.load_factor_ms


@dataclass(frozen=True)
class BalancerSpec:
    """The balancer: a strategy name from ``core.strategies``, health checks every
    ``health_check_interval_s`` (a node is unhealthy after ``unhealthy_after`` failed
    checks), one retry on another backend when a connection fails, and passive
    ejection: a per-backend circuit breaker takes a node out for ``ejection_time_s``
    after ``eject_after_failures`` consecutive 5xx or refused connections (0: never).
    A response slower than ``timeout_s`` reaches the client as a 504 at that time."""

    strategy: str = "round_robin"
    health_check_interval_s: float = 1.0
    unhealthy_after: int = 1
    retry_connect_failures: bool = True
    eject_after_failures: int = 5
    ejection_time_s: float = 5.0
    timeout_s: float = 30.0


@dataclass(frozen=True)
class Scenario:
    name: str
    nodes: tuple[NodeSpec, ...]
    seed: int = 0
    duration_s: float = 60.0
    warmup_s: float = 0.0
    workload: Workload = field(default_factory=Workload)
    balancer: BalancerSpec = field(default_factory=BalancerSpec)

    @property
    def capacity_per_s(self) -> float:
        """The sum of the nodes' capacities: the rate at which load = 1.0."""
        return sum(n.capacity_per_s for n in self.nodes)

    def with_load(self, load: float) -> Scenario:
        """The same scenario with an open-loop rate of ``load`` times its capacity."""
        return self.replace(rate_per_s=load * self.capacity_per_s)

    def with_nodes(self, count: int) -> Scenario:
        """The same scenario with ``count`` nodes like its own, at the same offered load.

        Only for nodes all alike but for their ids (one ``[[nodes]]`` table, with or without
        ``count``): the result is that table with ``count = N``, ids ``<id>-1`` .. ``<id>-N``
        (``<id>`` without a ``-1`` the first node's id ends in, so ``node-1`` becomes
        ``node-1`` .. ``node-N``). The open-loop rate scales with the capacity."""
        first = self.nodes[0]
        kinds = {dataclasses.replace(n, id="") for n in self.nodes}
        if len(kinds) > 1:
            raise ScenarioError(self.name, None, None, f"the number of nodes can change only when they are all alike "
                                f"but for their ids; these are of {len(kinds)} kinds")
        data = self.to_dict()
        base = first.id[:-2] if first.id.endswith("-1") else first.id
        data["nodes"] = [{**data["nodes"][0], "id": base, "count": count}]
        resized = Scenario.from_mapping(data, source="override")  # the count checked
        return resized.replace(rate_per_s=self.workload.rate_per_s * count / len(self.nodes))

    def replace(self, *, strategy: str | None = None, rate_per_s: float | None = None,
                duration_s: float | None = None, seed: int | None = None,
                warmup_s: float | None = None) -> Scenario:
        """A copy with command-line overrides applied (and validated). A shorter ``duration_s``
        keeps the warm-up within its first half unless ``warmup_s`` is given too."""
        data = self.to_dict()
        if strategy is not None:
            data["balancer"]["strategy"] = strategy
        if rate_per_s is not None:
            data["workload"]["rate_per_s"] = rate_per_s
        if duration_s is not None:
            data["duration_s"] = duration_s
            data["warmup_s"] = min(self.warmup_s, duration_s / 2)
        if seed is not None:
            data["seed"] = seed
        if warmup_s is not None:
            data["warmup_s"] = warmup_s
        return Scenario.from_mapping(data, source="override")

    def to_dict(self) -> dict[str, Any]:
        """Back to the mapping form (what ``from_mapping`` reads); Nones are left out."""
        def clean(obj: Any) -> Any:
            if isinstance(obj, dict):
                return {k: clean(v) for k, v in obj.items() if v is not None}
            if isinstance(obj, (list, tuple)):
                return [clean(v) for v in obj]
            return obj
        data = clean(dataclasses.asdict(self))
        for node in data["nodes"]:
            if "circuit_breaker" in node:
                node["circuit_breaker"] = dict(node["circuit_breaker"])
            if not node.get("faults"):
                node.pop("faults", None)
        return data

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], *, source: str = "scenario") -> Scenario:
        """Validate a parsed scenario; raise ScenarioError naming the first bad key."""
        top = _Reader(data, "", source)
        name = top.string("name")
        seed = top.integer("seed", 0, ge=0)
        duration = top.number("duration_s", 60.0, gt=0)
        warmup = top.number("warmup_s", 0.0, ge=0)
        if warmup >= duration:
            top.fail("warmup_s", data["warmup_s"], f"must be less than duration_s ({duration:g})")

        w = top.table("workload")
        arrival = w.choice("arrival", "poisson", ARRIVALS)
        workload = Workload(
            arrival=arrival,
            rate_per_s=w.number("rate_per_s", 10.0, gt=0),
            clients=w.integer("clients", 1, ge=1, le=1_000_000),
            think_time_ms=w.number("think_time_ms", 0.0, ge=0),
        )
        if arrival == "closed" and workload.think_time_ms <= 0:
            w.fail("think_time_ms", workload.think_time_ms,
                   "must be > 0 for a closed loop (a client refused at once would otherwise retry "
                   "in zero time forever); use e.g. 1 for back-to-back clients")
        w.finish()

        b = top.table("balancer")
        balancer = BalancerSpec(
            strategy=b.choice("strategy", "round_robin", tuple(STRATEGIES)),
            health_check_interval_s=b.number("health_check_interval_s", 1.0, gt=0),
            unhealthy_after=b.integer("unhealthy_after", 1, ge=1),
            retry_connect_failures=b.boolean("retry_connect_failures", True),
            eject_after_failures=b.integer("eject_after_failures", 5, ge=0),
            ejection_time_s=b.number("ejection_time_s", 5.0, gt=0),
            timeout_s=b.number("timeout_s", 30.0, gt=0),
        )
        b.finish()

        nodes: list[NodeSpec] = []
        seen: set[str] = set()
        for i, r in enumerate(top.tables("nodes", required=True)):
            group = _nodes(r, duration)
            for node in group:
                if node.id in seen:
                    top.fail(f"nodes[{i}].id", r.data["id"], "must be unique; another node has this id"
                             if len(group) == 1 and "count" not in r.data else
                             f"with count = {len(group)} makes ids {group[0].id} .. {group[-1].id}, "
                             f"and another node has the id {node.id!r}")
                seen.add(node.id)
                nodes.append(node)
            if len(nodes) > MAX_NODES:
                too_many = f"makes {len(nodes):,} nodes in all; a scenario has at most {MAX_NODES:,}"
                if "count" in r.data:
                    top.fail(f"nodes[{i}].count", r.data["count"], too_many)
                raise ScenarioError(top.source, None, None, f"nodes: {i + 1:,} tables {too_many}")
        top.finish()
        return cls(name, tuple(nodes), seed, duration, warmup, workload, balancer)


def _nodes(r: _Reader, duration: float) -> list[NodeSpec]:
    """One ``[[nodes]]`` table: one node, or with ``count = N`` N alike ones, ids ``<id>-1`` .. ``<id>-N``."""
    count = r.integer("count", None, ge=1, le=MAX_NODES, optional=True)
    node = _node(r, duration)
    if count is None:
        return [node]
    return [dataclasses.replace(node, id=f"{node.id}-{k}") for k in range(1, count + 1)]


def _node(r: _Reader, duration: float) -> NodeSpec:
    breaker: BreakerSpec | None = None
    raw = r.data.get("circuit_breaker", False)
    if raw is True:
        breaker = BreakerSpec()
    elif isinstance(raw, Mapping):
        br = r.table("circuit_breaker")
        try:
            breaker = BreakerSpec(
                failure_threshold=br.integer("failure_threshold", 3, ge=1),
                recovery_timeout_s=br.number("recovery_timeout_s", 5.0, gt=0),
                half_open_max_calls=br.integer("half_open_max_calls", 1, ge=1),
                success_threshold=br.integer("success_threshold", 1, ge=1),
            )
        except ConfigError as exc:
            br.fail(exc.field, exc.value, f"must be {exc.allowed}")
        br.finish()
    elif raw is not False:
        r.fail("circuit_breaker", raw, "must be true, false or a table of breaker settings")
    r.used.add("circuit_breaker")

    faults = []
    for f in r.tables("faults"):
        start = f.number("start_s", None, ge=0)
        end = f.number("end_s", None, gt=0)
        if end <= start:
            f.fail("end_s", f.data["end_s"], f"must be greater than start_s ({start:g})")
        faults.append(Fault(start, end, f.number("error_rate", 0.0, ge=0, le=1),
                            f.number("extra_latency_ms", 0.0, ge=0), f.boolean("down", False)))
        f.finish()
    node = NodeSpec(
        id=r.string("id"),
        workers=r.integer("workers", 1, ge=1, le=10_000),
        load_factor_ms=r.number("load_factor_ms", 25.0, gt=0),
        service=r.choice("service", "exponential", SERVICES),
        rate_limit_per_s=r.number("rate_limit_per_s", None, gt=0, optional=True),
        rate_limit_burst=r.number("rate_limit_burst", None, ge=1, optional=True),
        backpressure=r.integer("backpressure", None, ge=1, optional=True),
        circuit_breaker=breaker,
        faults=tuple(faults),
        max_per_client=r.integer("max_per_client", None, ge=1, optional=True),
    )
    r.finish()
    return node


class _Reader:
    """Reads keys of one table, remembering which were used, so unknown keys are reported."""

    def __init__(self, data: Any, path: str, source: str) -> None:
        self.path, self.source = path, source
        if not isinstance(data, Mapping):
            raise ScenarioError(source, path or "(top level)", data, "must be a table")
        self.data: Mapping[str, Any] = data
        self.used: set[str] = set()

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def fail(self, name: str, value: Any, problem: str) -> None:
        raise ScenarioError(self.source, self.key(name), value, problem)

    def _get(self, name: str, default: Any, optional: bool = False) -> Any:
        self.used.add(name)
        value = self.data.get(name, _MISSING)
        if value is _MISSING:
            if default is None and not optional:
                self.fail(name, _MISSING, "is required")
            return default
        return value

    def number(self, name: str, default: float | None, *, gt: float | None = None, ge: float | None = None,
               le: float | None = None, optional: bool = False) -> Any:
        value = self._get(name, default, optional)
        if value is None:
            return None
        bounds = " and ".join(b for b in [f"> {gt:g}" if gt is not None else "",
                                          f">= {ge:g}" if ge is not None else "",
                                          f"<= {le:g}" if le is not None else ""] if b)
        allowed = f"must be a number {bounds}".rstrip()
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            self.fail(name, value, allowed)
        if (gt is not None and value <= gt) or (ge is not None and value < ge) or (le is not None and value > le):
            self.fail(name, value, allowed)
        return float(value)

    def integer(self, name: str, default: int | None, *, ge: int | None = None, le: int | None = None,
                optional: bool = False) -> Any:
        value = self._get(name, default, optional)
        if value is None:
            return None
        bounds = " and ".join(b for b in [f">= {ge}" if ge is not None else "",
                                          f"<= {le}" if le is not None else ""] if b)
        if isinstance(value, bool) or not isinstance(value, int) or \
                (ge is not None and value < ge) or (le is not None and value > le):
            self.fail(name, value, f"must be an integer {bounds}".rstrip())
        return value

    def boolean(self, name: str, default: bool) -> bool:
        value = self._get(name, default)
        if not isinstance(value, bool):
            self.fail(name, value, "must be true or false")
        return value

    def string(self, name: str) -> str:
        value = self._get(name, None)
        if not isinstance(value, str) or not value.strip():
            self.fail(name, value, "must be a non-empty string")
        return value

    def choice(self, name: str, default: str, allowed: tuple[str, ...]) -> str:
        value = self._get(name, default)
        if value not in allowed:
            self.fail(name, value, f"must be one of: {', '.join(allowed)}")
        return value

    def table(self, name: str) -> _Reader:
        value = self._get(name, {}, optional=True)
        if not isinstance(value, Mapping):
            self.fail(name, value, "must be a table")
        return _Reader(value, self.key(name), self.source)

    def tables(self, name: str, *, required: bool = False) -> list[_Reader]:
        value = self._get(name, [], optional=True)
        if not isinstance(value, list) or (required and not value):
            self.fail(name, value, f"must be {'a non-empty' if required else 'an'} array of tables ([[{name}]])")
        return [_Reader(v, f"{self.key(name)}[{i}]", self.source) for i, v in enumerate(value)]

    def finish(self) -> None:
        unknown = sorted(set(self.data) - self.used)
        if unknown:
            known = ", ".join(sorted(self.used))
            self.fail(unknown[0], self.data[unknown[0]], f"unknown key; known keys here: {known}")
