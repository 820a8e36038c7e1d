"""The model's behaviour: reproducibility, strategies, faults, middleware, workloads."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from core.results import COLUMNS, Outcome
from core.scenario import Scenario
from core.summary import CENTROIDS
from experiments.scenarios import load
from sim.model import PROGRESS_STEPS
from sim.requests_file import RequestsFileError
from solutions.impl import simulate
from tests.sim.helpers import simulation


def three_nodes(**over) -> Scenario:
    data = {
        "name": "t", "seed": 3, "duration_s": 60.0, "warmup_s": 5.0,
        "workload": {"arrival": "poisson", "rate_per_s": 120.0, "clients": 10},
        "balancer": {"strategy": "least_connections"},
        "nodes": [{"id": f"node-{i + 1}", "workers": w, "load_factor_ms": 25} for i, w in enumerate([1, 4, 1])],
    }
    for key, value in over.items():
        data[key] = value
    return Scenario.from_mapping(data)


def test_same_seed_same_results_different_seed_different() -> None:
    s = load("seed").replace(duration_s=30)
    a, b = simulate(s, "solution"), simulate(s, "solution")
    assert json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)
    c = simulate(s.replace(seed=s.seed + 1), "solution")
    assert c["latency_ms"] != a["latency_ms"]


def test_least_connections_beats_round_robin_on_the_seed_scenario_at_70_percent() -> None:
    s = load("seed").with_load(0.7).replace(duration_s=60)
    rr = simulate(s.replace(strategy="round_robin"), "solution")
    lc = simulate(s.replace(strategy="least_connections"), "solution")
    assert lc["latency_ms"]["p95"] * 10 < rr["latency_ms"]["p95"]
    assert lc["latency_ms"]["mean"] * 10 < rr["latency_ms"]["mean"]
    # Round robin splits evenly; least connections sends the 4-worker node the most.
    assert all(abs(n["share"] - 1 / 3) < 0.01 for n in rr["nodes"].values())
    assert lc["nodes"]["node-2"]["share"] > 0.45


def test_results_schema() -> None:
    r = simulate(three_nodes(duration_s=10.0, warmup_s=1.0), "solution")
    assert set(r) >= {"scenario", "mode", "seed", "strategy", "duration_s", "requests", "throughput_rps",
                      "latency_ms", "nodes"}
    assert r["mode"] == "sim" and r["strategy"] == "least_connections"
    assert set(r["requests"]) == {"sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors"}
    assert set(r["latency_ms"]) == {"mean", "p50", "p90", "p95", "p99", "max"}
    assert sum(n["requests"] for n in r["nodes"].values()) == r["requests"]["sent"]
    assert sum(n["share"] for n in r["nodes"].values()) == pytest.approx(1.0)
    assert r["requests"]["sent"] == r["requests"]["ok"]
    assert r["throughput_rps"] == pytest.approx(120.0, rel=0.1)


def test_warmup_requests_are_not_counted() -> None:
    sim = simulation(three_nodes(duration_s=10.0, warmup_s=4.0)).run()
    arrivals = sim.log.columns()["arrival"]
    assert sim.results()["requests"]["sent"] == int(((arrivals >= 4.0) & (arrivals < 10.0)).sum())
    assert (arrivals < 4.0).sum() > 300


def test_crashed_node_is_routed_around_and_comes_back() -> None:
    nodes = [{"id": f"node-{i + 1}", "workers": 2, "load_factor_ms": 25} for i in range(3)]
    nodes[0]["faults"] = [{"start_s": 20.0, "end_s": 40.0, "down": True}]
    sim = simulation(three_nodes(nodes=nodes, duration_s=60.0, warmup_s=0.0,
                                 workload={"arrival": "poisson", "rate_per_s": 200.0})).run()
    c = sim.log.columns()
    during = (c["arrival"] > 20.0) & (c["arrival"] < 40.0)
    assert (c["node"][during] == 0).sum() == 0, "requests were sent to the crashed node"
    after = c["arrival"] > 42.0
    assert (c["node"][after] == 0).sum() > 100, "the node did not get traffic back after recovering"
    # Only what the node held at the crash was lost: at most its 2 workers plus a short queue.
    lost = c["outcome"] == Outcome.SERVER_ERROR
    assert 0 < lost.sum() <= 30
    assert np.allclose(c["end"][lost], 20.0)
    assert (c["outcome"] == Outcome.CONNECT_ERROR).sum() == 0  # the one refused connection was retried


def test_without_retry_a_refused_connection_is_an_error() -> None:
    nodes = [{"id": "a", "workers": 2, "load_factor_ms": 25, "faults": [{"start_s": 5.0, "end_s": 50.0, "down": True}]},
             {"id": "b", "workers": 2, "load_factor_ms": 25}]
    r = simulate(three_nodes(nodes=nodes, balancer={"strategy": "round_robin", "retry_connect_failures": False,
                                                        "health_check_interval_s": 2.0},
                                 workload={"arrival": "poisson", "rate_per_s": 40.0}, warmup_s=0.0), "solution")
    assert r["errors_detail"]["connect"] >= 1


def test_all_nodes_down_is_no_backend() -> None:
    nodes = [{"id": "a", "workers": 1, "load_factor_ms": 25, "faults": [{"start_s": 5.0, "end_s": 10.0, "down": True}]}]
    r = simulate(three_nodes(nodes=nodes, duration_s=15.0, warmup_s=0.0,
                                 workload={"arrival": "poisson", "rate_per_s": 20.0}), "solution")
    assert r["errors_detail"]["no_backend"] > 50


def test_circuit_breaker_opens_during_an_error_burst_and_closes_after() -> None:
    nodes = [{"id": "a", "workers": 4, "load_factor_ms": 10,
              "circuit_breaker": {"failure_threshold": 3, "recovery_timeout_s": 1.0},
              "faults": [{"start_s": 10.0, "end_s": 20.0, "error_rate": 1.0}]}]
    sim = simulation(three_nodes(nodes=nodes, duration_s=30.0, warmup_s=0.0,
                                 balancer={"eject_after_failures": 0},  # only the node's own breaker
                                 workload={"arrival": "poisson", "rate_per_s": 50.0})).run()
    c = sim.log.columns()
    burst = (c["arrival"] > 10.1) & (c["arrival"] < 20.0)
    fast_fail = c["outcome"][burst] == Outcome.CIRCUIT_OPEN
    assert fast_fail.mean() > 0.8, "most requests during the burst should fail fast"
    # Failing work is only the probes (plus the first few failures): about one per second.
    assert (c["outcome"][burst] == Outcome.SERVER_ERROR).sum() < 30
    after = c["arrival"] > 21.5
    assert (c["outcome"][after] == Outcome.OK).all()


@pytest.mark.parametrize("eject", [5, 0])
def test_balancer_ejects_a_node_that_fails_fast(eject: int) -> None:
    """A node whose breaker is open answers 503 in no time, so least connections would
    pour traffic into it; the balancer's ejector takes it out instead."""
    nodes = [{"id": f"node-{i + 1}", "workers": 2, "load_factor_ms": 25, "circuit_breaker": True} for i in range(3)]
    nodes[0]["faults"] = [{"start_s": 10.0, "end_s": 40.0, "error_rate": 1.0}]
    r = simulate(three_nodes(nodes=nodes, warmup_s=0.0, balancer={"strategy": "least_connections",
                                                                      "eject_after_failures": eject}), "solution")
    failed = r["requests"]["errors"] + r["requests"]["circuit_open"]
    if eject:
        assert failed < 100, r["requests"]   # a few per ejection period
    else:
        assert failed > 1000, r["requests"]  # the black hole: fast failures attract traffic


