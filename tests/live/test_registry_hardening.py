"""The registry as an attacker and an operator would try it (issue 11, items 1, 2, 4 and 11, registry side).

In-process apps on a driven clock for the HTTP rules, real ``testbed`` processes for the attack on a running
node, and :func:`live.resolve.check_backend` against the machine's resolver.
"""

from __future__ import annotations

import asyncio
import json
import signal
import socket

import pytest

from core.addresses import AddressError, AllowList
from live.registry import make_registry_app
from live.resolve import check_backend
from tests.live.procs import Proc, free_port, request, wait_until

NODE = "http://127.0.0.1:5001"


@pytest.fixture
async def registry(aiohttp_client, clock):
    return await aiohttp_client(make_registry_app(ttl_s=5.0, clock=clock))


async def register(client, node_id: str = "node-1", address: str = NODE, headers=None, **extra):
    return await client.post("/register", json={"id": node_id, "address": address, **extra}, headers=headers)


async def error_of(resp, status: int) -> dict:
    assert resp.status == status, await resp.text()
    assert resp.content_type == "application/json"
    return (await resp.json())["error"]


async def listing(client, query: str = "") -> list[dict]:
    return (await (await client.get("/nodes" + query)).json())["nodes"]


# -- item 1: a registration belongs to the instance that made it ----------------------------------------
async def test_the_hijack_is_refused_and_the_owner_carries_on(registry, clock) -> None:
    first = await register(registry, metadata={"workers": 4})
    lease = {"X-Lease": (await first.json())["lease"]}
    error = await error_of(await register(registry, address="http://127.0.0.1:6666", metadata={"workers": 99}), 409)
    assert error["code"] == "conflict" and error["node_id"] == "node-1" and "node-1" in error["message"]
    error = await error_of(await register(registry, address="http://127.0.0.1:6666",
                                          headers={"X-Lease": "guessed"}), 409)
    assert error["code"] == "conflict"
    clock.advance(2)
    assert (await registry.post("/heartbeat/node-1", headers=lease)).status == 200
    [member] = await listing(registry)
    assert (member["address"], member["metadata"], member["incarnation"]) == (NODE, {"workers": 4}, 1)


@pytest.mark.parametrize("headers", [{}, {"X-Lease": "guessed"}, {"X-Lease": "caf\u00e9"}])
async def test_heartbeat_and_deregister_without_the_lease_are_refused(registry, headers) -> None:
    await register(registry)
    error = await error_of(await registry.post("/heartbeat/node-1", headers=headers), 409)
    assert error["code"] == "lease_mismatch" and error["action"] == "register" and "X-Lease" in error["message"]
    error = await error_of(await registry.post("/deregister", json={"id": "node-1"}, headers=headers), 409)
    assert error["code"] == "lease_mismatch"
    assert [m["id"] for m in await listing(registry)] == ["node-1"]


async def test_a_restart_at_the_same_address_takes_over_and_the_old_lease_stops(registry) -> None:
    old = {"X-Lease": (await (await register(registry)).json())["lease"]}
    again = await register(registry)  # a new process at the same place, no lease
    assert again.status == 200
    new = {"X-Lease": (await again.json())["lease"]}
    assert new != old and (await again.json())["registered"]["incarnation"] == 2
    assert (await error_of(await registry.post("/heartbeat/node-1", headers=old), 409))["code"] == "lease_mismatch"
    assert (await registry.post("/heartbeat/node-1", headers=new)).status == 200


async def test_the_owner_may_move_and_a_dead_id_is_anyones(registry, clock) -> None:
    lease = {"X-Lease": (await (await register(registry)).json())["lease"]}
    error = await error_of(await register(registry, address="http://127.0.0.1:5002", headers=lease), 409)
    assert error["code"] == "conflict" and "deregister" in error["message"]  # lease or not, no move while alive
    assert (await registry.post("/deregister", json={"id": "node-1"}, headers=lease)).status == 200
    moved = await register(registry, address="http://127.0.0.1:5002")  # the owner moves: leave, then register anew
    assert moved.status == 201 and (await listing(registry))[0]["address"] == "http://127.0.0.1:5002"
    clock.advance(5)  # dead now
    taken = await register(registry, address="http://127.0.0.1:7000")
    assert taken.status == 200 and (await listing(registry))[0]["address"] == "http://127.0.0.1:7000"


