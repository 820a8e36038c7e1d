"""Load-balancing strategies: pick one backend from a snapshot (or, on a fast path, from a pick index).

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

Fast paths
----------
``select_node`` is the contract: it is what ``testbed check`` grades and what
every strategy, a student's or a third party's, must have. Over a snapshot of
``n`` backends it costs ``O(n)`` per pick, which at a thousand backends is
most of a simulation's time. So a strategy class may also declare a *fast
path* beside it, ``@fast_path(SomePicker)``: a
:class:`~core.pick_index.Picker` that applies the same rule to the
:class:`~core.pick_index.PickIndex` a balancer keeps up to date by events
(who is available; in flight, weight and latency per backend), without
snapshots. :func:`fast_picker` hands the balancer that picker only while the
strategy object's ``select_node`` is still the very function the fast path
was declared with: a subclass or an instance that overrides ``select_node``
loses the fast path silently and is driven through snapshots, as is any
strategy that declares none (the exercise stub ``LeastConnectionsStrategy``
declares none on purpose: the student's method is what runs and is graded;
the reference solution declares one).

A fast pick is one the strategy's rule allows on the snapshot at that moment
(the same argmin set for the least-* rules, any available backend for the
others; ``tests/core/test_pick_index.py`` checks it on random histories), but
not always the same one: ties, the round-robin order and the random draws are
the picker's own (seeded by the same ``rng``, so a seeded run is still
repeatable). Costs per pick, ``n`` available backends:

====================================  =======================================================
round robin, random, power of two     ``O(1)``: ``members[cursor % n]``, one or two draws
weighted round robin                  ``O(log n)``: earliest deadline first (Envoy's EDF); the
                                      same counts per cycle as nginx's order, ``O(n log n)``
                                      once after the available set or a weight changes
least connections, weighted least     ``O(log n)``: a heap keyed by the rule's score,
connections, least response time      re-keyed when a backend's count or latency changes
====================================  =======================================================
"""

from __future__ import annotations

import abc
import random
from dataclasses import dataclass
from itertools import count
from typing import Any, Callable, ClassVar, Protocol, Sequence

from core.errors import DataError
from core.exercise import ExerciseNotImplemented
from core.pick_index import Member, Picker, RankedPicker, Ranking

