"""The pick index and the strategies' fast paths: every fast pick is one the strategy's rule allows on
the snapshot of that moment, on random histories; fairness, determinism and cost (counted, not timed)."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine, initialize, invariant, precondition, rule, run_state_machine_as_test,
)

import core.balancer_state as balancer_state
from core.balancer_state import Attempt, BackendEntry, BalancerState
from core.pick_index import GONE, RankedPicker, Ranking
from core.scenario import BalancerSpec
from core.strategies import (
    STRATEGIES, Backend, LeastConnectionsStrategy, NoHealthyBackend, RoundRobinStrategy, fast_path, fast_picker,
)
from solutions.impl import strategy_class
from solutions.least_connections_solution import LeastConnectionsPicker, LeastConnectionsSolution

NAMES = sorted(STRATEGIES)
#: Strategies whose rule is an argmin (the fast pick must be in the snapshot's argmin set).
ARGMIN = {"least_connections", "weighted_least_connections", "least_response_time"}
IDS = ["a", "b", "c", "d", "e"]


def fast_class(name: str) -> type:
    return strategy_class(name, "solution")


def books(name: str, n: int = 0, seed: int = 1, weights: list[int] | None = None, **spec: Any) -> BalancerState:
    state = BalancerState(BalancerSpec(**spec), fast_class(name)(rng=random.Random(seed)))
    for i in range(n):
        state.add(f"n{i}", weight=weights[i] if weights else 1)
    return state


def snapshot(state: BalancerState, now: float, exclude: tuple[str, ...] = (), out: frozenset[str] = frozenset()
             ) -> list[Backend]:
    """What the snapshot path would hand ``select_node`` at ``now`` (``out``: also not available)."""
    return [Backend(b.id, b.url, b.active, b.weight, b.id not in exclude and b.id not in out and b.available(now),
                    b.latency.value) for b in state.backends.values()]


def allowed(name: str, backends: list[Backend]) -> set[str]:
    """The ids the strategy's snapshot rule may pick: its argmin set, or every available one."""
    healthy = [b for b in backends if b.healthy]
    if name in ARGMIN:
        reference = fast_class(name)(rng=random.Random(0))  # a fresh one: its ties rotate through all
        return {reference.select_node(backends).id for _ in healthy}
    if name == "power_of_two" and len(healthy) > 1:
        top = max(b.active_connections for b in healthy)
        busiest = [b for b in healthy if b.active_connections == top]
        if len(busiest) == 1:  # the strictly busiest of two is never taken, so neither is the strictly busiest of all
            return {b.id for b in healthy} - {busiest[0].id}
    return {b.id for b in healthy}