async def test_the_two_step_hijack_is_refused(registry, clock) -> None:
    """Follow-up attack: take the lease naming the node's own address, then move with that lease (or leave)."""
    real = {"X-Lease": (await (await register(registry, metadata={"workers": 4})).json())["lease"]}
    step1 = await register(registry, metadata={"workers": 1000})
    assert step1.status == 200
    stolen = {"X-Lease": (await step1.json())["lease"]}
    error = await error_of(await register(registry, address="http://127.0.0.1:6666", headers=stolen), 409)
    assert error["code"] == "conflict" and error["node_id"] == "node-1"
    assert [m["address"] for m in await listing(registry)] == [NODE]
    assert (await error_of(await registry.post("/heartbeat/node-1", headers=real), 409))["code"] == "lease_mismatch"
    assert (await registry.post("/deregister", json={"id": "node-1"}, headers=stolen)).status == 200
    error = await error_of(await register(registry, address="http://127.0.0.1:6666"), 409)  # held at its address
    assert error["code"] == "conflict"
    assert (await register(registry, metadata={"workers": 4})).status == 201  # the real node gets back at once


async def test_the_registrys_own_address_is_refused(aiohttp_client, clock) -> None:
    from live.registry import listening
    app = make_registry_app(ttl_s=5.0, clock=clock)
    client = await aiohttp_client(app)
    port = client.server.port
    assert (await register(client, address=f"http://127.0.0.1:{port}")).status == 201  # port not known yet
    await client.post("/deregister", json={"id": "node-1"},
                      headers={"X-Lease": (await (await register(client, address=f"http://127.0.0.1:{port}"))
                                           .json())["lease"]})
    listening(app, port)
    for address in (f"http://127.0.0.1:{port}", f"http://localhost:{port}/", f"http://2130706433:{port}",
                    f"http://[::ffff:127.0.0.1]:{port}"):
        error = await error_of(await register(client, "n2", address=address), 400)
        assert error["code"] == "bad_address" and "is this registry" in error["message"], address
    assert (await register(client, "n3", address=f"http://127.0.0.1:{port + 1 if port < 65535 else 1}")).status == 201


@pytest.mark.parametrize("raw, key", [
    (b'{"id":"a","id":"b","address":"http://127.0.0.1:5001"}', "id"),
    (b'{"id":"a","address":"http://127.0.0.1:5001","metadata":{"w":1,"w":2}}', "w"),
])
async def test_duplicate_json_keys_are_400_naming_the_key(registry, raw: bytes, key: str) -> None:
    resp = await registry.post("/register", data=raw, headers={"Content-Type": "application/json"})
    error = await error_of(resp, 400)
    assert error["code"] == "bad_json" and error["key"] == key and repr(key) in error["message"]
    assert await listing(registry, "?all=1") == []


async def test_the_lease_is_never_listed(registry) -> None:
    lease = (await (await register(registry)).json())["lease"]
    for query in ("", "?all=1"):
        assert lease not in await (await registry.get("/nodes" + query)).text()


# -- item 2: addresses -------------------------------------------------------------------------------------
@pytest.mark.parametrize("address, words", [
    ("http://169.254.169.254/", "169.254.169.254 is not in the allowed backend networks"),
    ("http://127.0.0.1:99999", "port 99999 is out of range 1-65535"),
    ("http://2852039166/", "169.254.169.254 is not in the allowed backend networks"),
    ("http://0xa9fea9fe:80", "169.254.169.254 is not in the allowed backend networks"),
    ("http://[::ffff:169.254.169.254]/", "::ffff:a9fe:a9fe is not in the allowed backend networks"),
    ("http://10.0.0.1:80", "10.0.0.1 is not in the allowed backend networks (127.0.0.0/8,::1/128)"),
    ("https://127.0.0.1:5001", "only http:// backends are supported"),
    ("http://a:b@127.0.0.1:5001/", "no user:password@ credentials"),
    ("http://127.0.0.1:5001/admin", "has no path"),
    ("http://name.invalid:5001", "cannot resolve 'name.invalid'"),
    ("127.0.0.1:5001", "is not a URL"),
])
async def test_bad_addresses_are_400_naming_why(registry, address: str, words: str) -> None:
    error = await error_of(await register(registry, address=address), 400)
    assert error["code"] == "bad_address" and error["field"] == "address" and words in error["message"], error
    assert await listing(registry, "?all=1") == []


