"""Scenario files: every bad key is named with its value and what is allowed."""

from __future__ import annotations

import copy
import pathlib

import pytest

from core.scenario import Scenario, ScenarioError
from experiments.scenarios import load, shipped

GOOD = {
    "name": "t", "seed": 1, "duration_s": 30, "warmup_s": 5,
    "workload": {"arrival": "poisson", "rate_per_s": 50, "clients": 3},
    "balancer": {"strategy": "least_connections"},
    "nodes": [{"id": "a", "workers": 2, "load_factor_ms": 20},
              {"id": "b", "workers": 1, "load_factor_ms": 20, "circuit_breaker": True,
               "faults": [{"start_s": 1, "end_s": 2, "error_rate": 0.5}]}],
}


def with_(path: str, value) -> dict:
    data = copy.deepcopy(GOOD)
    *parents, last = path.split(".")
    target = data
    for p in parents:
        target = target[int(p)] if isinstance(target, list) else target[p]
    if value is KeyError:
        del target[last]
    else:
        target[last] = value
    return data


def test_good_scenario_round_trips() -> None:
    s = Scenario.from_mapping(GOOD, source="t.toml")
    assert s.nodes[1].circuit_breaker.failure_threshold == 3
    assert s.capacity_per_s == pytest.approx(150.0)
    assert Scenario.from_mapping(s.to_dict()) == s