# -- equivalence on random histories ------------------------------------------------------------------------
class FastPathMachine(RuleBasedStateMachine):
    """Random histories of a balancer's books on the fast path; after each pick, the pick is checked
    against the strategy's own rule on the snapshot of that moment, and the index against the books."""

    name = "round_robin"  # the strategy under test: see the test below

    @initialize(seed=st.integers(0, 2**16), eject=st.sampled_from([0, 1, 2]),
                weights=st.lists(st.integers(1, 4), min_size=1, max_size=len(IDS)))
    def setup(self, seed: int, eject: int, weights: list[int]) -> None:
        self.state = BalancerState(BalancerSpec(eject_after_failures=eject, ejection_time_s=1.0),
                                   fast_class(self.name)(rng=random.Random(seed)))
        assert self.state.fast_path
        for backend_id, weight in zip(IDS, weights):
            self.state.add(backend_id, weight=weight)
        self.now = 0.0
        self.attempts: list[Attempt] = []

    def entry(self, backend_id: str) -> BackendEntry | None:
        return self.state.backends.get(backend_id)

    @rule(backend_id=st.sampled_from(IDS), weight=st.integers(1, 4), held=st.booleans())
    def add(self, backend_id: str, weight: int, held: bool) -> None:
        entry = self.state.add(backend_id, weight=weight)  # a known id: a fresh entry replaces the old
        if held:
            self.state.hold(entry)

    @rule(backend_id=st.sampled_from(IDS))
    def remove(self, backend_id: str) -> None:
        self.state.remove(backend_id)

    @rule(backend_id=st.sampled_from(IDS), ok=st.booleans())
    def check(self, backend_id: str, ok: bool) -> None:
        if (entry := self.entry(backend_id)) is not None:
            self.state.checked(entry, ok)

    @rule(backend_id=st.sampled_from(IDS), weight=st.integers(1, 4))
    def reweigh(self, backend_id: str, weight: int) -> None:
        """The live balancer sets a weight a backend's /health claims."""
        if (entry := self.entry(backend_id)) is not None:
            entry.weight = weight

    @rule(dt=st.sampled_from([0.0, 0.01, 0.3, 1.0, 2.5]))
    def advance(self, dt: float) -> None:
        self.now += dt

    @rule()
    def tick(self) -> None:
        self.state.tick(now=self.now)

    @rule()
    def first_try(self) -> None:
        self.pick([])

    @rule(exclude=st.lists(st.sampled_from(IDS), max_size=3))
    def pick(self, exclude: list[str]) -> None:
        self.state.drain_stalls()  # earlier ones (a tick's): only this pick's count below
        before = snapshot(self.state, self.now, tuple(exclude))
        try:
            attempt = self.state.pick(now=self.now, exclude=exclude, number=2 if exclude else 1)
        except NoHealthyBackend:
            stalled = frozenset(e.backend for e in self.state.drain_stalls())
            assert not any(b.healthy and b.id not in stalled for b in before), "a backend was available"
            return
        stalled = frozenset(e.backend for e in self.state.drain_stalls())  # ejected by this pick, then re-picked
        backends = [b if b.id not in stalled else Backend(b.id, b.address, b.active_connections, b.weight, False,
                                                           b.latency_ewma_s) for b in before]
        assert attempt.backend.id in allowed(self.name, backends), (attempt.backend.id, backends)
        self.attempts.append(attempt)

    @precondition(lambda self: self.attempts)
    @rule(i=st.integers(0, 20), status=st.sampled_from([200, 200, 404, 500, 502, 503, 504]),
          elapsed_s=st.sampled_from([0.001, 0.01, 0.05, 0.2]))
    def answer(self, i: int, status: int, elapsed_s: float) -> None:
        attempt = self.attempts.pop(i % len(self.attempts))
        self.state.answered(attempt, status=status, elapsed_s=elapsed_s, now=self.now)

    @precondition(lambda self: self.attempts)
    @rule(i=st.integers(0, 20), refused=st.booleans())
    def refuse_or_abandon(self, i: int, refused: bool) -> None:
        attempt = self.attempts.pop(i % len(self.attempts))
        if refused:
            self.state.refused(attempt, now=self.now)
        else:
            self.state.abandoned(attempt, now=self.now)

    @invariant()
    def the_index_is_the_available_set(self) -> None:
        index = self.state.index
        if index is None:
            return
        for pos, member in enumerate(index.members):
            assert member.index_pos == pos and self.state.backends.get(member.id) is member
        for entry in self.state.backends.values():
            if entry.index_pos >= 0:
                assert entry.available(self.now), f"{entry.id} is in the index but not available"
            elif entry.available(self.now):  # only an ejection that ended by time, re-checked at the next pick
                assert entry.index_due is not None and entry.index_due <= self.now, f"{entry.id} left out"
        if isinstance(index.picker, RankedPicker):
            assert set(index.picker.ranking.items) == set(index.members)
        for attempt in self.attempts:
            if self.state.backends.get(attempt.backend.id) is not attempt.backend:
                assert attempt.backend.index_pos == GONE


@pytest.mark.parametrize("name", NAMES)
def test_fast_picks_follow_the_rule_on_random_histories(name: str) -> None:
    machine = type(f"FastPathMachine_{name}", (FastPathMachine,), {"name": name})
    run_state_machine_as_test(machine, settings=settings(max_examples=60, stateful_step_count=50, deadline=None))


