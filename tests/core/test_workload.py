"""The shared workload streams: the same arrivals for the simulator and the live generator."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from core.scenario import Workload
from core.workload import client_ids, open_loop, service_times, stream, streams, think_times


def _take(workload: Workload, seed: int, n: int) -> list[tuple[float, str]]:
    rngs = streams(seed, 2)
    return list(itertools.islice(open_loop(workload, rngs[0], rngs[1]), n))


def test_same_seed_same_arrivals_whatever_else_is_spawned() -> None:
    w = Workload(rate_per_s=50.0, clients=7)
    a = _take(w, 3, 5000)
    rngs = streams(3, 10)  # a driver that spawns more streams gets the same first two
    assert list(itertools.islice(open_loop(w, rngs[0], rngs[1]), 5000)) == a
    assert _take(w, 4, 5000) != a


def test_poisson_gaps_and_uniform_clients() -> None:
    w = Workload(rate_per_s=200.0, clients=4)
    pairs = _take(w, 1, 40_000)
    gaps = np.array([g for g, _ in pairs])
    assert gaps.mean() == pytest.approx(1 / 200, rel=0.02)
    assert gaps.std() == pytest.approx(1 / 200, rel=0.03)  # exponential: sd = mean
    counts = {c: sum(1 for _, x in pairs if x == c) for c in client_ids(w)}
    assert set(counts) == {"client-0", "client-1", "client-2", "client-3"}
    assert all(abs(n / len(pairs) - 0.25) < 0.01 for n in counts.values())


def test_constant_arrivals_and_a_single_client() -> None:
    pairs = _take(Workload(arrival="constant", rate_per_s=8.0, clients=1), 0, 10)
    assert pairs == [(0.125, "client-0")] * 10


def test_closed_loop_is_not_an_open_loop() -> None:
    with pytest.raises(ValueError, match="poisson or constant"):
        open_loop(Workload(arrival="closed", think_time_ms=5), *streams(0, 2))


def test_think_times() -> None:
    draws = list(itertools.islice(think_times(Workload(arrival="closed", think_time_ms=20), streams(0, 1)[0]), 20_000))
    assert np.mean(draws) == pytest.approx(0.020, rel=0.03)


def test_a_child_stream_is_the_same_however_it_is_reached() -> None:
    spawned = [np.random.default_rng(s) for s in np.random.SeedSequence(9).spawn(6)]
    for k in range(6):
        assert stream(9, k).random(5).tolist() == spawned[k].random(5).tolist() == streams(9, 6)[k].random(5).tolist()


def test_service_times() -> None:
    assert list(itertools.islice(service_times("deterministic", 0.025, stream(0, 3)), 3)) == [0.025] * 3
    assert list(itertools.islice(service_times("exponential", 0.0, stream(0, 3)), 2)) == [0.0, 0.0]
    draws = list(itertools.islice(service_times("exponential", 0.025, stream(0, 3)), 20_000))
    assert np.mean(draws) == pytest.approx(0.025, rel=0.03)


def test_node_chunk_size_bounds_what_many_nodes_buffer() -> None:
    from core.workload import CHUNK_SIZE, node_chunk_size
    assert node_chunk_size(1) == node_chunk_size(16) == CHUNK_SIZE  # live nodes and the shipped scenarios
    assert node_chunk_size(1000) == 256 and node_chunk_size(100) == 655
    assert node_chunk_size(0) == CHUNK_SIZE


def test_one_stream_gives_the_same_values_whatever_the_fetch_size() -> None:
    import itertools

    import numpy as np

    from core.workload import service_times
    a = list(itertools.islice(service_times("exponential", 0.02, np.random.default_rng(9)), 5000))
    b = list(itertools.islice(service_times("exponential", 0.02, np.random.default_rng(9), chunk_size=256), 5000))
    assert a == b and all(type(v) is float for v in a)
