"""The shipped supermarket experiment: theory beside the simulation, where (and only where) it applies.

The simulation check is a real sweep, small and quick: 100 nodes at load 0.5, four seeds of
~24,000 requests each per strategy. There the 95% CI of the mean is about 2% for random
(M/M/1) and far less for power of two, so the 3% tolerance governs; a model or formula 10%
off fails (random and power of two differ by 37% at this load).
"""

from __future__ import annotations

import copy

import pytest

from core.scenario import Scenario
from experiments.compare import aggregate, sweep
from experiments.plot import draw_sweep
from experiments.report import sweep_table
from experiments.scenarios import load
from experiments.theory import (
    matches, mean_field_response_s, mm1_relaxation_s, mm1_transient_response_s, supermarket_mu, warmup_needed_s,
)

LOADS = (0.5, 0.7, 0.9, 0.95, 0.99)


def variant(**node: object) -> Scenario:
    """The shipped scenario with 10 nodes and ``node`` keys changed on its table."""
    data = load("supermarket").with_nodes(10).to_dict()
    data["nodes"] = [{"id": "n", "count": 10, "workers": 1, "load_factor_ms": 25, **node}]
    return Scenario.from_mapping(data)


def test_the_shipped_scenario_is_a_thousand_alike_nodes_that_theory_covers_at_every_load() -> None:
    s = load("supermarket")
    assert len(s.nodes) == 1000 and s.nodes[0].id == "node-1" and s.nodes[-1].id == "node-1000"
    assert supermarket_mu(s) == 40.0 and s.capacity_per_s == 40_000
    for x in LOADS:
        assert mean_field_response_s(s, "random", x) == pytest.approx(0.025 / (1 - x))
        assert mean_field_response_s(s, "power_of_two", x) < mean_field_response_s(s, "random", x)
        assert mean_field_response_s(s, "least_connections", x) is None


def test_the_warm_up_a_point_needs_grows_as_the_relaxation_time() -> None:
    s = load("supermarket")
    assert mm1_relaxation_s(0.5, 1.0) == pytest.approx(1 / (1 - 0.5 ** 0.5) ** 2) == pytest.approx(11.657, abs=1e-3)
    assert warmup_needed_s(s, "random", 0.99) == pytest.approx(2 * 39_799.7 * 0.025, rel=1e-5)  # ~1,990 s
    assert warmup_needed_s(s, "power_of_two", 0.99) == pytest.approx(500 * 0.025)
    assert warmup_needed_s(s, "least_connections", 0.99) is None
    # The shipped run length covers every point but random at 0.99.
    assert [x for x in LOADS if warmup_needed_s(s, "random", x) > s.warmup_s] == [0.99]
    assert all(warmup_needed_s(s, "power_of_two", x) < s.warmup_s for x in LOADS)


@pytest.mark.parametrize("change", [
    {"workers": 2}, {"service": "deterministic"}, {"rate_limit_per_s": 100.0}, {"backpressure": 5},
    {"circuit_breaker": True}, {"max_per_client": 3}, {"faults": [{"start_s": 1, "end_s": 2, "error_rate": 0.1}]},
])
def test_theory_does_not_apply_to_other_nodes(change: dict) -> None:
    assert supermarket_mu(variant()) == 40.0
    assert supermarket_mu(variant(**change)) is None


def test_theory_does_not_apply_to_unlike_nodes_other_arrivals_overload_or_a_timeout_that_cuts() -> None:
    data = variant().to_dict()
    mixed = copy.deepcopy(data)
    mixed["nodes"][0]["load_factor_ms"] = 30
    assert supermarket_mu(Scenario.from_mapping(mixed)) is None
    constant = copy.deepcopy(data)
    constant["workload"]["arrival"] = "constant"
    assert supermarket_mu(Scenario.from_mapping(constant)) is None
    assert mean_field_response_s(variant(), "random", 1.0) is None
    # A 30 s timeout is 20 M/M/1 means at load 1 - 20 / (30 s * 40/s) = 0.983: 0.98 has theory, 0.99 not.
    data["balancer"]["timeout_s"] = 30
    short = Scenario.from_mapping(data)
    assert mean_field_response_s(short, "random", 0.98) and mean_field_response_s(short, "random", 0.99) is None
    assert supermarket_mu(load("seed")) is None and supermarket_mu(load("mm4")) is None  # 1+4+1 workers; 4


