"""The node app, endpoint by endpoint and middleware by middleware (aiohttp_client, driven clock)."""

from __future__ import annotations

import asyncio
import os

import pytest

from live.node import NodeConfig, make_node_app
from tests.live.polling import until
from solutions.token_bucket_solution import TokenBucketSolution


async def client_for(aiohttp_client, clock, **config):
    config.setdefault("limiter_cls", TokenBucketSolution)
    return await aiohttp_client(make_node_app(NodeConfig(node_id="n1", **config), clock=clock))


async def test_health_is_cheap_and_tagged(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, workers=4)
    resp = await client.get("/health")
    assert resp.status == 200 and resp.headers["X-Node-ID"] == "n1"
    body = await resp.json()
    assert body["status"] == "ok" and body["node_id"] == "n1" and body["workers"] == 4
    assert body["active_requests"] == 1  # itself


async def test_work_reports_its_timing(aiohttp_client) -> None:
    client = await aiohttp_client(make_node_app(NodeConfig(node_id="n1", load_factor_ms=20, service="deterministic")))
    resp = await client.get("/work")
    body = await resp.json()
    assert resp.status == 200 and body["node_id"] == "n1"
    assert 19 <= body["service_ms"] < 200 and body["queue_wait_ms"] >= 0


async def test_failed_work_reports_the_service_time_it_took(aiohttp_client) -> None:
    """Failed work kept a worker busy: its 500 carries ``service_ms`` like an OK answer, in the error object."""
    client = await aiohttp_client(make_node_app(NodeConfig(node_id="n1", load_factor_ms=20, service="deterministic",
                                                           error_rate=1.0)))
    resp = await client.get("/work")
    error = (await resp.json())["error"]
    assert resp.status == 500 and error["code"] == "work_failed" and error["node_id"] == "n1"
    assert 19 <= error["service_ms"] < 200


async def test_rate_limit_three_then_429_then_refill(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, rate_limit_per_s=3)
    statuses = [(await client.get("/health")).status for _ in range(10)]
    assert statuses == [200] * 3 + [429] * 7
    resp = await client.get("/health")
    assert resp.headers["Retry-After"] == "1" and resp.headers["RateLimit-Limit"] == "3"
    assert resp.headers["RateLimit-Remaining"] == "0"
    body = await resp.json()
    assert body["error"]["code"] == "rate_limited" and body["error"]["status"] == 429
    clock.advance(1 / 3)
    assert (await client.get("/health")).status == 200
    ok = await client.get("/health")
    assert ok.status == 429
    # Observability endpoints are never rate limited.
    assert (await client.get("/stats")).status == 200


async def test_rate_limit_key_trusts_only_configured_proxies(aiohttp_client, clock) -> None:
    trusting = await client_for(aiohttp_client, clock, rate_limit_per_s=1, trust_proxy=("127.0.0.1",))
    for who in ("alice", "bob"):
        assert (await trusting.get("/health", headers={"X-Client-ID": who})).status == 200
    assert (await trusting.get("/health", headers={"X-Client-ID": "alice"})).status == 429
    assert (await trusting.get("/health", headers={"X-Forwarded-For": "10.0.0.9, 127.0.0.1"})).status == 200
    wary = await client_for(aiohttp_client, clock, rate_limit_per_s=1)
    assert (await wary.get("/health", headers={"X-Client-ID": "alice"})).status == 200
    assert (await wary.get("/health", headers={"X-Client-ID": "bob"})).status == 429  # same peer, same bucket


async def test_backpressure_refuses_the_n_plus_first_at_once(aiohttp_client) -> None:
    client = await aiohttp_client(make_node_app(NodeConfig(node_id="n1", workers=1, load_factor_ms=300,
                                                           service="deterministic", backpressure=2)))
    first = [asyncio.create_task(client.get("/work")) for _ in range(2)]

    async def both_inside() -> bool:
        return (await (await client.get("/queue-stats")).json())["current"] == 2
    await until(both_inside, what="two requests inside the node")
    refused = await client.get("/work")
    assert refused.status == 429 and (await refused.json())["error"]["code"] == "backpressure"
    assert refused.headers["Retry-After"] == "1"
    stats = await (await client.get("/queue-stats")).json()
    assert stats["current"] == 2 and stats["rejected"] == 1 and stats["in_service"] == 1
    assert stats["waiting_for_worker"] == 1 and stats["max"] == 2
    assert [r.status for r in await asyncio.gather(*first)] == [200, 200]
    stats = await (await client.get("/queue-stats")).json()
    assert stats["current"] == 0 and stats["peak"] == 2 and stats["accepted"] == 2