__all__ = [
    "Backend", "FastPath", "NoHealthyBackend", "Strategy", "STRATEGIES", "expected_wait_s", "fast_path",
    "fast_picker", "make_strategy", "register",
    "RoundRobinStrategy", "RandomStrategy", "WeightedRoundRobinStrategy",
    "LeastConnectionsStrategy", "WeightedLeastConnectionsStrategy", "PowerOfTwoStrategy",
    "LeastResponseTimeStrategy",
    "RoundRobinPicker", "RandomPicker", "WeightedRoundRobinPicker", "WeightedLeastConnectionsPicker",
    "PowerOfTwoPicker", "LeastResponseTimePicker",
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


@dataclass(frozen=True)
class FastPath:
    """A strategy's fast path: the picker to build, and the ``select_node`` it stands for."""

    picker: Callable[[Any], Picker]
    select_node: Callable[..., Backend]


def fast_path(picker: Callable[[Any], Picker]) -> Callable[[type[BaseStrategy]], type[BaseStrategy]]:
    """Class decorator: ``picker`` applies this class's own ``select_node`` rule to a pick index.

    The class must define ``select_node`` itself: the declaration is tied to that function."""
    def decorate(cls: type[BaseStrategy]) -> type[BaseStrategy]:
        method = cls.__dict__.get("select_node")
        if method is None:
            raise TypeError(f"{cls.__name__} declares a fast path but no select_node of its own")
        cls.fast = FastPath(picker, method)
        return cls
    return decorate


def fast_picker(strategy: Strategy) -> Picker | None:
    """The picker of ``strategy``'s fast path, or None: it declares none, or its ``select_node``
    is no longer the one the fast path was declared with (then snapshots it is)."""
    fast = getattr(type(strategy), "fast", None)
    if not isinstance(fast, FastPath) or getattr(strategy.select_node, "__func__", None) is not fast.select_node:
        return None
    return fast.picker(strategy)


class BaseStrategy(abc.ABC):
    """Shared plumbing: the injected generator and the healthy filter."""

    name = "base"
    #: set by :func:`fast_path`; None: snapshots only.
    fast: ClassVar[FastPath | None] = None

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


class RoundRobinPicker(Picker):
    """Round robin's fast path: ``members[cursor % n]``, ``O(1)``. Over a fixed set the order is
    fixed, so every backend gets floor or ceil of its share, as with snapshots."""

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        self.cursor = 0

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        member: Member = members[self.cursor % n]
        self.cursor += 1
        return member


@fast_path(RoundRobinPicker)
@register("round_robin")
class RoundRobinStrategy(BaseStrategy):
    """Each healthy backend in turn: over any n consecutive picks from a fixed
    set of k, every backend gets floor(n/k) or ceil(n/k)."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        return self._rotate(self.healthy(backends))


class RandomPicker(Picker):
    """Random's fast path: one draw from the available list, ``O(1)``."""

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        member: Member = members[self.rng.randrange(n)]
        return member


@fast_path(RandomPicker)
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


class WeightedLeastConnectionsPicker(RankedPicker):
    """Weighted least connections' fast path: a heap keyed by ``((active + 1) / weight, -weight)``.

    The quotient as a float orders exactly as the snapshot rule's cross-multiplied integers
    while the two quotients differ by more than a rounding step: distinct fractions with
    weights up to 10,000 and counts up to 10**6 do (they differ by at least 1e-8)."""

    @staticmethod
    def key(member: Member) -> tuple[float, int]:
        weight = member.weight
        return (member.active + 1) / weight, -weight


@fast_path(WeightedLeastConnectionsPicker)
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


class PowerOfTwoPicker(Picker):
    """Power of two choices' fast path: two distinct draws from the available list, ``O(1)``."""

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        if n == 1:
            only: Member = members[0]
            return only
        i = self.rng.randrange(n)
        j = self.rng.randrange(n - 1)
        a: Member = members[i]
        b: Member = members[j + 1 if j >= i else j]
        return b if b.active < a.active else a


@fast_path(PowerOfTwoPicker)
@register("power_of_two")
class PowerOfTwoStrategy(BaseStrategy):
    """Sample two distinct healthy backends at random; send to the one with fewer in flight."""

    def select_node(self, backends: Sequence[Backend]) -> Backend:
        candidates = self.healthy(backends)
        if len(candidates) == 1:
            return candidates[0]
        a, b = self.rng.sample(candidates, 2)
        return b if b.active_connections < a.active_connections else a


class WeightedRoundRobinPicker(Picker):
    """Weighted round robin's fast path: earliest deadline first (Envoy's EDF scheduler), ``O(log n)``.

    Since the schedule (re)started, a member's k-th pick is due at virtual time
    ``k / weight``, and the earliest due is picked (equal deadlines in turn). Each
    member has exactly ``weight`` deadlines in every interval ``(c, c + 1]``, so over
    a fixed set every run of ``sum(weights)`` picks from the (re)start gives each
    member exactly its weight, interleaved (not nginx's order, the same counts). A
    member joining or leaving, or a weight changing, restarts the schedule at the
    next pick (``O(n log n)``, once per change, keeping the order members had).
    """

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        self.schedule = Ranking()
        self.turns: dict[Member, list[int]] = {}  # member -> [picks since the restart, its weight then]
        self.restart = True

    def joined(self, member: Member, members: list[Any]) -> None:
        self.restart = True

    def left(self, member: Member, members: list[Any]) -> None:
        self.restart = True

    def moved(self, member: Member) -> None:
        turn = self.turns.get(member)
        if turn is not None and turn[1] != member.weight:
            self.restart = True

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        if self.restart:
            self._restart(members)
        item = self.schedule.first(excluded)
        assert item is not None
        member: Member = item[2]
        turn = self.turns[member]
        turn[0] += 1
        self.schedule.put(member, turn[0] / turn[1])
        return member

    def _restart(self, members: list[Any]) -> None:
        old = self.schedule.items
        last = (1, 0.0, 0)  # members new to the schedule go after the others, in list order
        ordered = sorted(members, key=lambda m: (0, *old[m][:2]) if m in old else last)
        self.turns = {m: [1, m.weight] for m in ordered}
        self.schedule.reset([(1 / m.weight, m) for m in ordered])
        self.restart = False


@fast_path(WeightedRoundRobinPicker)
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


def expected_wait_s(latency_s: float, active: int) -> float:
    """``least_response_time``'s score of a backend: its latency times the requests it would hold.

    The +1e-9 keeps "fewer in flight" meaningful when latencies are still 0."""
    return (latency_s + 1e-9) * (active + 1)


class LeastResponseTimePicker(Picker):
    """Least response time's fast path, ``O(log n)``: three heaps.

    Measured backends ranked by their score; unmeasured ones by requests in flight
    (their score is the fastest measured latency's, which grows with that); and the
    measured latencies, for that fastest one (excluded backends left out, as the
    snapshot rule leaves them out). The pick is the lower of the two best scores,
    ties in turn across both."""

    def __init__(self, strategy: Any) -> None:
        super().__init__(strategy)
        seq = count()
        self.measured, self.unmeasured, self.latencies = Ranking(seq), Ranking(seq), Ranking(seq)

    def joined(self, member: Member, members: list[Any]) -> None:
        self.moved(member)

    def left(self, member: Member, members: list[Any]) -> None:
        for ranking in (self.measured, self.unmeasured, self.latencies):
            ranking.drop(member)

    def moved(self, member: Member) -> None:
        latency = member.latency.value
        if latency is None:
            self.unmeasured.put(member, member.active)
            return
        if self.unmeasured.items:
            self.unmeasured.drop(member)  # measured once, measured for good
        self.latencies.put(member, latency)
        self.measured.put(member, expected_wait_s(latency, member.active))

    def pick(self, members: list[Any], n: int, excluded: tuple[Member, ...]) -> Member:
        best = self.measured.first(excluded)
        new = self.unmeasured.first(excluded)
        if new is not None:
            fastest = self.latencies.first(excluded)
            score = expected_wait_s(fastest[0] if fastest is not None else 0.0, new[0])
            if best is None or (score, new[1]) < (best[0], best[1]):
                best = new
        assert best is not None
        member: Member = best[2]
        return member


@fast_path(LeastResponseTimePicker)
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
            score = expected_wait_s(latency, b.active_connections)
            if score < best_score:
                best, best_score = [b], score
            elif score == best_score:
                best.append(b)
        return best[0] if len(best) == 1 else self._rotate(best)