def test_extra_latency_fault_slows_responses() -> None:
    nodes = [{"id": "a", "workers": 8, "load_factor_ms": 10, "service": "deterministic",
              "faults": [{"start_s": 5.0, "end_s": 10.0, "extra_latency_ms": 100}]}]
    sim = simulation(three_nodes(nodes=nodes, duration_s=15.0, warmup_s=0.0,
                                 workload={"arrival": "constant", "rate_per_s": 20.0})).run()
    c = sim.log.columns()
    response = c["end"] - c["arrival"]
    assert np.allclose(response[(c["arrival"] > 5.0) & (c["arrival"] < 10.0)], 0.110)
    assert np.allclose(response[c["arrival"] > 10.0], 0.010)


def test_per_client_rate_limit_behind_the_balancer() -> None:
    """20 clients at 4/s each through a node limited to 2/s per client: about half refused."""
    nodes = [{"id": "a", "workers": 8, "load_factor_ms": 5, "rate_limit_per_s": 2.0, "rate_limit_burst": 2.0}]
    r = simulate(three_nodes(nodes=nodes, duration_s=60.0, warmup_s=10.0,
                                 workload={"arrival": "poisson", "rate_per_s": 80.0, "clients": 20}), "solution")
    q = r["requests"]
    assert 0.4 < q["rate_limited"] / q["sent"] < 0.6
    assert q["ok"] <= 20 * 2.0 * 50 + 20 * 2  # the bucket bound over the window, plus bursts