async def test_circuit_breaker_open_half_open_closed(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, circuit_breaker=True, failure_threshold=3,
                              recovery_timeout_s=5.0, faults_admin=True)
    assert (await client.post("/admin/faults", json={"error_rate": 1.0})).status == 200
    assert [(await client.get("/work")).status for _ in range(3)] == [500, 500, 500]
    status = await (await client.get("/circuit-status")).json()
    assert status["state"] == "OPEN"
    refused = await client.get("/work")
    assert refused.status == 503 and refused.headers["Retry-After"] == "5"
    assert (await refused.json())["error"]["code"] == "circuit_open"
    assert (await client.delete("/admin/faults")).status == 200
    clock.advance(5.0)
    assert (await (await client.get("/circuit-status")).json())["state"] == "HALF_OPEN"
    assert (await client.get("/work")).status == 200
    status = await (await client.get("/circuit-status")).json()
    assert status["state"] == "CLOSED"
    assert [t["to"] for t in status["transitions"]] == ["OPEN", "HALF_OPEN", "CLOSED"]


async def test_breaker_ignores_client_errors(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, circuit_breaker=True, failure_threshold=1)
    for _ in range(3):
        assert (await client.get("/nope")).status == 404
    assert (await (await client.get("/circuit-status")).json())["state"] == "CLOSED"


