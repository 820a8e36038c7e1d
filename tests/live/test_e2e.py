"""End to end: the real ``testbed`` processes on free loopback ports, replaying the seed's "Test It" blocks."""

from __future__ import annotations

import asyncio
import signal
import statistics
import subprocess
import threading
import time

import aiohttp
import pytest

from tests.live.procs import TESTBED, Proc, free_port, request, wait_until


def test_rate_limit_3_then_10_quick_requests(procs) -> None:
    node = procs("node", "--port", "0", "--id", "node-1", "--rate-limit", "3")
    statuses = [request(node.url + "/health")[0] for _ in range(10)]
    assert statuses == [200, 200, 200] + [429] * 7
    status, headers, body = request(node.url + "/health")
    assert headers["Retry-After"] == "1" and body["error"]["code"] == "rate_limited"


def test_queue_stats(procs) -> None:
    node = procs("node", "--port", "0", "--id", "node-1", "--backpressure", "50")
    status, _, body = request(node.url + "/queue-stats")
    assert status == 200
    assert {"current", "max", "utilization_percent", "accepted", "rejected", "rejection_rate", "peak"} <= set(body)
    assert body["max"] == 50


def test_circuit_goes_closed_open_half_open_closed(procs) -> None:
    node = procs("node", "--port", "0", "--id", "node-1", "--circuit-breaker", "--faults",
                 "--failure-threshold", "3", "--recovery-timeout", "1")
    state = lambda: request(node.url + "/circuit-status")[2]["state"]  # noqa: E731
    assert state() == "CLOSED"
    assert request(node.url + "/admin/faults", "POST", {"error_rate": 1.0})[0] == 200
    assert [request(node.url + "/work")[0] for _ in range(3)] == [500, 500, 500]
    assert state() == "OPEN"
    assert request(node.url + "/work")[0] == 503
    assert request(node.url + "/admin/faults", "DELETE")[0] == 200
    wait_until(lambda: state() == "HALF_OPEN", 5, "the breaker to half-open after its recovery timeout")
    assert request(node.url + "/work")[0] == 200
    assert state() == "CLOSED"


def test_discovery_ttl_and_registry_restart(procs) -> None:
    reg_port = free_port()
    registry = procs("registry", "--port", str(reg_port), "--ttl", "1.5")
    ports = [free_port(), free_port()]
    nodes = [procs("node", "--port", str(p), "--id", f"node-{i + 1}", "--registry", registry.url,
                   "--heartbeat-interval", "0.3") for i, p in enumerate(ports)]
    alive = lambda: sorted(n["id"] for n in request(registry.url + "/nodes")[2]["nodes"])  # noqa: E731
    wait_until(lambda: alive() == ["node-1", "node-2"], 5, "both nodes to register")
    status, _, disc = request(nodes[0].url + "/discovery-status")
    assert status == 200 and disc["registered"] is True
    wait_until(lambda: [p["id"] for p in request(nodes[0].url + "/peers")[2]["peers"]] == ["node-2"], 5,
               "node-1 to list node-2 as its peer")
    # A killed node (no deregistration) disappears after the TTL.
    nodes[1].stop(signal.SIGKILL)
    wait_until(lambda: alive() == ["node-1"], 5, "the killed node to expire")
    # A restarted registry knows nothing, and gets node-1 back from its next heartbeat.
    registry.stop()
    assert wait_until(lambda: request(nodes[0].url + "/discovery-status")[2]["failures"] > 0, 5,
                      "node-1 to notice the registry is gone")
    registry2 = procs("registry", "--port", str(reg_port), "--ttl", "1.5")
    wait_until(lambda: request(registry2.url + "/nodes")[2]["count"] == 1, 5, "node-1 to re-register")
    assert request(nodes[0].url + "/discovery-status")[2]["registrations"] >= 2


def test_graceful_shutdown_finishes_in_flight_and_deregisters(procs) -> None:
    registry = procs("registry", "--port", "0")
    port = free_port()
    node = Proc("node", "--port", str(port), "--id", "node-1", "--registry", registry.url,
                "--load-factor", "600", "--service", "deterministic", "--heartbeat-interval", "0.3")
    try:
        wait_until(lambda: request(registry.url + "/nodes")[2]["count"] == 1, 5, "the node to register")
        result: dict = {}
        worker = threading.Thread(target=lambda: result.update(r=request(node.url + "/work")))
        worker.start()
        wait_until(lambda: request(node.url + "/health")[2]["busy_workers"] == 1, 5, "the work to start")
        node.send(signal.SIGTERM)
        worker.join(10)
        assert result["r"][0] == 200, "the in-flight request was cut off"
        assert node.popen.wait(10) == 0
        assert request(registry.url + "/nodes")[2]["count"] == 0, "the node did not deregister"
        assert "stopped" in node.output()
    finally:
        node.stop()