@pytest.mark.parametrize("address, url", [
    ("http://127.0.0.1:5001/", "http://127.0.0.1:5001"),
    ("http://2130706433:5001", "http://127.0.0.1:5001"),  # normalised: what was checked is what is listed
    ("http://LOCALHOST:5001", "http://localhost:5001"),
    ("http://[::1]:5001", "http://[::1]:5001"),
])
async def test_loopback_addresses_are_admitted_normalised(registry, address: str, url: str) -> None:
    resp = await register(registry, address=address)
    assert resp.status == 201, await resp.text()
    assert (await listing(registry))[0]["address"] == url


async def test_the_allow_list_follows_the_bind_address_or_the_flag(aiohttp_client, clock) -> None:
    wide = await aiohttp_client(make_registry_app(host="0.0.0.0", clock=clock))
    assert (await register(wide, "a", "http://10.1.2.3:80")).status == 201
    assert (await error_of(await register(wide, "b", "http://2852039166/"), 400))["code"] == "bad_address"
    anything = await aiohttp_client(make_registry_app(allow_backends=AllowList.parse("any"), clock=clock))
    assert (await register(anything, "a", "http://169.254.169.254/")).status == 201
    narrow = await aiohttp_client(make_registry_app(allow_backends=AllowList.parse("10.0.0.0/8"), clock=clock))
    error = await error_of(await register(narrow, "a", NODE), 400)
    assert error["allowed_backends"] == "10.0.0.0/8"


async def test_check_backend_resolves_names_and_checks_every_address() -> None:
    loopback = AllowList.default_for("127.0.0.1")
    assert (await check_backend("http://localhost:5001/", loopback)).url == "http://localhost:5001"
    with pytest.raises(AddressError, match="not in the allowed backend networks"):
        await check_backend("http://localhost:5001", AllowList.parse("10.0.0.0/8"))
    with pytest.raises(AddressError, match="cannot resolve"):
        await check_backend("http://no-such-host.invalid", loopback)


async def test_a_slow_resolver_is_bounded(monkeypatch) -> None:
    loop = asyncio.get_running_loop()

    async def hang(*args, **kwargs):
        await asyncio.Event().wait()
    monkeypatch.setattr(loop, "getaddrinfo", hang)
    with pytest.raises(AddressError, match="took longer than 0.05 s"):
        await check_backend("http://slow.example:80", AllowList.parse("any"), timeout_s=0.05)


# -- item 4: caps ------------------------------------------------------------------------------------------
async def test_a_full_registry_refuses_new_ids_only(aiohttp_client, clock) -> None:
    client = await aiohttp_client(make_registry_app(max_nodes=2, ttl_s=5.0, clock=clock))
    leases = [(await (await register(client, f"n{i}", f"http://127.0.0.1:{5000 + i}")).json())["lease"]
              for i in range(2)]
    clock.advance(1)
    full = await register(client, "n2", "http://127.0.0.1:5002")
    error = await error_of(full, 503)
    assert error["code"] == "registry_full" and error["max_nodes"] == 2 and "--max-nodes" in error["message"]
    assert full.headers["Retry-After"] == "4"  # n0, silent since 0, could die at 5
    assert (await client.post("/heartbeat/n0", headers={"X-Lease": leases[0]})).status == 200
    assert (await register(client, "n1", "http://127.0.0.1:5001")).status == 200  # a restart still gets in
    clock.advance(5)  # n0's last beat was at 1: dead at 6, and its slot is reusable
    assert (await register(client, "n2", "http://127.0.0.1:5002")).status == 201


@pytest.mark.parametrize("metadata, limit", [
    ({f"k{i}": i for i in range(33)}, "max_keys"),
    ({"k" * 65: 1}, "max_key_chars"),
    ({"blob": "x" * 5000}, "max_bytes"),
    ({"nested": {"a": 1}}, "values"),
    ({"list": [1, 2]}, "values"),
])
async def test_metadata_over_a_limit_is_400_naming_it(registry, metadata: dict, limit: str) -> None:
    error = await error_of(await register(registry, metadata=metadata), 400)
    assert error["field"] == "metadata" and error["limit"] == limit, error
    lease = {"X-Lease": (await (await register(registry, metadata={"workers": 1})).json())["lease"]}
    error = await error_of(await registry.post("/heartbeat/node-1", json={"metadata": metadata}, headers=lease), 400)
    assert error["limit"] == limit
    assert (await listing(registry))[0]["metadata"] == {"workers": 1}


