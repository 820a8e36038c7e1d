"""The client bulkhead alone, and inside the node's request path (sim and live drive the same object)."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from core.backpressure import ReleaseWithoutAcquire
from core.bulkhead import ClientBulkhead
from core.node_pipeline import NodePipeline, Rejected, Ticket
from core.results import Outcome, outcome_of
from core.scenario import BreakerSpec, NodeSpec, Scenario, ScenarioError


def test_each_client_has_its_own_bound_and_leaves_no_memory() -> None:
    b = ClientBulkhead(2)
    assert b.try_acquire("a") and b.try_acquire("a") and not b.try_acquire("a")
    assert b.try_acquire("b")  # another client is not affected
    assert (b.inside("a"), b.clients, b.rejected) == (2, 2, 1)
    b.release("a")
    assert b.try_acquire("a")
    for client in ("a", "a", "b"):
        b.release(client)
    assert b.clients == 0  # nothing inside, nothing kept
    with pytest.raises(ReleaseWithoutAcquire):
        b.release("a")
    with pytest.raises(ConfigError, match="max_per_client"):
        ClientBulkhead(0)


def test_in_the_pipeline_it_refuses_a_greedy_client_before_the_gate() -> None:
    p = NodePipeline(NodeSpec("n1", workers=1, backpressure=3, max_per_client=1))
    first = p.admit("greedy", now=0.0)
    refused = p.admit("greedy", now=0.0)
    assert isinstance(first, Ticket) and isinstance(refused, Rejected)
    assert (refused.outcome, refused.status, refused.code) == (Outcome.BACKPRESSURE, 429, "client_bulkhead")
    assert outcome_of(429, "client_bulkhead") is Outcome.BACKPRESSURE  # a live run reads it back as such
    assert p.gate is not None and p.gate.current == 1  # the refusal took no place in the gate
    other = p.admit("polite", now=0.0)
    assert isinstance(other, Ticket) and not other.started
    assert p.complete(first, failed=False, now=1.0) is other
    assert isinstance(p.admit("greedy", now=1.0), Ticket)  # its request left: it may send another


def test_every_way_out_gives_the_client_its_place_back() -> None:
    p = NodePipeline(NodeSpec("n1", workers=1, max_per_client=1, backpressure=1,
                              circuit_breaker=BreakerSpec(failure_threshold=1)))
    t = p.admit("a", now=0.0)
    assert isinstance(p.admit("b", now=0.0), Rejected)  # the gate is full: b's bulkhead place goes back
    assert p.bulkhead is not None and p.bulkhead.inside("b") == 0
    p.complete(t, failed=True, now=0.1)  # opens the breaker
    assert isinstance(p.admit("a", now=0.2), Rejected)  # the breaker refuses: both places go back
    assert (p.bulkhead.inside("a"), p.gate.current if p.gate else -1) == (0, 0)
    p.crash()
    assert p.bulkhead is not None and p.bulkhead.clients == 0


def test_scenario_key() -> None:
    s = Scenario.from_mapping({"name": "x", "nodes": [{"id": "a", "max_per_client": 2}]})
    assert s.nodes[0].max_per_client == 2
    with pytest.raises(ScenarioError, match=r"nodes\[0\].max_per_client = 0"):
        Scenario.from_mapping({"name": "x", "nodes": [{"id": "a", "max_per_client": 0}]})


def test_its_table_never_holds_more_clients_than_requests_inside_the_node() -> None:
    """Bounded like the node (issue 11, item 7): one entry per client with a request inside, whatever the
    refusals and ways out; with --backpressure N that is at most N entries, each keyed on at most 256 bytes."""
    import random

    rng = random.Random(11)
    p = NodePipeline(NodeSpec("n1", workers=2, backpressure=6, max_per_client=2,
                              circuit_breaker=BreakerSpec(failure_threshold=3, recovery_timeout_s=0.5)))
    inside: list[Ticket] = []
    for step in range(20_000):
        now = step * 0.001
        if inside and rng.random() < 0.5:
            ticket = inside.pop(rng.randrange(len(inside)))
            if ticket.started and rng.random() < 0.8:
                p.complete(ticket, failed=rng.random() < 0.3, now=now)
            else:
                p.abandon(ticket, now=now)
        else:
            admitted = p.admit(f"client-{rng.randrange(10_000)}", now=now)
            if isinstance(admitted, Ticket):
                inside.append(admitted)
        assert p.bulkhead is not None
        assert p.bulkhead.clients <= len(inside) <= 6, step
    for ticket in inside:
        p.abandon(ticket, now=30.0)
    assert p.bulkhead.clients == 0