async def _load(url: str, rate: float, seconds: float) -> list[tuple[float, str]]:
    """Open-loop load: requests start on schedule whatever the responses do."""
    out: list[tuple[float, str]] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        async def one() -> None:
            t0 = time.perf_counter()
            async with session.get(url) as resp:
                await resp.read()
                assert resp.status == 200, resp.status
                out.append((time.perf_counter() - t0, resp.headers["X-Node-ID"]))
        start = time.perf_counter()
        tasks = []
        for i in range(int(rate * seconds)):
            delay = start + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one()))
        await asyncio.gather(*tasks)
    return out


def test_least_connections_beats_round_robin_on_the_seed_nodes(procs) -> None:
    nodes = [procs("node", "--port", "0", "--id", f"node-{i + 1}", "--workers", str(w), "--load-factor", "25",
                   "--seed", str(i)) for i, w in enumerate([1, 4, 1])]
    ports = ",".join(str(n.port) for n in nodes)
    results = {}
    for strategy in ("round_robin", "least_connections"):
        lb = procs("balancer", "--port", "0", "--nodes", ports, "--strategy", strategy, "--impl", "solution")
        samples = asyncio.run(_load(lb.url + "/work", rate=110.0, seconds=4.0))  # ~46% of capacity
        latencies = sorted(s for s, _ in samples)
        shares = {n: sum(1 for _, who in samples if who == n) / len(samples) for n in ("node-1", "node-2", "node-3")}
        results[strategy] = (statistics.mean(latencies), latencies[int(0.95 * len(latencies))], shares)
        lb.stop()
    rr, lc = results["round_robin"], results["least_connections"]
    assert lc[0] < 0.7 * rr[0], results
    assert lc[1] < 0.7 * rr[1], results
    assert max(lc[2], key=lc[2].get) == "node-2", results
    assert all(abs(s - 1 / 3) < 0.02 for s in rr[2].values()), results


def test_balancer_follows_the_registry(procs) -> None:
    registry = procs("registry", "--port", "0", "--ttl", "1.5")
    nodes = []
    for i in range(2):
        port = free_port()
        nodes.append(procs("node", "--port", str(port), "--id", f"node-{i + 1}", "--registry", registry.url,
                           "--heartbeat-interval", "0.3", "--workers", str(2 * i + 1)))
    lb = procs("load-balancer", "--port", "0", "--registry", registry.url, "--strategy", "weighted_round_robin",
               "--health-interval", "0.3")
    backends = lambda: request(lb.url + "/lb-stats")[2]["backends"]  # noqa: E731
    wait_until(lambda: sorted(backends()) == ["node-1", "node-2"], 10, "the balancer to learn both nodes")
    seen = [request(lb.url + "/health")[1]["X-Backend"] for _ in range(8)]
    assert seen.count("node-2") == 6 and seen.count("node-1") == 2  # weights 3 and 1 from the registry
    nodes[0].stop(signal.SIGKILL)
    wait_until(lambda: sorted(backends()) == ["node-2"], 10, "the balancer to drop the dead node")
    assert all(request(lb.url + "/health")[0] == 200 for _ in range(5))


@pytest.mark.parametrize("args, words", [
    (["node", "--workers", "0"], "Invalid value for '--workers'"),
    (["node", "--rate-limit", "-1"], "Invalid value for '--rate-limit'"),
    (["node", "--registry", "localhost:5000"], "is not an http:// or https:// URL"),
    (["balancer"], "give --nodes (e.g. 5001,5002,5003) or --registry URL"),
    (["balancer", "--nodes", "5001,abc"], "'abc' is not a port, host:port or http:// URL"),
    (["balancer", "--nodes", "5001", "--strategy", "fastest"], "Invalid value for '--strategy'"),
    (["registry", "--ttl", "0"], "Invalid value for '--ttl'"),
])
def test_invalid_flags_are_clear_errors(args, words) -> None:
    proc = subprocess.run([TESTBED, *args], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert words in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_port_in_use_is_a_clear_error(procs) -> None:
    node = procs("node", "--port", "0", "--id", "a")
    proc = subprocess.run([TESTBED, "node", "--port", str(node.port), "--id", "b"], capture_output=True,
                          text=True, timeout=30)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{node.port}" in proc.stderr and "Traceback" not in proc.stderr
