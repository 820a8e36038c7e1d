"""``testbed bench sim --nodes`` and ``--memory``: the shape of the tables and their JSON, the wall-time
budget, each run's peak RSS read in a fresh worker, and usage errors. Tiny sizes; no assert on speed."""

from __future__ import annotations

import json
import pathlib

import pytest
from click.testing import CliRunner

from experiments.bench_sim import Job, _pool, measure, parse_node_counts, scale_scenario
from experiments.cli import main
from solutions.impl import simulate


def invoke(*args: str):
    return CliRunner().invoke(main, ["bench", "sim", *args], catch_exceptions=False)


def test_scale_table_has_every_strategy_and_ciw_router_at_every_size(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "scale.json"
    result = invoke("--nodes", "4,2", "--strategies", "round_robin,least_connections,power_of_two",
                    "--requests", "1000", "--rounds", "1", "--json", str(out))
    assert result.exit_code == 0, result.output
    scale = json.loads(out.read_text())["scale"]
    assert scale["sizes"] == [2, 4] and scale["requests"] == 1000
    rows = {(r["model"], r["strategy"], r["nodes"]): r for r in scale["rows"]}
    expected = {(m, s, n) for n in (2, 4) for m, s in [("ours", "round_robin"), ("ours", "least_connections"),
                                                       ("ours", "power_of_two"), ("ciw", "round_robin"),
                                                       ("ciw", "least_connections")]}
    assert set(rows) == expected  # Ciw has no power-of-two router
    for (model, strategy, n), row in rows.items():
        assert row["arrivals"] > 0 and row["requests_per_s"] > 0
        assert row["peak_rss_mb"] >= scale["idle_worker_rss_mb"] > 0
        if n == 2:
            assert row["ratio_to_smallest"] == 1.0
        assert row["target"] is None  # targets are for 1,000 nodes against 3
    # Same seed, same arrivals: every strategy of ours simulated the same Poisson stream.
    assert len({rows[("ours", s, 4)]["arrivals"] for s in ("round_robin", "least_connections", "power_of_two")}) == 1
    lines = result.output.splitlines()
    assert any(line.split()[:2] == ["Ciw", "LoadBalancing"] for line in lines)
    assert sum(line.strip().startswith("power_of_two") for line in lines) == 2
    assert "at n / at 2" in result.output


def test_a_run_without_budget_simulates_every_arrival_of_the_scenario() -> None:
    m = measure(Job("ours", "least_connections", nodes=3, requests=2000, seed=5))
    sent = simulate(scale_scenario(3, "least_connections", 2000, seed=5), "solution")["requests"]["sent"]
    assert (m.arrivals, m.stopped) == (sent, False)


@pytest.mark.parametrize("model", ["ours", "ciw"])
def test_a_run_past_its_budget_stops_and_counts_what_it_simulated(model: str) -> None:
    # No machine simulates ten million arrivals in a tenth of a second.
    m = measure(Job(model, "round_robin", nodes=3, requests=10_000_000, budget_s=0.1))
    assert m.stopped
    assert 0 < m.arrivals < 10_000_000


def test_a_worker_reports_its_own_peak_not_its_parents() -> None:
    ballast = b"\x01" * 200_000_000  # this process's peak is now above 200 MB
    with _pool() as pool:
        idle = pool.submit(measure, Job("idle")).result()
    assert len(ballast) and idle.peak_rss_mb < 150


def test_memory_run_prints_and_writes_its_peak(tmp_path: pathlib.Path) -> None:
    out = tmp_path / "memory.json"
    result = invoke("--memory", "2000", "--nodes", "3", "--json", str(out))
    assert result.exit_code == 0, result.output
    memory = json.loads(out.read_text())["memory"]
    [row] = memory["rows"]
    assert (row["strategy"], row["nodes"], row["requests"] > 1000) == ("power_of_two", 3, True)
    assert row["peak_rss_mb"] >= memory["idle_worker_rss_mb"] > 0
    assert "peak RSS MB" in result.output


def test_node_counts_are_sorted_without_repeats() -> None:
    assert parse_node_counts(" 100,3,3, ") == [3, 100]


@pytest.mark.parametrize("args, message", [
    (["--nodes", "3,x"], "'x' is not a whole number of nodes"),
    (["--nodes", "0"], "0 is out of range"),
    (["--nodes", ","], "needs at least one node count"),
    (["--budget-s", "1"], "--strategies and --budget-s apply with --nodes or --memory"),
    (["--strategies", "random"], "--strategies and --budget-s apply with --nodes or --memory"),
    (["--memory", "5000", "--requests", "2000"], "drop --requests"),
    (["--nodes", "3", "--strategies", "fastest"], "unknown strategy 'fastest'"),
])
def test_bad_usage_is_one_line_naming_it(args: list[str], message: str) -> None:
    result = invoke(*args)
    assert result.exit_code == 2
    assert message in result.output and "Traceback" not in result.output