def test_matches_takes_the_larger_of_the_ci_and_three_percent() -> None:
    assert matches(102.9, None, 100.0) and not matches(103.1, 1.0, 100.0)
    assert matches(95.0, 5.5, 100.0) and not matches(94.0, 5.5, 100.0)


def row(strategy: str, load: float, mean: float, ci95: float | None, nodes: int = 10) -> dict:
    """An aggregate row (experiments.compare) with made-up numbers."""
    cell = {"mean": mean, "ci95": ci95}
    zero = {"mean": 0.0, "ci95": 0.0}
    return {"strategy": strategy, "load": load, "reps": 3,
            "latency_ms": {k: cell for k in ("mean", "p50", "p95", "p99")},
            "failed": {"count": zero, "percent": zero, "by_kind": {}},
            "share": {f"n-{i}": {"mean": (1 + (i == 0)) / (nodes + 1), "ci95": None} for i in range(nodes)}}


def test_the_table_has_theory_and_the_deviation_only_where_theory_applies() -> None:
    rows = [row("random", 0.5, 50.5, 1.0), row("power_of_two", 0.5, 36.0, 0.5), row("least_connections", 0.5, 25.0, 0.1)]
    table = sweep_table(rows, scenario=variant())
    lines = {line.split()[0]: line for line in table.splitlines()[2:5]}
    assert "theory ms" in table.splitlines()[0] and "sim vs theory" in table.splitlines()[0]
    assert "50.0  " in lines["random"] and "+1.0% ok" in lines["random"]
    assert "31.6  " in lines["power_of_two"] and "+13.8% OFF" in lines["power_of_two"]
    assert "%" not in lines["least_connections"].split("50.0")[0] and " ok" not in lines["least_connections"]
    assert "mean-field limit (n -> infinity)" in table and "whichever is larger" in table
    # Many nodes: the spread of the shares, not ten columns of them.
    assert "share %: min .. max of 10 (fair 10.00)" in table and "9.09 .. 18.18" in lines["random"]
    plain = sweep_table(rows)
    assert "theory" not in plain and "mean ms" in plain.splitlines()[0]
    assert "*" not in table


def test_the_table_marks_a_point_whose_warm_up_was_too_short_for_its_load() -> None:
    """Random at 0.9 needs 19 s (two M/M/1 relaxation times of 380 service times), power of two 1.25 s."""
    rows = [row("random", 0.9, 250.0, 10.0), row("power_of_two", 0.9, 65.0, 1.0), row("random", 0.5, 50.0, 1.0)]
    table = sweep_table(rows, scenario=variant().replace(duration_s=20, warmup_s=10))
    lines = {(line.split()[0], line.split()[1]): line for line in table.splitlines()[2:5]}
    assert "+0.0% ok*" in lines["random", "0.90"] and "ok*" not in lines["random", "0.50"]
    assert "% ok " in lines["power_of_two", "0.90"]
    assert "* the warm-up (10 s) is shorter than this point needs (up to 19 s" in table


def test_the_plot_draws_theory_dashed_in_each_strategy_colour_with_a_mean_panel() -> None:
    import matplotlib.pyplot as plt

    rows = [row(s, x, m, 1.0) for s, ms in (("power_of_two", (32.0, 65.0)), ("random", (50.0, 250.0)),
                                             ("least_connections", (25.0, 26.0))) for x, m in zip((0.5, 0.9), ms)]
    fig = draw_sweep(rows, title="t", scenario=variant())
    try:
        mean_ax = fig.axes[0]
        assert mean_ax.get_title() == "mean response time (OK requests)" and len(fig.axes) == 5
        dashed = {ln.get_color(): ln for ln in mean_ax.get_lines() if ln.get_linestyle() == "--"}
        assert set(dashed) == {"C1", "C2"}  # power_of_two, random; least connections has none
        ys = dashed["C2"].get_ydata()
        assert ys[0] == pytest.approx(50.0) and ys[-1] == pytest.approx(250.0)
        labels = [t.get_text() for t in fig.legends[0].get_texts()]
        assert "mean-field (n \u2192 \u221e)" in labels and "dashed: queueing theory" in fig._suptitle.get_text()
        fig.canvas.draw()
        legend_box = fig.legends[0].get_window_extent()
        assert all(not legend_box.overlaps(ax.get_window_extent()) for ax in fig.axes)
    finally:
        plt.close(fig)
    assert not [ln for ln in mean_ax.get_lines() if ln.get_marker() == "D"]  # warm-up long enough: no diamonds
    fig = draw_sweep(rows, title="t", scenario=variant().replace(duration_s=20, warmup_s=10))
    try:
        diamonds = [ln for ln in fig.axes[0].get_lines() if ln.get_marker() == "D"]
        assert [ln.get_color() for ln in diamonds] == ["C2"] and len(diamonds[0].get_xdata()) == 1  # random, 0.9
        assert diamonds[0].get_ydata()[0] == pytest.approx(1000 * mm1_transient_response_s(36, 40, 10, 20))
        assert any("from empty" in t.get_text() for t in fig.legends[0].get_texts())
    finally:
        plt.close(fig)
    fig = draw_sweep(rows, title="t")
    try:
        assert len(fig.axes) == 4  # no scenario, no theory: the usual panels
    finally:
        plt.close(fig)


