"""The registry app: registration, heartbeats, expiry on a driven clock, and bad input."""

from __future__ import annotations

import pytest

from live.registry import make_registry_app


@pytest.fixture
async def registry(aiohttp_client, clock):
    return await aiohttp_client(make_registry_app(ttl_s=5.0, clock=clock))


async def register(client, node_id="node-1", port=5001, **extra):
    return await client.post("/register", json={"id": node_id, "address": f"http://127.0.0.1:{port}", **extra})


async def lease_of(resp) -> dict[str, str]:
    """The headers that prove ownership, from a register answer."""
    return {"X-Lease": (await resp.json())["lease"]}


async def ids(client, all_=False):
    resp = await client.get("/nodes" + ("?all=1" if all_ else ""))
    return [(n["id"], n["status"]) for n in (await resp.json())["nodes"]]


async def test_register_heartbeat_list(registry, clock) -> None:
    resp = await register(registry, metadata={"workers": 4})
    assert resp.status == 201
    body = await resp.json()
    assert body["registered"]["metadata"] == {"workers": 4} and body["ttl_s"] == 5.0
    again = await register(registry)
    assert again.status == 200  # again, from the same address: a new incarnation, not a duplicate
    clock.advance(2)
    assert (await registry.post("/heartbeat/node-1", headers=await lease_of(again))).status == 200
    assert await ids(registry) == [("node-1", "alive")]


async def test_silent_node_dies_after_ttl_then_goes(registry, clock) -> None:
    await register(registry)
    clock.advance(4.9)
    assert await ids(registry) == [("node-1", "alive")]
    clock.advance(0.1)
    assert await ids(registry) == []
    assert await ids(registry, all_=True) == [("node-1", "dead")]
    clock.advance(5.0)
    assert await ids(registry, all_=True) == []


async def test_unknown_heartbeat_is_404_register_again(registry) -> None:
    resp = await registry.post("/heartbeat/ghost")
    assert resp.status == 404
    error = (await resp.json())["error"]
    assert error["code"] == "unknown_node" and error["action"] == "register"


async def test_deregister(registry) -> None:
    lease = await lease_of(await register(registry))
    assert (await registry.post("/deregister", json={"id": "node-1"}, headers=lease)).status == 200
    assert (await registry.post("/deregister", json={"id": "node-1"}, headers=lease)).status == 404
    assert await ids(registry, all_=True) == []


@pytest.mark.parametrize("body, field, words", [
    (b'{"address": "http://127.0.0.1:1"}', "id", "field 'id' is required"),
    (b'{"id": 5, "address": "http://127.0.0.1:1"}', "id", "field 'id' must be"),
    (b'{"id": "", "address": "http://127.0.0.1:1"}', "id", "field 'id' must be"),
    (b'{"id": "a"}', "address", "field 'address' is required"),
    (b'{"id": "a", "address": "localhost:1"}', "address", "is not a URL"),
    (b'{"id": "a", "address": "http://x:1", "metadata": [1]}', "metadata", "field 'metadata' must be dict"),
])
async def test_bad_registrations_name_the_field(registry, body, field, words) -> None:
    resp = await registry.post("/register", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["field"] == field and words in error["message"], error


async def test_garbage_and_huge_bodies_and_registry_keeps_serving(registry) -> None:
    resp = await registry.post("/register", data=b"\xff\xfe garbage")
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "bad_json"
    resp = await registry.post("/register", data=b"{" + b" " * 100_000 + b"}")
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "body_too_large"
    assert (await registry.get("/health")).status == 200
    assert (await register(registry)).status == 201


async def test_token_guards_writes_only(aiohttp_client, clock) -> None:
    client = await aiohttp_client(make_registry_app(token="s3cret", clock=clock))
    resp = await register(client)
    assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    ok = await client.post("/register", json={"id": "a", "address": "http://127.0.0.1:1"},
                           headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 201
    assert (await client.get("/nodes")).status == 200


async def test_metrics_count_membership_changes(registry, clock) -> None:
    await register(registry)
    clock.advance(6)
    await registry.get("/nodes")
    text = await (await registry.get("/metrics")).text()
    assert 'testbed_registry_membership_changes_total{kind="joined"} 1.0' in text
    assert 'testbed_registry_membership_changes_total{kind="died"} 1.0' in text


async def test_nodes_names_the_registry_instance_that_answered(aiohttp_client, registry, clock) -> None:
    """A balancer tells a restarted registry (which has forgotten everybody) from members leaving by the
    instance: drawn at random per registry process, the same in every answer of one."""
    await register(registry)
    first = await (await registry.get("/nodes")).json()
    info = first["registry"]
    assert set(info) == {"instance", "ttl_s", "heartbeat_interval_s"}
    assert info["ttl_s"] == 5.0 and info["heartbeat_interval_s"] == 2.0 and len(info["instance"]) >= 16
    clock.advance(1)
    await register(registry, "node-2", 5002)
    assert (await (await registry.get("/nodes")).json())["registry"] == info  # a new body, the same instance
    assert (await (await registry.get("/nodes?all=1")).json())["registry"] == info
    other = await aiohttp_client(make_registry_app(ttl_s=5.0, clock=clock))
    assert (await (await other.get("/nodes")).json())["registry"]["instance"] != info["instance"]
    named = await aiohttp_client(make_registry_app(ttl_s=1.0, clock=clock, instance="fixed"))
    assert (await (await named.get("/nodes")).json())["registry"] == {"instance": "fixed", "ttl_s": 1.0,
                                                                      "heartbeat_interval_s": 1.0}
