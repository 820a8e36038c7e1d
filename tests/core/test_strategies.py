"""Balancing strategies: the registry, the healthy filter, and each strategy's promise."""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.latency import PeakEwma
from core.strategies import (
    STRATEGIES, Backend, NoHealthyBackend, PowerOfTwoStrategy, RoundRobinStrategy,
    WeightedLeastConnectionsStrategy, WeightedRoundRobinStrategy, LeastResponseTimeStrategy, make_strategy,
)
from solutions.impl import strategy_class

NAMES = sorted(STRATEGIES)


def nodes(*actives: int, weights=None, healthy=None) -> list[Backend]:
    weights = weights or [1] * len(actives)
    healthy = healthy or [True] * len(actives)
    return [Backend(f"n{i}", f"127.0.0.1:{5001 + i}", a, w, h)
            for i, (a, w, h) in enumerate(zip(actives, weights, healthy))]


def build(name: str, seed: int = 0):
    return strategy_class(name, "solution")(rng=random.Random(seed))


def test_registry_has_every_documented_name() -> None:
    assert set(NAMES) == {"round_robin", "least_connections", "random", "power_of_two",
                          "weighted_round_robin", "least_response_time", "weighted_least_connections"}
    for name in NAMES:
        assert STRATEGIES[name].name == name


def test_unknown_strategy_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="round_robin"):
        make_strategy("fastest")


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("n", [0, 1, 3])
def test_no_healthy_backend_is_a_clear_error(name: str, n: int) -> None:
    with pytest.raises(NoHealthyBackend, match=f"among {n}"):
        build(name).select_node(nodes(*[0] * n, healthy=[False] * n))


@pytest.mark.parametrize("name", NAMES)
@given(specs=st.lists(st.tuples(st.integers(0, 5), st.integers(1, 4), st.booleans()), min_size=1, max_size=7),
       seed=st.integers(0, 1000))
def test_picks_only_healthy_backends_from_the_list(name: str, specs, seed: int) -> None:
    backends = [Backend(f"n{i}", "", a, w, h, latency_ewma_s=0.01 * (i + 1)) for i, (a, w, h) in enumerate(specs)]
    strategy = build(name, seed)
    if not any(b.healthy for b in backends):
        return
    for _ in range(5):
        chosen = strategy.select_node(backends)
        assert chosen in backends and chosen.healthy


@pytest.mark.parametrize("name", NAMES)
def test_same_seed_same_picks(name: str) -> None:
    backends = nodes(1, 0, 2, 0, weights=[1, 4, 1, 2])
    a, b = build(name, 7), build(name, 7)
    assert [a.select_node(backends).id for _ in range(50)] == [b.select_node(backends).id for _ in range(50)]


