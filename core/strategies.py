"""Load-balancing strategies: pick one backend from a snapshot.

Theory of operation
-------------------
A balancer (live or simulated) keeps the truth about its backends: how many
requests each has in flight, whether its health checks pass, how fast it has
been answering. Before each request it hands the strategy an immutable
:class:`Backend` snapshot per backend and gets one of them back. A strategy
never reaches into the balancer; the only state it keeps is its own (a
round-robin cursor, smooth-weighted credits), and its only randomness is the
``random.Random`` it was given, so a seeded run picks the same way every time.

Every strategy:

* considers only healthy backends and raises :class:`NoHealthyBackend` when
  there are none;
* is registered by name in :data:`STRATEGIES`, which is also the CLI's list of
  choices; :func:`make_strategy` builds one by name.

The strategies, from blind to informed:

``round_robin``            each backend in turn.
``random``                 uniformly at random.
``weighted_round_robin``   in proportion to ``weight`` (the node's workers),
                           interleaved smoothly (nginx's algorithm).
``least_connections``      fewest requests in flight (student exercise 2).
``weighted_least_connections``  fewest in flight per worker, counting the one
                           about to be sent: ``(active + 1) / weight``, the
                           "shortest expected delay" rule, which on nodes of
                           mixed size beats plain least connections.
``power_of_two``           the less loaded of two picked at random.
``least_response_time``    lowest ``latency_ewma_s * (active + 1)``
                           (peak-EWMA, as in Finagle and Linkerd).
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from typing import Callable, Protocol, Sequence

from core.errors import DataError
from core.exercise import ExerciseNotImplemented

__all__ = [
    "Backend", "NoHealthyBackend", "Strategy", "STRATEGIES", "make_strategy", "register",
    "RoundRobinStrategy", "RandomStrategy", "WeightedRoundRobinStrategy",
    "LeastConnectionsStrategy", "WeightedLeastConnectionsStrategy", "PowerOfTwoStrategy",
    "LeastResponseTimeStrategy",
]


@dataclass(frozen=True, slots=True)
class Backend:
    """What a strategy may know of one backend at the moment of a pick.

    ``active_connections`` requests in flight to it, ``weight`` its capacity in
    workers (>= 1), ``healthy`` whether it may receive traffic,
    ``latency_ewma_s`` its recent response time in seconds (None: not measured yet).
    Snapshots are built by drivers on every pick, so they are not validated here;
    node configuration is.
    """

    id: str
    address: str = ""
    active_connections: int = 0
    weight: int = 1
    healthy: bool = True
    latency_ewma_s: float | None = None


class NoHealthyBackend(DataError, LookupError):
    """None of the ``total`` backends offered is healthy."""

    def __init__(self, total: int) -> None:
        super().__init__(f"no healthy backend among {total}")
        self.total = total


class Strategy(Protocol):
    """One method: pick a healthy backend from the snapshots."""

    name: str

    def select_node(self, backends: Sequence[Backend]) -> Backend: ...


#: name -> strategy class; the CLI's ``--strategy`` choices.
STRATEGIES: dict[str, type[BaseStrategy]] = {}


def register(name: str) -> Callable[[type[BaseStrategy]], type[BaseStrategy]]:
    """Class decorator: make a strategy available as ``name``."""
    def decorate(cls: type[BaseStrategy]) -> type[BaseStrategy]:
        if name in STRATEGIES:
            raise ValueError(f"strategy {name!r} is registered twice")
        cls.name = name
        STRATEGIES[name] = cls
        return cls
    return decorate


def make_strategy(name: str, *, rng: random.Random | None = None) -> BaseStrategy:
    """Build the strategy registered as ``name`` with the given random generator."""
    try:
        cls = STRATEGIES[name]
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}") from None
    return cls(rng=rng)


class BaseStrategy(abc.ABC):
    """Shared plumbing: the injected generator and the healthy filter."""

    name = "base"

    def __init__(self, *, rng: random.Random | None = None) -> None:
        # Seeded by the caller for reproducible runs; a fixed seed otherwise, never the global one.
        self.rng = rng if rng is not None else random.Random(0)
        self._cursor = 0

    @staticmethod
    def healthy(backends: Sequence[Backend]) -> list[Backend]:
        """The healthy backends, in the order given; NoHealthyBackend if there are none."""
        out = [b for b in backends if b.healthy]
        if not out:
            raise NoHealthyBackend(len(backends))
        return out

    def _rotate(self, candidates: Sequence[Backend]) -> Backend:
        """The next of ``candidates`` in turn (used for round robin and to break ties)."""
        choice = candidates[self._cursor % len(candidates)]
        self._cursor += 1
        return choice

    @abc.abstractmethod
    def select_node(self, backends: Sequence[Backend]) -> Backend:
        """Pick one healthy backend from ``backends``."""


@register("round_robin")
class RoundRobinStrategy(BaseStrategy):
    """Each healthy backend in turn: over any n consecutive picks from a fixed
    set of k, every backend gets floor(n/k) or ceil(n/k)."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        return self._rotate(self.healthy(backends))


