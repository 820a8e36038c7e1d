"""Streaming summaries: exact counts and busy time, exact mean and max, percentiles within 0.5%."""

from __future__ import annotations

import math

import numpy as np
import pytest

from core.results import CHUNK_ROWS, Outcome
from core.summary import CENTROIDS, Latencies, RunSummary, Tally

QS = (0.5, 0.9, 0.95, 0.99)


def latencies(values: np.ndarray, batch: int) -> Latencies:
    lat = Latencies()
    for lo in range(0, values.size, batch):
        lat.add(values[lo:lo + batch])
    return lat


@pytest.mark.parametrize("batch", [7, 1000])
def test_up_to_centroids_values_the_percentiles_are_numpys(batch: int) -> None:
    values = np.random.default_rng(1).exponential(0.05, CENTROIDS)
    lat = latencies(values, batch)
    assert [lat.quantile_s(q) for q in QS] == pytest.approx(np.percentile(values, [50, 90, 95, 99]).tolist(),
                                                            rel=1e-12)
    assert lat.max_s == values.max() and lat.count == values.size
    assert lat.mean_s == pytest.approx(values.mean(), rel=1e-12)


@pytest.mark.parametrize("draw", [
    lambda rng, n: rng.exponential(0.05, n),
    lambda rng, n: rng.lognormal(-3.0, 1.5, n),
    lambda rng, n: 0.025 + rng.gamma(0.5, 0.2, n),  # a floor and a heavy, skewed queueing tail
], ids=["exponential", "lognormal", "gamma"])
@pytest.mark.parametrize("n, batch", [(10_000, 65), (300_000, CHUNK_ROWS)])
def test_beyond_that_the_percentiles_stay_within_half_a_percent(draw, n: int, batch: int) -> None:
    """Fed as a run feeds them: per node in small batches (10,000 values: one node's share of a long run
    over many nodes) or overall in whole chunks."""
    values = draw(np.random.default_rng(n), n)
    lat = latencies(values, batch)
    exact = np.percentile(values, [50, 90, 95, 99])
    got = np.array([lat.quantile_s(q) for q in QS])
    assert np.abs(got / exact - 1).max() < 0.005, dict(zip(QS, got / exact - 1))
    assert lat.max_s == values.max()  # exact, as is the mean
    assert lat.mean_s == pytest.approx(values.mean(), rel=1e-9)


def test_an_empty_group_has_no_figures() -> None:
    lat = Latencies()
    lat.add(np.empty(0))
    assert lat.count == 0 and math.isnan(lat.mean_s) and math.isnan(lat.quantile_s(0.5))


def random_rows(n: int, nodes: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    arrival = np.sort(rng.uniform(0.0, 12.0, n))
    node = rng.integers(-1, nodes, n).astype(np.intc)
    outcome = rng.choice(len(Outcome), n, p=[0.72, *[0.04] * 7]).astype(np.int8)
    served = (node >= 0) & np.isin(outcome, [Outcome.OK, Outcome.SERVER_ERROR, Outcome.TIMEOUT])
    start = np.where(served, arrival + rng.exponential(0.2, n), np.nan)
    end = np.where(served, start + rng.exponential(0.1, n), arrival + rng.exponential(0.01, n))
    return {"arrival": arrival, "node": node, "start": start, "end": end, "outcome": outcome}


def fold(rows: dict[str, np.ndarray], nodes: int, chunk: int) -> RunSummary:
    s = RunSummary(warmup_s=2.0, duration_s=10.0, nodes=nodes, outcomes=len(Outcome), ok=Outcome.OK)
    for lo in range(0, rows["arrival"].size, chunk):
        s.fold({k: v[lo:lo + chunk] for k, v in rows.items()})
    return s


@pytest.mark.parametrize("nodes", [1, 5])
def test_counts_and_busy_time_are_exact_however_the_rows_are_chunked(nodes: int) -> None:
    rows = random_rows(20_000, nodes)
    a, w = rows["arrival"], (rows["arrival"] >= 2.0) & (rows["arrival"] < 10.0)
    for chunk in (rows["arrival"].size, 999):
        s = fold(rows, nodes, chunk)
        assert s.recorded == a.size
        for i in range(-1, nodes):
            for o in Outcome:
                assert s.window.counts[i + 1, o] == int((w & (rows["node"] == i) & (rows["outcome"] == o)).sum())
        # Busy time: every service interval clipped to the window, whenever its request arrived.
        busy = np.clip(np.minimum(rows["end"], 10.0) - np.maximum(rows["start"], 2.0), 0.0, None)
        for i in range(nodes):
            mine = (rows["node"] == i) & ~np.isnan(rows["start"])
            assert s.busy_s[i] == pytest.approx(busy[mine].sum(), rel=1e-12)
        ok = w & (rows["outcome"] == Outcome.OK)
        response = rows["end"] - a
        for i in range(nodes):
            lat, exact = s.window.node_latency[i], response[ok & (rows["node"] == i)]
            assert lat.count == exact.size and lat.max_s == exact.max()
            assert lat.mean_s == pytest.approx(exact.mean(), rel=1e-12)
        assert s.window.latency.count == int(ok.sum())


def test_not_sent_counts_only_the_window() -> None:
    s = RunSummary(warmup_s=1.0, duration_s=10.0, nodes=1, outcomes=len(Outcome), ok=Outcome.OK)
    s.fold_not_sent([0.5, 1.0, 9.99, 10.0])
    s.fold_not_sent(np.array([3.0]))
    assert s.not_sent == 3


def test_the_overall_latencies_are_the_nodes_merged_exact_up_to_centroids_then_within_half_a_percent() -> None:
    rng = np.random.default_rng(9)
    for nodes, per_node in ((4, CENTROIDS // 4), (100, 3000)):
        tally = Tally(nodes=nodes, outcomes=len(Outcome), ok=Outcome.OK)
        node = np.repeat(np.arange(nodes, dtype=np.intc), per_node)
        response = rng.lognormal(-3.0 + 0.01 * node, 1.0)
        for lo in range(0, node.size, 4096):  # each chunk a mix of nodes, as a run's are
            rows = slice(lo, lo + 4096)
            tally.fold(node[rows], np.zeros(node[rows].size, np.int8), response[rows])
        got = np.array([tally.latency.quantile_s(q) for q in QS])
        exact = np.percentile(response, [50, 90, 95, 99])
        tolerance = 1e-12 if node.size <= CENTROIDS else 0.005
        assert np.abs(got / exact - 1).max() < tolerance, (nodes, got / exact - 1)
        assert tally.latency.max_s == response.max() and tally.latency.count == response.size