@given(k=st.integers(1, 7), n=st.integers(0, 60), start=st.integers(0, 20))
def test_round_robin_gives_each_k_or_k_plus_1(k: int, n: int, start: int) -> None:
    rr = RoundRobinStrategy()
    backends = nodes(*[0] * k)
    for _ in range(start):  # any run of picks, not only the first
        rr.select_node(backends)
    counts = Counter(rr.select_node(backends).id for _ in range(n))
    assert all(n // k <= counts[b.id] <= -(-n // k) for b in backends), counts


def test_round_robin_skips_unhealthy() -> None:
    rr = RoundRobinStrategy()
    backends = nodes(0, 0, 0, healthy=[True, False, True])
    assert [rr.select_node(backends).id for _ in range(4)] == ["n0", "n2", "n0", "n2"]


@given(loads=st.lists(st.integers(0, 20), min_size=2, max_size=6, unique=True), seed=st.integers(0, 10**6))
def test_power_of_two_never_picks_the_most_loaded_of_two_distinct(loads: list[int], seed: int) -> None:
    backends = nodes(*loads)
    p2c = PowerOfTwoStrategy(rng=random.Random(seed))
    busiest = max(backends, key=lambda b: b.active_connections)
    for _ in range(20):
        assert p2c.select_node(backends) is not busiest
    if len(loads) == 2:
        least = min(backends, key=lambda b: b.active_connections)
        assert all(p2c.select_node(backends) is least for _ in range(10))


def test_power_of_two_spreads_over_equal_loads() -> None:
    p2c = PowerOfTwoStrategy(rng=random.Random(1))
    counts = Counter(p2c.select_node(nodes(0, 0, 0, 0)).id for _ in range(4000))
    assert min(counts.values()) > 800  # ~1000 each


@given(weights=st.lists(st.integers(1, 6), min_size=1, max_size=6), rounds=st.integers(1, 4))
def test_weighted_round_robin_is_exact_per_cycle(weights: list[int], rounds: int) -> None:
    wrr = WeightedRoundRobinStrategy()
    backends = nodes(*[0] * len(weights), weights=weights)
    counts = Counter(wrr.select_node(backends).id for _ in range(rounds * sum(weights)))
    assert {b.id: counts[b.id] for b in backends} == {b.id: rounds * b.weight for b in backends}


def test_weighted_round_robin_is_smooth() -> None:
    wrr = WeightedRoundRobinStrategy()
    picks = "".join(wrr.select_node(nodes(0, 0, 0, weights=[5, 1, 1])).id[1] for _ in range(7))
    assert picks == "0010200"  # nginx's documented order for weights 5,1,1: a a b a c a a


def test_weighted_round_robin_forgets_departed_backends() -> None:
    wrr = WeightedRoundRobinStrategy()
    for i in range(100):
        wrr.select_node([Backend(f"gone-{i}"), Backend("stay")])
    assert len(wrr._credit) <= 2 * 2 + 8 + 1


def test_weighted_least_connections_prefers_free_capacity() -> None:
    wlc = WeightedLeastConnectionsStrategy()
    # (active + 1) / weight: 2/1=2, 4/4=1, 1/1=1 -> ties between n1 (4 workers) and n2: bigger node wins.
    assert wlc.select_node(nodes(1, 3, 0, weights=[1, 4, 1])).id == "n1"
    # Plain least connections would pick n2 (0 active); n1 has 3 idle workers of 4.
    assert wlc.select_node(nodes(1, 1, 0, weights=[1, 4, 1])).id == "n1"
    assert wlc.select_node(nodes(2, 4, 0, weights=[1, 4, 1])).id == "n2"


def test_weighted_least_connections_rotates_exact_ties() -> None:
    wlc = WeightedLeastConnectionsStrategy()
    assert {wlc.select_node(nodes(0, 0, 0)).id for _ in range(6)} == {"n0", "n1", "n2"}


def test_least_response_time_weighs_latency_by_load() -> None:
    lrt = LeastResponseTimeStrategy()
    fast_busy = Backend("fast", active_connections=3, latency_ewma_s=0.010)   # 0.04
    slow_idle = Backend("slow", active_connections=0, latency_ewma_s=0.030)   # 0.03
    assert lrt.select_node([fast_busy, slow_idle]).id == "slow"
    assert lrt.select_node([fast_busy.__class__("fast", active_connections=1, latency_ewma_s=0.010),
                            slow_idle]).id == "fast"


def test_least_response_time_tries_unmeasured_backends() -> None:
    lrt = LeastResponseTimeStrategy()
    new = Backend("new")
    known = Backend("known", active_connections=0, latency_ewma_s=0.02)
    assert lrt.select_node([known, new]).id in {"new", "known"}
    assert lrt.select_node([Backend("known", active_connections=2, latency_ewma_s=0.02), new]).id == "new"


def test_peak_ewma_jumps_up_and_decays_down() -> None:
    ewma = PeakEwma(tau_s=1.0)
    assert ewma.observe(0.010, now=0.0) == 0.010
    assert ewma.observe(0.100, now=0.1) == 0.100          # a peak replaces the average at once
    after = ewma.observe(0.010, now=1.1)                   # one tau later: 1/e of the gap remains
    assert after == pytest.approx(0.010 + 0.090 / 2.718281828, rel=1e-6)
    assert ewma.observe(0.010, now=0.5) == pytest.approx(after)  # backwards: no time passed, no decay