# -- determinism ------------------------------------------------------------------------------------------
OPS = st.lists(st.tuples(st.sampled_from(["pick", "pick", "pick", "answer", "refuse", "down", "up", "time"]),
                         st.integers(0, 9)), max_size=60)


def replay(name: str, seed: int, ops: list[tuple[str, int]]) -> list[str]:
    state = books(name, 6, seed=seed, weights=[1, 2, 3, 1, 2, 3], eject_after_failures=1, ejection_time_s=0.5)
    now, out, attempts = 0.0, [], []
    for op, k in ops:
        entry = state.backends[f"n{k % 6}"]
        if op == "pick":
            try:
                attempts.append(state.pick(now=now))
                out.append(attempts[-1].backend.id)
            except NoHealthyBackend:
                out.append("-")
        elif op in ("answer", "refuse") and attempts:
            attempt = attempts.pop(k % len(attempts))
            if op == "refuse":
                state.refused(attempt, now=now)
            else:
                state.answered(attempt, status=200 if k % 3 else 500, elapsed_s=0.01 * k, now=now)
        elif op in ("down", "up"):
            state.checked(entry, op == "up")
        elif op == "time":
            now += 0.1 * k
    return out


@pytest.mark.parametrize("name", NAMES)
@given(seed=st.integers(0, 2**16), ops=OPS)
@settings(max_examples=25)
def test_the_same_seed_gives_the_same_picks(name: str, seed: int, ops: list[tuple[str, int]]) -> None:
    assert replay(name, seed, ops) == replay(name, seed, ops)


# -- fairness -------------------------------------------------------------------------------------------
def churn(state: BalancerState, downs: list[int]) -> None:
    """Some history first: backends going down and back up, picks in between."""
    for k in downs:
        entry = state.backends[f"n{k % len(state.backends)}"]
        state.checked(entry, False)
        if len(state.backends) > 1:
            state.answered(state.pick(now=0.0), status=200, elapsed_s=0.01, now=0.0)
        state.checked(entry, True)