@pytest.mark.parametrize("raw", [b'{"w": NaN}', b'{"w": Infinity}', b'{"w": -Infinity}', b'{"w": 1e999}'])
async def test_nan_and_infinity_never_reach_the_listing(registry, raw: bytes) -> None:
    body = b'{"id": "node-1", "address": "http://127.0.0.1:5001", "metadata": ' + raw + b"}"
    resp = await registry.post("/register", data=body, headers={"Content-Type": "application/json"})
    await error_of(resp, 400)
    text = await (await registry.get("/nodes?all=1")).text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"/nodes emitted {name}"))


async def test_nodes_is_served_from_a_cache_until_membership_changes(registry, clock) -> None:
    lease = {"X-Lease": (await (await register(registry, metadata={"workers": 3})).json())["lease"]}
    first = await (await registry.get("/nodes")).read()
    clock.advance(1.5)
    await registry.post("/heartbeat/node-1", json={"metadata": {"workers": 3}}, headers=lease)
    assert await (await registry.get("/nodes")).read() == first  # heartbeat times are not in it
    [entry] = json.loads(first)["nodes"]
    assert (entry["id"], entry["address"], entry["metadata"]["workers"]) == ("node-1", NODE, 3)  # the balancer's
    [detail] = await listing(registry, "?all=1")
    assert detail["seconds_since_heartbeat"] == 0.0 and detail["last_heartbeat"] == 1001.5
    await registry.post("/heartbeat/node-1", json={"metadata": {"workers": 5}}, headers=lease)
    assert (await listing(registry))[0]["metadata"] == {"workers": 5}
    await register(registry, "node-2", "http://127.0.0.1:5002")
    assert [m["id"] for m in await listing(registry)] == ["node-1", "node-2"]
    assert [m["id"] for m in await listing(registry, "?all=1")] == ["node-1", "node-2"]


# -- item 11: registry parts --------------------------------------------------------------------------------
@pytest.mark.parametrize("path, body, field", [
    ("/register", {"id": "n", "address": NODE, "weight": 100}, "weight"),
    ("/register", {"id": "n", "address": NODE, "lease": "x"}, "lease"),
    ("/deregister", {"id": "n", "extra": 1}, "extra"),
    ("/heartbeat/n", {"metadata": {}, "status": "ok"}, "status"),
])
async def test_unknown_fields_are_400(registry, path: str, body: dict, field: str) -> None:
    error = await error_of(await registry.post(path, json=body), 400)
    assert error["code"] == "unknown_field" and error["field"] == field and field in error["message"]


@pytest.mark.parametrize("node_id", ["a/b", "..", ".", "caf\u00e9", "a b", "x" * 201, "a\nb", "%2F"])
async def test_node_ids_outside_the_rule_are_400_naming_it(registry, node_id: str) -> None:
    error = await error_of(await register(registry, node_id), 400)
    assert error["field"] == "id" and "A-Z a-z 0-9 . _ : -" in error["message"]
    error = await error_of(await registry.post("/deregister", json={"id": node_id}), 400)
    assert error["field"] == "id"


async def test_a_heartbeat_for_an_id_outside_the_rule_is_400(registry) -> None:
    for path in ("/heartbeat/a%2Fb", "/heartbeat/caf%C3%A9"):
        error = await error_of(await registry.post(path), 400)
        assert error["field"] == "node_id"


@pytest.mark.parametrize("value", [b"Bearer \xff\xfe", "Bearer caf\u00e9\u20ac".encode(), b"Bearer \x80s3cret",
                                   b"Bearer s3cre\xc3"])
async def test_an_authorization_header_of_any_bytes_is_401_json(aiohttp_client, clock, value: bytes) -> None:
    client = await aiohttp_client(make_registry_app(token="s3cret", clock=clock))
    reader, writer = await asyncio.open_connection("127.0.0.1", client.server.port)
    body = json.dumps({"id": "n", "address": NODE}).encode()
    writer.write(b"POST /register HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nAuthorization: " + value
                 + b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body)
    await writer.drain()
    raw = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, payload = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), raw[:300]
    assert json.loads(payload)["error"]["code"] == "unauthorized"
    ok = await client.post("/register", json={"id": "n", "address": NODE}, headers={"Authorization": "Bearer s3cret"})
    assert ok.status == 201


# -- the attack on real processes ---------------------------------------------------------------------------
def _member(registry: Proc, node_id: str) -> dict | None:
    return next((n for n in request(registry.url + "/nodes")[2]["nodes"] if n["id"] == node_id), None)