def test_closed_loop_obeys_littles_law() -> None:
    """N clients, think time Z: throughput X = N / (R + Z)."""
    s = three_nodes(workload={"arrival": "closed", "clients": 12, "think_time_ms": 100.0},
                    duration_s=120.0, warmup_s=10.0)
    r = simulate(s, "solution")
    response_s = r["latency_ms"]["mean"] / 1000
    assert r["throughput_rps"] == pytest.approx(12 / (response_s + 0.100), rel=0.03)


def test_constant_arrivals_are_evenly_spaced() -> None:
    sim = simulation(three_nodes(workload={"arrival": "constant", "rate_per_s": 50.0}, duration_s=2.0,
                                 warmup_s=0.0)).run()
    arrivals = np.sort(sim.log.columns()["arrival"])
    assert np.allclose(np.diff(arrivals), 0.02)


@pytest.mark.parametrize("name", ["seed", "faults", "rate-limited", "closed-loop", "mm4"])
def test_shipped_scenarios_run(name: str) -> None:
    r = simulate(load(name).replace(duration_s=5), "solution")
    assert r["requests"]["sent"] > 0


def test_a_response_slower_than_the_balancer_timeout_is_a_504_at_the_timeout() -> None:
    # Round robin at 70% overloads the two one-worker nodes (56/s each against 40/s): their queues
    # grow without bound, so late requests wait far longer than the 2 s timeout.
    s = three_nodes(balancer={"strategy": "round_robin", "timeout_s": 2.0},
                    workload={"arrival": "poisson", "rate_per_s": 168.0, "clients": 10})
    sim = simulation(s).run()
    r = sim.results()
    assert r["errors_detail"]["timeout"] > 500
    c = sim.log.columns()
    late = c["outcome"] == Outcome.TIMEOUT
    assert np.allclose(c["end"][late] - c["arrival"][late], 2.0)
    assert (c["end"][~late] - c["arrival"][~late]).max() <= 2.0
    assert set(c["node"][late]) <= {0, 2}  # only the overloaded one-worker nodes
    untimed = simulate(s.replace(strategy="least_connections"), "solution")
    assert untimed["errors_detail"]["timeout"] == 0


def test_a_run_holds_one_chunk_of_rows_and_its_results_are_those_of_keeping_every_row() -> None:
    s = three_nodes(duration_s=30.0)
    bounded = simulation(s, keep_rows=False, chunk_rows=500).run()
    kept = simulation(s, chunk_rows=500).run()
    assert len(bounded.log) == len(kept.log) == len(kept.log.columns()["arrival"]) > 3000
    assert len(bounded.log.columns()["arrival"]) < 500  # the rest was folded and forgotten
    assert json.dumps(bounded.results(), sort_keys=True) == json.dumps(kept.results(), sort_keys=True)
    assert bounded.results()["simulated_requests"] == len(kept.log)


def window_ok(sim) -> dict[str, np.ndarray]:
    c = sim.log.columns()
    s = sim.scenario
    ok = (c["arrival"] >= s.warmup_s) & (c["arrival"] < s.duration_s) & (c["outcome"] == Outcome.OK)
    return {"response_ms": (c["end"] - c["arrival"])[ok] * 1000.0, "node": c["node"][ok]}


