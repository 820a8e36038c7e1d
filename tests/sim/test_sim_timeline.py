"""The simulator's timeline: what the faults scenario does, interval by interval, and the state changes behind it."""

from __future__ import annotations

import pytest

from core.scenario import Scenario
from experiments.scenarios import load
from tests.sim.helpers import simulation


@pytest.fixture(scope="module")
def faults() -> dict:
    return simulation(load("faults"), keep_rows=False).run().results()


def events(results: dict, **match: str) -> list[dict]:
    return [e for e in results["timeline"]["events"] if all(e[k] == v for k, v in match.items())]


def test_a_crashed_node_takes_nothing_while_down_and_the_checks_say_so(faults) -> None:
    tl = faults["timeline"]
    share = dict(zip(tl["t"], tl["nodes"]["node-1"]["share"]))
    assert all(share[t] == 0.0 for t in range(21, 40))
    assert share[19] > 0.2 and share[45] > 0.2
    assert [(e["t"], e["to"]) for e in events(faults, target="node-1", kind="fault")] == [(20.0, "down"), (40.0, "ok")]
    health = [(e["t"], e["to"]) for e in events(faults, target="node-1", kind="health")]
    assert [to for _, to in health] == ["down", "up"]
    interval = 1.0  # the scenario's health-check interval
    assert 20.0 <= health[0][0] <= 20.0 + interval and 40.0 <= health[1][0] <= 40.0 + interval


def test_an_erroring_node_trips_its_breaker_and_the_balancers_ejector(faults) -> None:
    breaker = events(faults, target="node-2", kind="breaker")
    ejector = events(faults, target="node-2", kind="ejector")
    assert breaker[0]["from"] == "CLOSED" and breaker[0]["to"] == "OPEN" and 50.0 < breaker[0]["t"] < 52.0
    assert ejector and 50.0 < ejector[0]["t"] < 52.0 and ejector[0]["to"] == "OPEN"
    assert breaker[-1]["to"] == "CLOSED" and 65.0 <= breaker[-1]["t"] < 70.0
    tl = faults["timeline"]
    assert sum(tl["nodes"]["node-2"]["errors"][50:66]) > 0
    assert sum(tl["nodes"]["node-2"]["circuit_open"][50:66]) + sum(tl["nodes"]["node-2"]["errors"][50:66]) \
        < sum(tl["nodes"]["node-2"]["requests"][40:50])  # it is routed around, not hammered


def test_the_timeline_adds_up_to_the_run_and_changes_nothing_in_it() -> None:
    scenario = load("faults")
    with_timeline = simulation(scenario, keep_rows=True).run()
    results = with_timeline.results()
    tl = results.pop("timeline")
    assert sum(tl["overall"]["requests"]) == len(with_timeline.log) == results["simulated_requests"]
    without = simulation(scenario, keep_rows=True, timeline=False).run().results()
    assert "timeline" not in without and without == results
    again = simulation(scenario, keep_rows=False).run().results()["timeline"]
    assert again == tl


def test_a_breaker_left_open_by_a_crash_shows_reset_when_the_node_comes_back() -> None:
    scenario = Scenario.from_mapping({
        "name": "crash-while-open", "seed": 3, "duration_s": 30, "warmup_s": 0,
        "workload": {"arrival": "poisson", "rate_per_s": 40},
        "balancer": {"strategy": "round_robin", "health_check_interval_s": 1.0},
        "nodes": [{"id": "a", "workers": 1, "load_factor_ms": 10, "circuit_breaker": {
                       "failure_threshold": 3, "recovery_timeout_s": 60},
                   "faults": [{"start_s": 5, "end_s": 10, "error_rate": 1.0}, {"start_s": 12, "end_s": 15, "down": True}]},
                  {"id": "b", "workers": 1, "load_factor_ms": 10}]})
    results = simulation(scenario, keep_rows=False).run().results()
    breaker = [(e["from"], e["to"], e.get("detail")) for e in events(results, target="a", kind="breaker")]
    assert breaker[0] == ("CLOSED", "OPEN", "trip")
    assert breaker[-1] == ("OPEN", "CLOSED", "restarted")
    assert events(results, target="a", kind="breaker")[-1]["t"] == 15.0


def test_over_a_hundred_nodes_the_timeline_keeps_the_overall_series() -> None:
    scenario = Scenario.from_mapping({
        "name": "many", "seed": 1, "duration_s": 2, "warmup_s": 0,
        "workload": {"arrival": "poisson", "rate_per_s": 2000},
        "balancer": {"strategy": "power_of_two"},
        "nodes": [{"id": "n", "count": 150, "workers": 1, "load_factor_ms": 25}]})
    tl = simulation(scenario, keep_rows=False).run().results()["timeline"]
    assert tl["nodes"] == {} and tl["nodes_omitted"] == 150 and sum(tl["overall"]["requests"]) > 3000
    tl = simulation(scenario, keep_rows=False, timeline_nodes=200).run().results()["timeline"]
    assert len(tl["nodes"]) == 150 and tl["nodes_omitted"] == 0


def test_a_cool_down_that_was_due_before_a_crash_is_on_the_timeline() -> None:
    """The breaker moves OPEN -> HALF_OPEN by time alone; nobody asked it between its deadline and the crash,
    yet the timeline has the move at its deadline, and the restart resets HALF_OPEN, as the live runner sees it."""
    scenario = Scenario.from_mapping({
        "name": "cool-down-then-crash", "seed": 3, "duration_s": 14, "warmup_s": 0,
        "workload": {"arrival": "poisson", "rate_per_s": 40},
        "balancer": {"strategy": "round_robin", "health_check_interval_s": 1.0, "eject_after_failures": 2,
                     "ejection_time_s": 30},
        "nodes": [{"id": "a", "workers": 1, "load_factor_ms": 10, "circuit_breaker": {
                       "failure_threshold": 2, "recovery_timeout_s": 1},
                   "faults": [{"start_s": 5, "end_s": 8, "error_rate": 1.0}, {"start_s": 8, "end_s": 10, "down": True}]},
                  {"id": "b", "workers": 1, "load_factor_ms": 10}]})
    results = simulation(scenario, keep_rows=False).run().results()
    breaker = events(results, target="a", kind="breaker")
    trip = next(e for e in breaker if e["to"] == "OPEN")
    cooled = [e for e in breaker if e["from"] == "OPEN" and e["to"] == "HALF_OPEN"]
    assert cooled and cooled[0]["t"] == pytest.approx(trip["t"] + 1.0) and cooled[0]["t"] < 8.0
    assert (breaker[-1]["from"], breaker[-1]["to"], breaker[-1]["t"]) == ("HALF_OPEN", "CLOSED", 10.0)
    ejector = events(results, target="a", kind="ejector")
    assert ejector[0]["to"] == "OPEN" and ejector[-1]["to"] == "OPEN"  # 30 s ejection: still out at the end