def test_the_issues_attack_fails_and_the_node_keeps_its_traffic(procs) -> None:
    registry = procs("registry", "--port", "0", "--ttl", "3")
    node = procs("node", "--port", "0", "--id", "node-1", "--registry", registry.url, "--heartbeat-interval", "0.2")
    wait_until(lambda: _member(registry, "node-1"), 10, "node-1 to register")
    home = _member(registry, "node-1")["address"]
    assert home == node.url
    decoy = socket.socket()  # a loopback address that is not the node, held so nobody else gets it
    decoy.bind(("127.0.0.1", 0))
    try:
        status, _, body = request(registry.url + "/register", "POST",
                                  {"id": "node-1", "address": f"http://127.0.0.1:{decoy.getsockname()[1]}"})
        assert status == 409 and body["error"]["code"] == "conflict" and "node-1" in body["error"]["message"]
        lb = procs("balancer", "--port", "0", "--registry", registry.url, "--refresh-interval", "0.1")
        before = request(node.url + "/discovery-status")[2]["heartbeats_ok"]
        wait_until(lambda: request(node.url + "/discovery-status")[2]["heartbeats_ok"] >= before + 5, 10,
                   "five more heartbeats of the real node")
        assert _member(registry, "node-1")["address"] == home
        status_doc = request(node.url + "/discovery-status")[2]
        assert status_doc["registrations"] == 1 and status_doc["conflicts"] == 0
        wait_until(lambda: request(lb.url + "/health")[0] == 200, 10, "the balancer to reach node-1")
        seen = [request(lb.url + "/health")[1].get("X-Node-ID") for _ in range(5)]
        assert seen == ["node-1"] * 5
    finally:
        decoy.close()


def test_the_two_step_hijack_on_real_processes_leaves_every_request_with_the_real_node(procs) -> None:
    registry = procs("registry", "--port", "0", "--ttl", "3")
    node = procs("node", "--port", "0", "--id", "node-1", "--registry", registry.url, "--heartbeat-interval", "0.2")
    wait_until(lambda: _member(registry, "node-1"), 10, "node-1 to register")
    lb = procs("balancer", "--port", "0", "--registry", registry.url, "--refresh-interval", "0.1")
    wait_until(lambda: request(lb.url + "/health")[0] == 200, 10, "the balancer to reach node-1")
    decoy = socket.socket()  # the attacker's loopback address, held so nobody else gets it
    decoy.bind(("127.0.0.1", 0))
    evil = f"http://127.0.0.1:{decoy.getsockname()[1]}"
    try:
        before = request(node.url + "/discovery-status")[2]["conflicts"]
        status, _, body = request(registry.url + "/register", "POST",
                                  {"id": "node-1", "address": node.url, "metadata": {"workers": 1000}})
        assert status == 200, body  # step 1: the "restarted in place" rule hands out a lease ...
        lease = {"X-Lease": body["lease"]}
        status, _, body = request(registry.url + "/register", "POST", {"id": "node-1", "address": evil}, lease)
        assert status == 409 and body["error"]["code"] == "conflict", body  # ... step 2 cannot use it to move
        served = []
        for _ in range(10):  # the attacker keeps its lease alive while clients go through the balancer
            request(registry.url + "/heartbeat/node-1", "POST", {}, lease)
            served += [(a[0], a[1].get("X-Node-ID")) for a in (request(lb.url + "/health") for _ in range(2))]
        assert served == [(200, "node-1")] * 20
        wait_until(lambda: request(node.url + "/discovery-status")[2]["conflicts"] > before, 10,
                   "the real node's heartbeat to get 409 and register again")
        wait_until(lambda: request(registry.url + "/heartbeat/node-1", "POST", {}, lease)[0] == 409, 10,
                   "the real node to hold the lease again")
        assert _member(registry, "node-1")["address"] == node.url
        # step 3 of a variant: take the lease in place again and deregister with it; the id stays at the node
        status, _, body = request(registry.url + "/register", "POST", {"id": "node-1", "address": node.url})
        lease = {"X-Lease": body["lease"]}
        assert request(registry.url + "/deregister", "POST", {"id": "node-1"}, lease)[0] == 200
        status, _, body = request(registry.url + "/register", "POST", {"id": "node-1", "address": evil})
        assert status == 409 and body["error"]["code"] == "conflict", body
        wait_until(lambda: (_member(registry, "node-1") or {}).get("address") == node.url, 10,
                   "the real node to register again")
        wait_until(lambda: request(lb.url + "/health")[0] == 200, 10, "the balancer to take node-1 back")
        answers = [request(lb.url + "/health") for _ in range(10)]
        assert [(a[0], a[1].get("X-Node-ID")) for a in answers] == [(200, "node-1")] * 10
    finally:
        decoy.close()