def test_percentiles_are_within_half_a_percent_of_the_exact_ones_mean_and_max_exact() -> None:
    """A run small enough to keep every row, but with more OK responses per node than a digest keeps
    exactly (CENTROIDS), folded in chunks as a long run folds them."""
    nodes = [{"id": f"node-{i + 1}", "workers": 2, "load_factor_ms": 25} for i in range(3)]
    sim = simulation(three_nodes(nodes=nodes, duration_s=120.0, workload={"arrival": "poisson", "rate_per_s": 200.0}),
                     chunk_rows=4096).run()
    r, rows = sim.results(), window_ok(sim)
    groups = {"all": (r["latency_ms"], rows["response_ms"])}
    for i, (node_id, node) in enumerate(r["nodes"].items()):
        groups[node_id] = (node["latency_ms"], rows["response_ms"][rows["node"] == i])
    for name, (got, exact) in groups.items():
        assert exact.size > CENTROIDS, (name, exact.size)
        for key, p in (("p50", 50), ("p90", 90), ("p95", 95), ("p99", 99)):
            want = float(np.percentile(exact, p))
            assert abs(got[key] / want - 1) < 0.005, f"{name} {key}: {got[key]:.4f} ms vs exact {want:.4f} ms"
        assert got["max"] == pytest.approx(exact.max(), rel=1e-12)
        assert got["mean"] == pytest.approx(exact.mean(), rel=1e-9)


def test_keep_requests_writes_every_row_and_they_give_back_the_counts(tmp_path) -> None:
    s = three_nodes(duration_s=30.0, workload={"arrival": "poisson", "rate_per_s": 168.0},
                    balancer={"strategy": "round_robin", "timeout_s": 2.0})  # overloads two nodes: timeouts too
    path = tmp_path / "requests.npz"
    sim = simulation(s, keep_rows=False, chunk_rows=1000).keep_requests(path).run()
    r = sim.results()
    with np.load(path) as f:
        rows = {k: f[k] for k in f.files}
    assert sorted(rows) == sorted(COLUMNS) and all(rows[k].dtype == np.dtype(t) for k, t in COLUMNS.items())
    assert len(rows["arrival"]) == len(sim.log) > 4000
    window = (rows["arrival"] >= s.warmup_s) & (rows["arrival"] < s.duration_s)
    outcome, node = rows["outcome"][window], rows["node"][window]
    assert r["requests"]["sent"] == int(window.sum())
    assert r["requests"]["ok"] == int((outcome == Outcome.OK).sum())
    assert r["errors_detail"]["timeout"] == int((outcome == Outcome.TIMEOUT).sum()) > 0
    assert [n["requests"] for n in r["nodes"].values()] == [int((node == i).sum()) for i in range(3)]
    # The very rows a run that keeps them holds, in the same order.
    kept = simulation(s).run().log.columns()
    assert all(np.array_equal(rows[k], kept[k], equal_nan=k == "start") for k in COLUMNS)
    assert [p.name for p in tmp_path.iterdir()] == ["requests.npz"]  # no spool left behind


def test_keep_requests_names_a_path_it_cannot_write_before_the_run(tmp_path) -> None:
    with pytest.raises(RequestsFileError, match=f"^{re.escape(str(tmp_path))}: is a directory"):
        simulation(three_nodes(), keep_rows=False).keep_requests(tmp_path)
    missing = tmp_path / "no-such-dir" / "r.npz"
    with pytest.raises(RequestsFileError, match=f"^{re.escape(str(missing))}: cannot write there"):
        simulation(three_nodes(), keep_rows=False).keep_requests(missing)


def test_progress_reports_simulated_time_and_changes_nothing() -> None:
    s = three_nodes(duration_s=20.0)
    seen: list[tuple[float, float]] = []
    with_progress = simulation(s, keep_rows=False).run(progress=lambda now, total: seen.append((now, total)))
    assert len(seen) == PROGRESS_STEPS + 1 and seen[-1] == (20.0, 20.0)
    assert all(total == 20.0 for _, total in seen)
    assert [now for now, _ in seen] == sorted(now for now, _ in seen) and seen[0][0] == pytest.approx(0.1)
    plain = simulation(s, keep_rows=False).run()
    assert json.dumps(with_progress.results(), sort_keys=True) == json.dumps(plain.results(), sort_keys=True)