@given(k=st.integers(1, 7), n=st.integers(0, 60), downs=st.lists(st.integers(0, 6), max_size=5))
def test_round_robin_gives_each_floor_or_ceil_over_a_fixed_set(k: int, n: int, downs: list[int]) -> None:
    state = books("round_robin", k)
    churn(state, downs)
    counts = Counter(state.pick(now=1.0).backend.id for _ in range(n))
    assert all(n // k <= counts[f"n{i}"] <= -(-n // k) for i in range(k)), counts


@given(weights=st.lists(st.integers(1, 6), min_size=1, max_size=6), rounds=st.integers(1, 3),
       downs=st.lists(st.integers(0, 5), max_size=4))
def test_weighted_round_robin_gives_each_its_weight_per_cycle(weights: list[int], rounds: int,
                                                               downs: list[int]) -> None:
    """Every run of sum(weights) picks from the moment the set became fixed: exactly the weights."""
    state = books("weighted_round_robin", len(weights), weights=weights)
    churn(state, downs)
    total = sum(weights)
    for _ in range(rounds):
        counts = Counter(state.pick(now=1.0).backend.id for _ in range(total))
        assert {f"n{i}": counts[f"n{i}"] for i in range(len(weights))} == {f"n{i}": w for i, w in enumerate(weights)}


def test_a_new_weight_restarts_the_weighted_schedule_with_the_new_counts() -> None:
    state = books("weighted_round_robin", 2, weights=[1, 1])
    state.pick(now=0.0)
    state.backends["n0"].weight = 3  # what the live balancer does with a /health that says 3 workers
    counts = Counter(state.pick(now=0.0).backend.id for _ in range(8))
    assert counts == {"n0": 6, "n1": 2}


@pytest.mark.parametrize("name", sorted(ARGMIN))
def test_idle_ties_are_taken_in_turn(name: str) -> None:
    """With every backend idle and answering at once, the least-* rules go round every backend."""
    state = books(name, 5)
    for _ in range(2):  # the second round: all measured, all tied again
        picked = []
        for _ in range(5):
            attempt = state.pick(now=0.0)
            picked.append(attempt.backend.id)
            state.answered(attempt, status=200, elapsed_s=0.01, now=0.0)
        assert sorted(picked) == [f"n{i}" for i in range(5)]


@pytest.mark.parametrize("name", ["random", "power_of_two"])
def test_random_picks_reach_every_backend(name: str) -> None:
    state = books(name, 5)
    counts = Counter()
    for _ in range(2000):
        attempt = state.pick(now=0.0)
        counts[attempt.backend.id] += 1
        state.answered(attempt, status=200, elapsed_s=0.01, now=0.0)
    assert min(counts[f"n{i}"] for i in range(5)) > 250  # ~400 each


@pytest.mark.parametrize("name", NAMES)
def test_a_retry_excludes_and_a_half_open_backend_gets_one_probe(name: str) -> None:
    state = books(name, 3, eject_after_failures=1, ejection_time_s=1.0)
    n0 = state.backends["n0"]
    state.answered(state.pick(now=0.0, exclude=["n1", "n2"]), status=500, elapsed_s=0.01, now=0.0)
    assert all(state.pick(now=0.5).backend is not n0 for _ in range(6))  # ejected
    probe = state.pick(now=1.0, exclude=["n1", "n2", "n1"])  # ejection over: re-checked at this pick
    assert probe.backend is n0
    assert all(state.pick(now=1.1).backend is not n0 for _ in range(6))  # one probe at a time
    state.answered(probe, status=200, elapsed_s=0.01, now=1.2)
    assert state.pick(now=1.3, exclude=["n1", "n2"]).backend is n0
    with pytest.raises(NoHealthyBackend, match="among 3"):
        state.pick(now=1.3, exclude=["n0", "n1", "n2", "gone"])


# -- each rule's corner, on the fast path ----------------------------------------------------------------------
def hold_in_flight(state: BalancerState, backend_id: str, requests: int) -> None:
    others = [b for b in state.backends if b != backend_id]
    for _ in range(requests):
        state.pick(now=0.0, exclude=others)


def test_power_of_two_takes_the_less_loaded_of_the_two() -> None:
    state = books("power_of_two", 2)
    hold_in_flight(state, "n0", 3)
    for _ in range(20):
        attempt = state.pick(now=0.0)
        assert attempt.backend.id == "n1"
        state.answered(attempt, status=200, elapsed_s=0.01, now=0.0)


def test_weighted_least_connections_gives_a_tie_to_the_larger_node_whoever_came_first() -> None:
    state = books("weighted_least_connections", 2, weights=[1, 2])
    hold_in_flight(state, "n1", 1)  # (0+1)/1 == (1+1)/2: n0 was ranked first, n1 is larger
    assert state.pick(now=0.0).backend.id == "n1"


def test_a_weight_set_by_the_driver_re_ranks_at_once() -> None:
    state = books("weighted_least_connections", 2)
    state.backends["n1"].weight = 4  # the live balancer does this when a /health body says 4 workers
    assert [state.pick(now=0.0).backend.id for _ in range(4)] == ["n1"] * 4  # 1/4, 2/4, 3/4 before n0's 1/1


def test_least_response_time_scores_the_unmeasured_with_the_fastest_candidate() -> None:
    """The fastest measured backend is excluded (a retry): the unmeasured are scored with the next fastest."""
    state = books("least_response_time", 3)
    for backend_id, elapsed_s in [("n0", 0.01), ("n1", 0.05)]:
        others = [b for b in state.backends if b != backend_id]
        state.answered(state.pick(now=0.0, exclude=others), status=200, elapsed_s=elapsed_s, now=0.0)
    hold_in_flight(state, "n2", 1)  # unmeasured, one in flight: scored (fastest + 1e-9) * 2
    assert state.pick(now=0.0).backend.id == "n0"  # 0.01 * 1 against n2's 0.02
    assert state.pick(now=0.0, exclude=["n0"]).backend.id == "n1"  # 0.05 against n2's 0.10, not 0.02


# -- cost, counted ---------------------------------------------------------------------------------------
def looks_per_request(name: str, n: int, monkeypatch: pytest.MonkeyPatch, cls: type | None = None) -> float:
    """Snapshots built plus availability questions asked, per pick and answer, over 200 requests."""
    looks = Counter()

    class Counted(Backend):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            looks["snapshot"] += 1
            super().__init__(*args, **kwargs)

    asked = BackendEntry.available

    def available(entry: BackendEntry, now: float) -> bool:
        looks["available"] += 1
        return asked(entry, now)

    state = BalancerState(BalancerSpec(), (cls or fast_class(name))(rng=random.Random(1)))
    for i in range(n):
        state.add(f"n{i}")
    monkeypatch.setattr(balancer_state, "Backend", Counted)
    monkeypatch.setattr(BackendEntry, "available", available)
    held = []
    for i in range(200):
        held.append(state.pick(now=i / 100))
        if len(held) > n // 2:
            state.answered(held.pop(0), status=200, elapsed_s=0.01, now=i / 100)
    monkeypatch.undo()
    return (looks["snapshot"] + looks["available"]) / 200


@pytest.mark.parametrize("name", NAMES)
def test_a_fast_pick_looks_at_no_more_backends_among_1000_than_among_4(name: str, monkeypatch) -> None:
    small, large = looks_per_request(name, 4, monkeypatch), looks_per_request(name, 1000, monkeypatch)
    assert large <= small <= 3, (small, large)


def test_without_a_fast_path_a_pick_snapshots_every_backend(monkeypatch) -> None:
    class Student(LeastConnectionsStrategy):
        def select_node(self, backends):
            return min(self.healthy(backends), key=lambda b: b.active_connections)

    assert looks_per_request("", 100, monkeypatch, Student) >= 200  # a snapshot and a question per backend


def test_a_ranking_throws_dead_items_away() -> None:
    ranking, members = Ranking(), [object() for _ in range(10)]
    for step in range(5000):
        ranking.put(members[step % 10], step % 7)  # type: ignore[arg-type]
    assert len(ranking._heap) <= 2 * 10 + 33


# -- who gets a fast path -------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_every_shipped_strategy_has_a_fast_path(name: str) -> None:
    assert fast_picker(fast_class(name)(rng=random.Random(0))) is not None


def test_the_exercise_stub_has_none_and_the_solution_has_its_own() -> None:
    assert fast_picker(LeastConnectionsStrategy()) is None
    assert isinstance(fast_picker(LeastConnectionsSolution()), LeastConnectionsPicker)


def test_overriding_select_node_loses_the_fast_path() -> None:
    class Mine(LeastConnectionsSolution):
        def select_node(self, backends):
            return super().select_node(backends)

    class Inherits(RoundRobinStrategy):
        pass

    assert fast_picker(Mine()) is None
    assert fast_picker(Inherits()) is not None  # same select_node, same fast path
    patched = RoundRobinStrategy()
    patched.select_node = lambda backends: backends[0]  # type: ignore[method-assign]
    assert fast_picker(patched) is None
    assert not BalancerState(BalancerSpec(), Mine()).fast_path


def test_a_student_method_runs_through_snapshots() -> None:
    class Implemented(LeastConnectionsStrategy):
        def select_node(self, backends):
            return min(self.healthy(backends), key=lambda b: b.active_connections)

    state = BalancerState(BalancerSpec(), Implemented())
    state.add("n1")
    assert not state.fast_path and state.pick(now=0.0).backend.id == "n1"


def test_a_fast_path_needs_a_select_node_of_its_own() -> None:
    with pytest.raises(TypeError, match="no select_node of its own"):
        @fast_path(LeastConnectionsPicker)
        class Bare(LeastConnectionsSolution):
            pass