def test_a_real_owner_moves_by_deregistering_then_registering_anew(procs) -> None:
    registry = procs("registry", "--port", "0", "--ttl", "60")
    home, away = free_port(), free_port()
    status, _, body = request(registry.url + "/register", "POST", {"id": "mover", "address": f"http://127.0.0.1:{home}"})
    assert status == 201
    lease = {"X-Lease": body["lease"]}
    status, _, body = request(registry.url + "/register", "POST",
                              {"id": "mover", "address": f"http://127.0.0.1:{away}"}, lease)
    assert status == 409 and body["error"]["code"] == "conflict"
    assert request(registry.url + "/deregister", "POST", {"id": "mover"}, lease)[0] == 200
    status, _, body = request(registry.url + "/register", "POST", {"id": "mover", "address": f"http://127.0.0.1:{away}"})
    assert status == 201 and _member(registry, "mover")["address"] == f"http://127.0.0.1:{away}"


def test_a_real_registry_refuses_its_own_address(procs) -> None:
    registry = procs("registry", "--port", "0")
    status, _, body = request(registry.url + "/register", "POST", {"id": "loop", "address": registry.url})
    assert status == 400 and body["error"]["code"] == "bad_address" and "is this registry" in body["error"]["message"]
    assert _member(registry, "loop") is None


def test_a_node_restarted_on_the_same_port_registers_again_at_once(procs) -> None:
    registry = procs("registry", "--port", "0", "--ttl", "60")  # expiry cannot be what lets it back in
    port = free_port()
    args = ("node", "--port", str(port), "--id", "node-1", "--registry", registry.url, "--heartbeat-interval", "0.2")
    first = procs(*args)
    wait_until(lambda: _member(registry, "node-1"), 10, "node-1 to register")
    first.stop(signal.SIGKILL)  # no deregistration: the registry still holds the old lease
    second = procs(*args)
    wait_until(lambda: request(second.url + "/discovery-status")[2]["heartbeats_ok"] >= 2, 10,
               "the restarted node to register and heartbeat")
    doc = request(second.url + "/discovery-status")[2]
    assert doc["registrations"] == 1 and doc["conflicts"] == 0 and doc["last_error"] is None
    assert _member(registry, "node-1")["incarnation"] == 2


# -- the node's side: the discovery client against a real registry app -------------------------------------
async def _discovery(client, clock, address: str = NODE):
    import aiohttp

    from live.discovery import DiscoveryClient
    url = str(client.make_url("")).rstrip("/")
    return DiscoveryClient(url, "node-1", address, metadata={"workers": 2}, interval_s=0.5, clock=clock), \
        aiohttp.ClientSession()


async def test_discovery_keeps_its_lease_and_takes_its_id_back_after_a_409(registry, clock) -> None:
    disc, session = await _discovery(registry, clock)
    async with session:
        await disc._beat(session)
        await disc._beat(session)
        assert (disc.registrations, disc.heartbeats_ok, disc.failures) == (1, 1, 0) and disc.lease
        first = disc.lease
        await register(registry)  # another instance at our address: its lease is the current one now
        await disc._beat(session)  # heartbeat 409 -> registers again at once
        assert disc.registrations == 2 and disc.conflicts == 1 and disc.lease != first and disc.last_error is None
        await disc._beat(session)
        assert disc.heartbeats_ok == 2
        await disc.deregister()
    assert await listing(registry, "?all=1") == []


async def test_discovery_refused_registration_warns_once_and_retries_each_beat(registry, clock, caplog) -> None:
    holder = {"X-Lease": (await (await register(registry, address="http://127.0.0.1:7000")).json())["lease"]}
    disc, session = await _discovery(registry, clock)
    async with session:
        with caplog.at_level("WARNING", logger="testbed.discovery"):
            for _ in range(3):
                await disc._beat(session)
        assert not disc.registered and disc.failures == 3 and disc.conflicts == 3 and "409" in disc.last_error
        warnings = [r for r in caplog.records if r.name == "testbed.discovery"]
        assert len(warnings) == 1 and "conflict" in warnings[0].getMessage()
        await registry.post("/deregister", json={"id": "node-1"}, headers=holder)
        await disc._beat(session)
        assert disc.registered and disc.last_error is None
    assert (await listing(registry))[0]["address"] == NODE
