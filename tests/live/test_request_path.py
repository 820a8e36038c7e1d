"""The node's and the balancer's request path on the live apps: what must come back after a failure.

The live twins of ``tests/sim/test_request_path.py``:

* a request the node's open circuit breaker refuses gives its backpressure slot
  back, so once the breaker closes the gate still admits a full house
  (``/queue-stats`` back to 0 in flight, nothing refused by the gate);
* a backend the balancer's ejector took out comes back once ``ejection_time_s``
  has passed and a probe succeeded (``/lb-stats`` shows its ejector CLOSED
  again, and round robin gives it its turn).

The node test drives the breaker's clock by hand. The balancer test runs on the
real clock with a 0.3 s ejection and waits by polling ``/lb-stats`` up to a
deadline, never by sleeping a fixed time.
"""

from __future__ import annotations

import asyncio

from live.balancer import BalancerConfig, make_balancer_app
from live.node import NodeConfig, make_node_app
from solutions.impl import strategy_class
from solutions.token_bucket_solution import TokenBucketSolution

DEADLINE_S = 5.0  # far longer than the 0.3 s ejection, even on a loaded machine
POLL_S = 0.02


async def node_client(aiohttp_client, clock=None, **config):
    config.setdefault("limiter_cls", TokenBucketSolution)
    return await aiohttp_client(make_node_app(NodeConfig(node_id="n1", **config), clock=clock))


async def test_breaker_refusals_leave_the_backpressure_gate_empty(aiohttp_client, clock) -> None:
    places, recovery_s = 3, 5.0
    node = await node_client(aiohttp_client, clock, workers=1, load_factor_ms=20, service="deterministic",
                             backpressure=places, circuit_breaker=True, failure_threshold=3,
                             recovery_timeout_s=recovery_s, faults_admin=True)
    assert (await node.post("/admin/faults", json={"error_rate": 1.0})).status == 200
    assert [(await node.get("/work")).status for _ in range(3)] == [500] * 3
    assert (await (await node.get("/circuit-status")).json())["state"] == "OPEN"
    refused = [await node.get("/work") for _ in range(10 * places)]
    assert {r.status for r in refused} == {503}
    assert {(await r.json())["error"]["code"] for r in refused} == {"circuit_open"}
    gate = await (await node.get("/queue-stats")).json()
    assert gate["current"] == 0, gate  # every refused request gave its place back
    assert gate["rejected"] == 0 and gate["accepted"] == 3 + 10 * places, gate

    assert (await node.delete("/admin/faults")).status == 200
    clock.advance(recovery_s)
    assert (await node.get("/work")).status == 200  # the probe
    assert (await (await node.get("/circuit-status")).json())["state"] == "CLOSED"
    # The gate admits a full house at once (one in service, the rest waiting for the worker),
    # then one request after another.
    together = await asyncio.gather(*(node.get("/work") for _ in range(places)))
    assert [r.status for r in together] == [200] * places
    assert [(await node.get("/work")).status for _ in range(5)] == [200] * 5
    gate = await (await node.get("/queue-stats")).json()
    assert gate["current"] == 0 and gate["rejected"] == 0, gate
    assert gate["accepted"] == 3 + 10 * places + 1 + places + 5, gate


async def test_an_ejected_backend_gets_traffic_again_after_its_ejection_time(aiohttp_client,
                                                                              aiohttp_server) -> None:
    servers = [await aiohttp_server(make_node_app(NodeConfig(node_id=f"node-{i + 1}", faults_admin=True)))
               for i in range(2)]
    urls = [str(s.make_url("")).rstrip("/") for s in servers]
    flaky = await aiohttp_client(servers[0])
    config = BalancerConfig(nodes=tuple(urls), seed=1, strategy="round_robin", eject_after_failures=2,
                            ejection_time_s=0.3)
    lb = await aiohttp_client(make_balancer_app(config, strategy_cls=strategy_class(config.strategy, "solution")))

    async def ejector() -> str:
        return (await (await lb.get("/lb-stats")).json())["backends"][urls[0]]["ejector"]

    # node-1 fails every request: round robin sends it every other one, and two failures eject it.
    assert (await flaky.post("/admin/faults", json={"error_rate": 1.0})).status == 200
    statuses = [(await lb.get("/work")).status for _ in range(4)]
    assert statuses == [500, 200, 500, 200]
    assert await ejector() != "CLOSED"  # OPEN, or HALF_OPEN if 0.3 s went by: either way out until a probe

    # The fault ends. Traffic keeps flowing (all of it served); after the ejection time the next
    # request to node-1 is a probe, it succeeds, and the ejector closes.
    assert (await flaky.delete("/admin/faults")).status == 200
    loop = asyncio.get_running_loop()
    deadline = loop.time() + DEADLINE_S
    while (state := await ejector()) != "CLOSED":
        assert loop.time() < deadline, f"node-1's ejector is still {state} {DEADLINE_S} s after the fault ended"
        assert (await lb.get("/work")).status == 200
        await asyncio.sleep(POLL_S)  # a polling interval, not a wait for something to happen

    # Back in rotation: round robin alternates between the two again.
    before = (await (await lb.get("/lb-stats")).json())["backends"][urls[0]]["requests"]
    picked = []
    for _ in range(10):
        resp = await lb.get("/work")
        assert resp.status == 200
        picked.append(resp.headers["X-Node-ID"])
    assert picked.count("node-1") == 5, picked
    stats = (await (await lb.get("/lb-stats")).json())["backends"][urls[0]]
    assert stats["requests"] == before + 5 and stats["ejector"] == "CLOSED", stats