def test_the_simulation_matches_theory_at_100_nodes_and_load_half() -> None:
    scenario = load("supermarket").with_nodes(100).replace(duration_s=12, warmup_s=2)
    rows = aggregate(sweep(scenario, ["random", "power_of_two"], [0.5], 4, workers=1))
    for r in rows:
        mean = r["latency_ms"]["mean"]
        expected = 1000 * mean_field_response_s(scenario, r["strategy"], 0.5)
        assert matches(mean["mean"], mean["ci95"], expected), (r["strategy"], mean, expected)
        assert mean["ci95"] < 0.03 * expected  # a check that can fail: the tolerance is the 3%, not a wide CI
    table = sweep_table(rows, scenario=scenario)
    assert table.count("% ok") == 2 and "theory ms" in table



def test_random_started_empty_follows_the_mm1_transient_and_the_table_says_so() -> None:
    """At 0.95 a window of 2..6 s (80..240 service times) is deep in the transient: theory's stationary
    500 ms is 46% off, the exact transient from empty is what the simulation must match."""
    scenario = load("supermarket").with_nodes(300).replace(duration_s=6, warmup_s=2)
    rows = aggregate(sweep(scenario, ["random"], [0.95], 3, workers=1))
    mean = rows[0]["latency_ms"]["mean"]
    expected = 1000 * mm1_transient_response_s(0.95 * 40, 40, 2, 6)
    assert 250 < expected < 300 and matches(mean["mean"], mean["ci95"], expected), (mean, expected)
    assert mean["ci95"] < 0.1 * expected
    table = sweep_table(rows, scenario=scenario)
    assert "% OFF*" in table and "random at 0.95: from empty, M/M/1 over 2..6 s averages" in table
    assert table.splitlines()[-1].endswith(" ok")


def test_a_run_summary_of_many_nodes_lists_the_idlest_and_busiest_few() -> None:
    from experiments.report import NODES_LISTED, run_summary

    lat = {k: 1.0 for k in ("mean", "p50", "p90", "p95", "p99", "max")}
    nodes = {f"n-{i}": {"requests": 100 + i, "share": 0.1, "utilization": 0.5, "latency_ms": lat} for i in range(10)}
    result = {"scenario": "s", "mode": "sim", "strategy": "random", "seed": 1, "warmup_s": 0, "duration_s": 1,
              "requests": {"sent": 1045, "ok": 1045, "rate_limited": 0, "backpressure": 0, "circuit_open": 0,
                           "errors": 0}, "throughput_rps": 1045.0, "latency_ms": lat, "nodes": nodes}
    listed = [line.split()[0] for line in run_summary(result).splitlines() if line.strip().startswith("n-")]
    assert NODES_LISTED == 3 and listed == ["n-0", "n-1", "n-2", "n-7", "n-8", "n-9"]
    assert "(10 nodes: the 3 with the fewest requests, then the 3 with the most)" in run_summary(result)
    few = {**result, "nodes": dict(list(nodes.items())[:6])}
    assert [line.split()[0] for line in run_summary(few).splitlines() if line.strip().startswith("n-")] == \
        [f"n-{i}" for i in range(6)]
