"""The node's and the balancer's request path in the simulator: what must come back after a failure.

* A request the node's circuit breaker refuses was admitted by the backpressure
  gate first, so the refusal must give its slot back; otherwise each refusal
  leaks a place and the node ends up refusing everything as "backpressure"
  long after the breaker has closed.
* A backend the balancer's ejector took out comes back once ``ejection_time_s``
  has passed and a probe succeeded.

The balancer-side ejection is off in the first test so that only the node's own
breaker and gate are at work. The same two properties are checked on the live
apps in ``tests/live/test_request_path.py``.
"""

from __future__ import annotations

from core.results import Outcome
from core.scenario import Scenario
from tests.sim.helpers import simulation

FAULT_START_S, FAULT_END_S = 5.0, 10.0


def scenario(nodes: list[dict], **balancer) -> Scenario:
    """Constant arrivals at 50/s for 20 s over ``nodes``, round robin, nothing discarded as warm-up."""
    return Scenario.from_mapping({
        "name": "request-path", "seed": 7, "duration_s": 20.0, "warmup_s": 0.0,
        "workload": {"arrival": "constant", "rate_per_s": 50.0},
        "balancer": {"strategy": "round_robin", **balancer},
        "nodes": nodes,
    })


def test_breaker_refusals_give_their_backpressure_slot_back() -> None:
    """One request inside the node at a time (a 10 ms job every 20 ms) and room for 3: the gate
    never refuses anything, however many requests the open breaker refuses meanwhile."""
    breaker = {"failure_threshold": 3, "recovery_timeout_s": 1.0}
    node = {"id": "a", "workers": 1, "load_factor_ms": 10, "service": "deterministic", "backpressure": 3,
            "circuit_breaker": breaker,
            "faults": [{"start_s": FAULT_START_S, "end_s": FAULT_END_S, "error_rate": 1.0}]}
    sim = simulation(scenario([node], eject_after_failures=0)).run()
    c = sim.log.columns()
    outcome, arrival = c["outcome"], c["arrival"]
    gated = outcome == Outcome.BACKPRESSURE
    assert not gated.any(), (f"{int(gated.sum())} backpressure refusals, the first at t={arrival[gated].min():.3f} s; "
                             "a node holding one request at a time always has room")
    # Once the fault is over, the next probe (at most recovery_timeout_s later) closes the breaker,
    # and from then on every request is served: OK responses are back to one per arrival.
    after = arrival > FAULT_END_S + breaker["recovery_timeout_s"] + 0.05
    assert after.sum() > 400
    ok = int((outcome[after] == Outcome.OK).sum())
    assert ok == int(after.sum()), f"{ok} OK of {int(after.sum())} arrivals after the breaker closed"
    before = arrival < FAULT_START_S - 0.05  # done before the fault began
    assert (outcome[before] == Outcome.OK).all()
    # A meaningful check: the open breaker refused many more requests than the gate has places.
    refused = int((outcome == Outcome.CIRCUIT_OPEN).sum())
    assert refused > 10 * 3, f"only {refused} breaker refusals: too few to exhaust 3 places if each leaked one"


def test_an_ejected_backend_gets_traffic_again_after_its_ejection_time() -> None:
    """Node a fails every request for 5 s: the ejector takes it out (after 3 failures, for 1 s at a
    time, a probe between), and once the fault is over the next probe succeeds and round robin
    gives it its half again."""
    ejection_time_s = 1.0
    nodes = [{"id": "a", "workers": 1, "load_factor_ms": 5, "service": "deterministic",
              "faults": [{"start_s": FAULT_START_S, "end_s": FAULT_END_S, "error_rate": 1.0}]},
             {"id": "b", "workers": 1, "load_factor_ms": 5, "service": "deterministic"}]
    sim = simulation(scenario(nodes, eject_after_failures=3, ejection_time_s=ejection_time_s)).run()
    c = sim.log.columns()
    arrival, node, outcome = c["arrival"], c["node"], c["outcome"]

    during = (arrival > FAULT_START_S + 0.5) & (arrival < FAULT_END_S)
    to_a = int((node[during] == 0).sum())
    # Ejected: a gets only the probes, one per ejection period (not its 112 of the 225 arrivals).
    assert 1 <= to_a <= (FAULT_END_S - FAULT_START_S) / ejection_time_s + 1, to_a
    assert (outcome[during & (node == 1)] == Outcome.OK).all()

    later = arrival > FAULT_END_S + ejection_time_s + 0.05
    share = float((node[later] == 0).mean())
    assert share > 0.45, f"node a's share after the fault is {share:.3f}; it should be back to about half"
    assert (outcome[later] == Outcome.OK).all()
    failed = int((outcome == Outcome.SERVER_ERROR).sum())
    assert failed <= 3 + (FAULT_END_S - FAULT_START_S) / ejection_time_s + 1, failed


def test_a_client_bulkhead_bounds_what_an_overloaded_node_holds() -> None:
    """Twice the node's capacity from 4 clients, at most 1 of each inside: the node never holds more
    than 4 requests, so no OK response waits longer than 3 services ahead of its own (400 ms), and
    the excess is shed as backpressure instead of queueing without bound (as it does without)."""
    def run(**bulkhead: int) -> dict:
        node = {"id": "a", "workers": 1, "load_factor_ms": 100, "service": "deterministic", **bulkhead}
        return simulation(Scenario.from_mapping({
            "name": "bulkhead", "seed": 3, "duration_s": 30.0, "warmup_s": 0.0,
            "workload": {"arrival": "poisson", "rate_per_s": 20.0, "clients": 4}, "nodes": [node]})).run().results()

    bounded, unbounded = run(max_per_client=1), run()
    assert bounded["requests"]["ok"] > 250 and bounded["requests"]["backpressure"] > 200, bounded["requests"]
    assert bounded["latency_ms"]["max"] <= 400.0 + 1e-6, bounded["latency_ms"]
    assert unbounded["requests"]["backpressure"] == 0 and unbounded["latency_ms"]["max"] > 5_000


def test_a_hung_node_stops_getting_new_requests_within_two_health_intervals() -> None:
    """Node a hangs (every request it holds takes 20 s more) for 10 s: the balancer's stall rule,
    core's and the live balancer's, ejects it about half a second later (it holds requests and has
    answered none for longer than the 0.5 s floor), so the new requests go to b. Without the rule
    the health checks (which a hung node in the simulator passes) never take it out and it keeps
    half the traffic."""
    interval_s, hang_s = 1.0, 20_000
    nodes = [{"id": "a", "workers": 2, "load_factor_ms": 5, "service": "deterministic",
              "faults": [{"start_s": FAULT_START_S, "end_s": FAULT_END_S + 5, "extra_latency_ms": hang_s}]},
             {"id": "b", "workers": 2, "load_factor_ms": 5, "service": "deterministic"}]

    def to_a_while_hung(rule: bool) -> tuple[int, int]:
        sim = simulation(scenario(nodes, health_check_interval_s=interval_s, ejection_time_s=5.0))
        if not rule:
            sim.balancer.stall_rule = None
        c = sim.run().log.columns()
        hung = (c["arrival"] >= FAULT_START_S + 2 * interval_s) & (c["arrival"] < FAULT_END_S + 5)
        return int((c["node"][hung] == 0).sum()), sim.balancer.backends["a"].stall.stalls

    late, stalls = to_a_while_hung(True)
    # One probe per ejection period at most (5 s of 8), and it is held by the hang: nothing else.
    assert late <= 2 and stalls >= 1, (late, stalls)
    assert to_a_while_hung(False)[0] > 150  # half of the 400 arrivals in those 8 s