@pytest.mark.parametrize("path, value, words", [
    ("name", KeyError, "name = (missing): is required"),
    ("duration_s", 0, "duration_s = 0: must be a number > 0"),
    ("duration_s", "60", "duration_s = '60': must be a number"),
    ("warmup_s", 30, "warmup_s = 30: must be less than duration_s (30)"),
    ("seed", -1, "seed = -1: must be an integer >= 0"),
    ("workload.arrival", "bursty", "workload.arrival = 'bursty': must be one of: poisson, constant, closed"),
    ("workload.rate_per_s", -5, "workload.rate_per_s = -5: must be a number > 0"),
    ("workload.clients", 0, "workload.clients = 0: must be an integer >= 1"),
    ("workload.think", 5, "workload.think = 5: unknown key; known keys here: arrival, clients, rate_per_s, think_time_ms"),
    ("balancer.strategy", "fastest", "balancer.strategy = 'fastest': must be one of: round_robin"),
    ("nodes", [], "nodes = []: must be a non-empty array of tables"),
    ("nodes.0.workers", 0, "nodes[0].workers = 0: must be an integer >= 1"),
    ("nodes.0.workers", 2.5, "nodes[0].workers = 2.5: must be an integer >= 1"),
    ("nodes.0.workers", True, "nodes[0].workers = True: must be an integer"),
    ("nodes.0.service", "pareto", "nodes[0].service = 'pareto': must be one of: exponential, deterministic"),
    ("nodes.0.load_factor_ms", 0, "nodes[0].load_factor_ms = 0: must be a number > 0"),
    ("nodes.0.backpressure", 0, "nodes[0].backpressure = 0: must be an integer >= 1"),
    ("nodes.0.rate_limit_per_s", 0, "nodes[0].rate_limit_per_s = 0: must be a number > 0"),
    ("nodes.0.circuit_breaker", "yes", "nodes[0].circuit_breaker = 'yes': must be true, false or a table"),
    ("nodes.0.circuit_breaker", {"failure_threshold": 0}, "nodes[0].circuit_breaker.failure_threshold = 0"),
    ("nodes.0.circuit_breaker", {"half_open_max_calls": 1, "success_threshold": 2},
     "nodes[0].circuit_breaker.success_threshold = 2: must be an integer >= 1 and <= half_open_max_calls (1)"),
    ("nodes.1.id", "a", "nodes[1].id = 'a': must be unique"),
    ("nodes.1.faults", [{"start_s": 5, "end_s": 2}], "nodes[1].faults[0].end_s = 2: must be greater than start_s (5)"),
    ("nodes.1.faults", [{"start_s": 1, "end_s": 2, "error_rate": 1.5}],
     "nodes[1].faults[0].error_rate = 1.5: must be a number >= 0 and <= 1"),
    ("nodes.1.faults", [{"end_s": 2}], "nodes[1].faults[0].start_s = (missing): is required"),
    ("nodes.1.colour", "red", "nodes[1].colour = 'red': unknown key"),
])
def test_bad_values_are_named(path: str, value, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        Scenario.from_mapping(with_(path, value), source="t.toml")
    assert str(info.value).startswith("t.toml: ")
    assert words in str(info.value), str(info.value)


def test_closed_loop_needs_think_time() -> None:
    with pytest.raises(ScenarioError, match="think_time_ms"):
        Scenario.from_mapping(with_("workload", {"arrival": "closed", "clients": 3}))


def test_overrides_are_validated() -> None:
    s = Scenario.from_mapping(GOOD)
    assert s.replace(strategy="round_robin").balancer.strategy == "round_robin"
    assert s.with_load(0.5).workload.rate_per_s == pytest.approx(75.0)
    assert s.replace(duration_s=6).warmup_s == 3  # warm-up shrinks to fit
    with pytest.raises(ScenarioError, match="balancer.strategy"):
        s.replace(strategy="nope")
    assert s.replace(duration_s=12, warmup_s=2).warmup_s == 2
    with pytest.raises(ScenarioError, match="warmup_s"):
        s.replace(duration_s=6, warmup_s=6)


def test_file_errors(tmp_path: pathlib.Path) -> None:
    with pytest.raises(ScenarioError, match="no such file, and not a shipped scenario"):
        load(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("name = 'x'\nduration_s = = 3\n")
    with pytest.raises(ScenarioError) as info:
        load(bad)
    # Where, in the parser's words, with the line itself and a caret under the column.
    assert str(info.value) == ("bad.toml: line 2, column 14: not valid TOML: Invalid value\n"
                               "    duration_s = = 3\n"
                               "                 ^")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ScenarioError, match="not UTF-8"):
        load(binary)


@pytest.mark.parametrize("name", sorted(shipped()))
def test_every_shipped_scenario_is_valid(name: str) -> None:
    assert load(name).name


def test_count_expands_a_table_into_alike_nodes_and_round_trips() -> None:
    data = with_("nodes", [{"id": "n", "count": 3, "load_factor_ms": 10}, {"id": "solo", "workers": 2}])
    s = Scenario.from_mapping(data)
    assert [n.id for n in s.nodes] == ["n-1", "n-2", "n-3", "solo"]
    assert {n.load_factor_ms for n in s.nodes[:3]} == {10.0}
    assert s.capacity_per_s == pytest.approx(3 * 100 + 80)
    assert Scenario.from_mapping(s.to_dict()) == s
    assert s.replace(strategy="random").nodes == s.nodes
    one = Scenario.from_mapping(with_("nodes", [{"id": "n", "count": 1}]))
    assert [n.id for n in one.nodes] == ["n-1"]


@pytest.mark.parametrize("nodes, words", [
    ([{"id": "n", "count": 0}], "nodes[0].count = 0: must be an integer >= 1 and <= 10000"),
    ([{"id": "n", "count": 2.0}], "nodes[0].count = 2.0: must be an integer"),
    ([{"id": "n", "count": "3"}], "nodes[0].count = '3': must be an integer"),
    ([{"id": "n", "count": 10_001}], "nodes[0].count = 10001: must be an integer >= 1 and <= 10000"),
    ([{"id": "n", "count": 6000}, {"id": "m", "count": 6000}],
     "nodes[1].count = 6000: makes 12,000 nodes in all; a scenario has at most 10,000"),
    ([{"id": "n-2"}, {"id": "n", "count": 3}],
     "nodes[1].id = 'n': with count = 3 makes ids n-1 .. n-3, and another node has the id 'n-2'"),
    ([{"id": "n", "count": 2}, {"id": "n-1"}], "nodes[1].id = 'n-1': must be unique; another node has this id"),
    ([{"id": "n", "count": 2, "workers": 0}], "nodes[0].workers = 0: must be an integer >= 1"),
])
def test_bad_counts_are_named(nodes: list, words: str) -> None:
    with pytest.raises(ScenarioError) as info:
        Scenario.from_mapping(with_("nodes", nodes), source="t.toml")
    assert str(info.value).startswith("t.toml: ") and words in str(info.value), str(info.value)


def test_with_nodes_resizes_alike_nodes_at_the_same_load() -> None:
    s = Scenario.from_mapping(with_("nodes", [{"id": "n", "count": 4, "load_factor_ms": 10}]))
    big = s.with_nodes(10)
    assert [n.id for n in big.nodes] == [f"n-{k}" for k in range(1, 11)]
    assert big.workload.rate_per_s / big.capacity_per_s == pytest.approx(s.workload.rate_per_s / s.capacity_per_s)
    assert big.with_nodes(4) == s
    single = Scenario.from_mapping(with_("nodes", [{"id": "node-1"}]))
    assert [n.id for n in single.with_nodes(2).nodes] == ["node-1", "node-2"]
    with pytest.raises(ScenarioError, match="nodes.0..count = 0: must be an integer >= 1"):
        s.with_nodes(0)
    with pytest.raises(ScenarioError, match="t: the number of nodes can change only when they are all alike but for "
                                            "their ids; these are of 2 kinds"):
        Scenario.from_mapping(GOOD).with_nodes(3)