@register("random")
class RandomStrategy(BaseStrategy):
    """A healthy backend uniformly at random."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        return self.rng.choice(self.healthy(backends))


@register("least_connections")
class LeastConnectionsStrategy(BaseStrategy):
    """The healthy backend with the fewest ``active_connections``."""

    # -- student exercise 2 -------------------------------------------------
    def select_node(self, backends: Sequence[Backend]) -> Backend:
        """Return a healthy backend whose ``active_connections`` is the smallest.

        Start from ``candidates = self.healthy(backends)`` (it raises
        NoHealthyBackend for you). Several backends may share the minimum:
        break the tie with ``self.rng.choice(...)`` or ``self._rotate(...)``,
        never by always taking the first, or the first backend in the list
        gets every request whenever the system is idle.
        """
        raise ExerciseNotImplemented(
            "least-connections", "LeastConnectionsStrategy.select_node", "core/strategies.py",
            "solutions/least_connections_solution.py",
            "pick a healthy backend with the fewest active connections, breaking ties fairly",
        )


@register("weighted_least_connections")
class WeightedLeastConnectionsStrategy(BaseStrategy):
    """Lowest ``(active_connections + 1) / weight``; ties go to the larger node, then in turn.

    Counting the request about to be sent matters: with ``active / weight`` an idle
    1-worker node and an idle 4-worker node tie, although the next request is
    four times as likely to wait on the small one's next arrival.
    """

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        candidates = self.healthy(backends)
        # Compare (a+1)/w exactly, without division: x/y < u/v  <=>  x*v < u*y.
        best = [candidates[0]]
        for b in candidates[1:]:
            top = best[0]
            lhs = (b.active_connections + 1) * top.weight
            rhs = (top.active_connections + 1) * b.weight
            if lhs < rhs or (lhs == rhs and b.weight > top.weight):
                best = [b]
            elif lhs == rhs and b.weight == top.weight:
                best.append(b)
        return best[0] if len(best) == 1 else self._rotate(best)


@register("power_of_two")
class PowerOfTwoStrategy(BaseStrategy):
    """Sample two distinct healthy backends at random; send to the one with fewer in flight."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        candidates = self.healthy(backends)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return b if b.active_connections < a.active_connections else a


@register("weighted_round_robin")
class WeightedRoundRobinStrategy(BaseStrategy):
    """Smooth weighted round robin (nginx): in every run of ``sum(weights)`` picks
    over a fixed set, each backend gets exactly its weight, spread out evenly."""

    def __init__(self, *, rng: random.Random | None = None) -> None:
        super().__init__(rng=rng)
        self._credit: dict[str, int] = {}

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        candidates = self.healthy(backends)
        credit = self._credit
        if len(credit) > 2 * len(candidates) + 8:
            # Forget backends that left, so churn cannot grow the table without bound.
            ids = {b.id for b in candidates}
            for gone in [k for k in credit if k not in ids]:
                del credit[gone]
        total = 0
        best: Backend | None = None
        best_credit = 0
        for b in candidates:
            c = credit.get(b.id, 0) + b.weight
            credit[b.id] = c
            total += b.weight
            if best is None or c > best_credit:
                best, best_credit = b, c
        assert best is not None
        credit[best.id] = best_credit - total
        return best


@register("least_response_time")
class LeastResponseTimeStrategy(BaseStrategy):
    """Lowest expected wait ``latency_ewma_s * (active_connections + 1)`` (peak-EWMA).

    A backend not measured yet is scored with the fastest measured latency (or 0
    when none is), so new backends get traffic and are measured quickly without
    being flooded. Ties go in turn.
    """

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        candidates = self.healthy(backends)
        known = [b.latency_ewma_s for b in candidates if b.latency_ewma_s is not None]
        default = min(known) if known else 0.0
        best: list[Backend] = []
        best_score = float("inf")
        for b in candidates:
            latency = b.latency_ewma_s if b.latency_ewma_s is not None else default
            # The +1e-9 keeps "fewer in flight" meaningful when latencies are still 0.
            score = (latency + 1e-9) * (b.active_connections + 1)
            if score < best_score:
                best, best_score = [b], score
            elif score == best_score:
                best.append(b)
        return best[0] if len(best) == 1 else self._rotate(best)