@pytest.mark.parametrize("body, code, words", [
    (b"{not json", "bad_json", "not valid JSON"),
    (b"[1, 2]", "bad_json", "must be a JSON object"),
    (b"", "empty_body", "empty"),
    (b'{"error_rate": "high"}', "bad_field", "'error_rate' must be a number from 0 to 1"),
    (b'{"error_rate": 1.5}', "bad_field", "'error_rate' must be a number from 0 to 1"),
    (b'{"error_rate": true}', "bad_field", "'error_rate'"),
    (b'{"latency": 5}', "unknown_field", "unknown field 'latency'"),
])
async def test_bad_fault_bodies_are_clear_400s(aiohttp_client, clock, body, code, words) -> None:
    client = await client_for(aiohttp_client, clock, faults_admin=True)
    resp = await client.post("/admin/faults", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == code and words in error["message"], error


async def test_huge_body_is_413_json(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, faults_admin=True)
    resp = await client.post("/admin/faults", data=b"x" * 200_000)
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"


async def test_unknown_path_and_method_are_json(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock)
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error"]["message"] == "no endpoint GET /nope"
    assert resp.headers["X-Node-ID"] == "n1"
    resp = await client.post("/health")
    assert resp.status == 405 and (await resp.json())["error"]["code"] == "method_not_allowed"
    assert resp.headers["Allow"] == "GET,HEAD"
    head = await client.head("/health")
    assert head.status == 200 and head.headers["X-Node-ID"] == "n1" and await head.read() == b""
    # Admin is off unless asked for.
    assert (await client.post("/admin/faults", json={"error_rate": 1})).status == 404


@pytest.mark.parametrize("path, flag", [("/queue-stats", "--backpressure"), ("/circuit-status", "--circuit-breaker"),
                                        ("/discovery-status", "--registry"), ("/peers", "--registry")])
async def test_disabled_features_say_how_to_enable_them(aiohttp_client, clock, path, flag) -> None:
    client = await client_for(aiohttp_client, clock)
    resp = await client.get(path)
    assert resp.status == 404 and flag in (await resp.json())["error"]["message"]


async def test_metrics_are_prometheus_text(aiohttp_client, clock) -> None:
    client = await client_for(aiohttp_client, clock, rate_limit_per_s=1, circuit_breaker=True)
    await client.get("/health")
    await client.get("/health")
    text = await (await client.get("/metrics")).text()
    assert 'testbed_node_requests_total{node="n1",path="/health",status="200"} 1.0' in text
    assert 'testbed_node_rejections_total{node="n1",reason="rate_limited"} 1.0' in text
    assert "testbed_node_latency_seconds_bucket" in text and "testbed_node_circuit_state" in text


async def test_downstream_failures_trip_the_breaker(aiohttp_client, aiohttp_server, clock) -> None:
    failing = await aiohttp_server(make_node_app(NodeConfig(node_id="down", error_rate=1.0)))
    client = await client_for(aiohttp_client, clock, circuit_breaker=True, failure_threshold=2,
                              downstream=str(failing.make_url("/work")))
    first = await client.get("/work")
    assert first.status == 502
    assert "answered 500" in (await first.json())["error"]["message"]
    await client.get("/work")
    assert (await (await client.get("/circuit-status")).json())["state"] == "OPEN"
    assert (await client.get("/work")).status == 503


async def test_downstream_success_is_reported(aiohttp_client, aiohttp_server, clock) -> None:
    healthy = await aiohttp_server(make_node_app(NodeConfig(node_id="down")))
    client = await client_for(aiohttp_client, clock, downstream=str(healthy.make_url("/work")))
    body = await (await client.get("/work")).json()
    assert body["downstream_status"] == 200


def test_a_node_with_seed_and_stream_draws_its_simulated_twins_service_times() -> None:
    from core.workload import NODE_STREAM
    from experiments.scenarios import load
    from live.node import STATE
    from tests.sim.helpers import simulation

    scenario = load("seed")
    sim = simulation(scenario)
    for i, spec in enumerate(scenario.nodes):
        app = make_node_app(NodeConfig(node_id=spec.id, load_factor_ms=spec.load_factor_ms, service=spec.service,
                                       seed=scenario.seed, stream=NODE_STREAM + i))
        live = [app[STATE].service_time_s() for _ in range(5)]
        assert live == [next(sim.nodes[i].service) for _ in range(5)]


async def test_client_bulkhead_refuses_a_clients_second_request_inside_not_anothers(aiohttp_client) -> None:
    client = await aiohttp_client(make_node_app(NodeConfig(
        node_id="n1", workers=2, load_factor_ms=300, service="deterministic", max_per_client=1,
        trust_proxy=("127.0.0.1",))))
    slow = asyncio.create_task(client.get("/work", headers={"X-Client-ID": "greedy"}))

    async def inside() -> bool:
        return (await (await client.get("/health")).json())["busy_workers"] == 1
    await until(inside, what="the greedy client's first request in service")
    refused = await client.get("/work", headers={"X-Client-ID": "greedy"})
    body = await refused.json()
    assert refused.status == 429 and body["error"]["code"] == "client_bulkhead", body
    assert refused.headers["Retry-After"] == "1"
    assert (await client.get("/work", headers={"X-Client-ID": "polite"})).status == 200
    assert (await slow).status == 200
    assert (await client.get("/work", headers={"X-Client-ID": "greedy"})).status == 200  # its request left
    text = await (await client.get("/metrics")).text()
    assert 'testbed_node_rejections_total{node="n1",reason="client_bulkhead"} 1.0' in text


def test_a_scenario_node_round_trips_through_the_node_command_line() -> None:
    """What a live run starts is the scenario's node exactly: cluster.node_args, parsed by
    `testbed node`, gives back the NodeSpec it came from (every middleware set)."""
    from core.scenario import BreakerSpec, NodeSpec
    from experiments.cli_node import node_command, node_config
    from live.cluster import node_args

    spec = NodeSpec("node-9", workers=3, load_factor_ms=12.5, service="deterministic", rate_limit_per_s=7.0,
                    rate_limit_burst=9.0, backpressure=11, circuit_breaker=BreakerSpec(4, 2.5, 2, 2), max_per_client=2)
    args = node_args(spec, registry_url="http://127.0.0.1:1", seed=1, stream=4, impl="solution")
    assert args[0] == "node"
    params = node_command.make_context("node", args[1:]).params
    params.pop("shutdown_timeout", None)  # a server option: kept for serve_app, not a parameter
    assert node_config(**params).spec == spec


def test_nodes_on_port_0_get_ids_of_their_own_and_a_wildcard_host_needs_advertise() -> None:
    """`--port 0` without `--id` was `node-0` for every such node, one id to the registry (the second got 409);
    a node listening on every interface has no address to register unless `--advertise` names one."""
    import click

    from experiments.cli_node import default_node_id, node_command, node_config

    assert default_node_id(5001) == "node-5001"
    assert default_node_id(0) != "node-0" and str(os.getpid()) in default_node_id(0)
    params = node_command.make_context("node", ["--port", "0", "--host", "0.0.0.0",
                                                "--registry", "http://127.0.0.1:1"]).params
    with pytest.raises(click.UsageError, match="--advertise"):
        node_config(**params)
    params = node_command.make_context("node", ["--port", "0", "--host", "0.0.0.0", "--registry", "http://127.0.0.1:1",
                                                "--advertise", "http://127.0.0.1:9"]).params
    assert node_config(**params).address == "http://127.0.0.1:9"
