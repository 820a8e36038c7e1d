"""The node under attack (issue 11, items 6, 7, 12 and the node's share of 11).

* who the client is: the rightmost untrusted X-Forwarded-For hop, not what the client wrote at the left;
  --trust-proxy takes CIDRs; an X-Client-ID over 256 bytes is a 400 JSON error;
* the rate limiter's table is bounded (--max-clients), its evictions visible in /stats;
* /admin/faults behind --admin-token: 401 JSON for a missing, wrong or undecodable Authorization;
* `testbed live run` gives its nodes a random token (in their environment) and posts faults with it;
* fuzzed X-Client-ID, X-Forwarded-For and Authorization values never get a 5xx from a real node.
"""

from __future__ import annotations

import http.client
import json
import subprocess

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from live.node import NodeConfig, make_node_app
from solutions.token_bucket_solution import TokenBucketSolution
from tests.live.procs import TESTBED, Proc, request

TOKEN = "s3cret-token_for.tests~"


async def node_client(aiohttp_client, clock, **config):
    config.setdefault("limiter_cls", TokenBucketSolution)
    return await aiohttp_client(make_node_app(NodeConfig(node_id="n1", **config), clock=clock))


def assert_json_error(status: int, body: object, code: str | None = None) -> dict:
    assert isinstance(body, dict) and set(body) == {"error"}, body
    error = body["error"]
    assert error["status"] == status and isinstance(error["code"], str) and isinstance(error["message"], str)
    if code is not None:
        assert error["code"] == code, error
    return error


# -- item 6: the client is the rightmost untrusted hop -------------------------------------------------------
async def test_spoofed_leftmost_forwarded_for_entries_share_the_real_clients_bucket(aiohttp_client, clock) -> None:
    client = await node_client(aiohttp_client, clock, rate_limit_per_s=1, rate_limit_burst=2,
                               trust_proxy=("127.0.0.1",))
    statuses = [(await client.get("/health", headers={"X-Forwarded-For": f"6.6.6.{i}, 203.0.113.9"})).status
                for i in range(10)]
    assert statuses == [200, 200] + [429] * 8
    # Another real client (another rightmost hop) has its own bucket.
    assert (await client.get("/health", headers={"X-Forwarded-For": "203.0.113.10"})).status == 200


async def test_trust_proxy_takes_networks(aiohttp_client, clock) -> None:
    client = await node_client(aiohttp_client, clock, rate_limit_per_s=1, trust_proxy=("127.0.0.0/8", "10.0.0.0/8"))
    # Peer 127.0.0.1 is in 127.0.0.0/8, so the chain counts; 10.0.0.7 is a trusted hop, skipped.
    for who in ("203.0.113.1", "203.0.113.2"):
        assert (await client.get("/health", headers={"X-Forwarded-For": f"{who}, 10.0.0.7"})).status == 200
    assert (await client.get("/health", headers={"X-Forwarded-For": "203.0.113.1"})).status == 429


# -- item 7: keys capped, table bounded ------------------------------------------------------------------------
@pytest.mark.parametrize("size, status", [(256, 200), (257, 400), (8000, 400)])  # 8 KB: just under the line limit
async def test_client_ids_over_256_bytes_are_a_400(aiohttp_client, clock, size, status) -> None:
    client = await node_client(aiohttp_client, clock, rate_limit_per_s=10, trust_proxy=("127.0.0.1",))
    for path in ("/health", "/work"):
        resp = await client.get(path, headers={"X-Client-ID": "c" * size})
        assert resp.status == status and resp.headers["X-Node-ID"] == "n1"
        if status == 400:
            error = assert_json_error(400, await resp.json(), "bad_client_id")
            assert error["limit_bytes"] == 256 and f"{size} bytes" in error["message"]
    text = await (await client.get("/metrics")).text()
    assert f'testbed_node_requests_total{{node="n1",path="/health",status="{status}"}} 1.0' in text


async def test_the_rate_limiters_table_is_capped_and_says_so(aiohttp_client, clock) -> None:
    client = await node_client(aiohttp_client, clock, rate_limit_per_s=0.001, max_clients=3,
                               trust_proxy=("127.0.0.1",))
    for i in range(10):  # each is owed a token for 1000 s: only the cap makes room
        assert (await client.get("/health", headers={"X-Client-ID": f"c{i}"})).status == 200
    stats = await (await client.get("/stats")).json()
    assert stats["rate_limiter"] == {"clients": 3, "max_clients": 3, "evicted": 7}
    assert (await client.get("/health", headers={"X-Client-ID": "c9"})).status == 429  # kept: still owed
    assert (await client.get("/health", headers={"X-Client-ID": "c0"})).status == 200  # evicted: forgiven


# -- item 12: /admin/faults behind a token ---------------------------------------------------------------------
@pytest.mark.parametrize("authorization, status", [
    (None, 401), ("", 401), ("Bearer", 401), ("Bearer ", 401), ("Bearer wrong", 401), (f"Basic {TOKEN}", 401),
    (f"Bearer {TOKEN}x", 401), (f"Bearer {TOKEN[:-1]}", 401), (TOKEN, 401),
    (f"Bearer {TOKEN}", 200), (f"bearer {TOKEN}", 200), (f"BEARER   {TOKEN} ", 200),
])
async def test_admin_faults_want_the_bearer_token(aiohttp_client, clock, authorization, status) -> None:
    client = await node_client(aiohttp_client, clock, faults_admin=True, admin_token=TOKEN)
    headers = {} if authorization is None else {"Authorization": authorization}
    for method, body in (("GET", None), ("POST", {"error_rate": 0.5}), ("DELETE", None)):
        resp = await client.request(method, "/admin/faults", json=body, headers=headers)
        assert resp.status == status, (method, authorization)
        if status == 401:
            assert_json_error(401, await resp.json(), "unauthorized")
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
            assert TOKEN not in await resp.text()
    if status == 401:  # nothing was changed by the refused POST
        stats = await (await client.get("/stats")).json()
        assert stats["faults"]["error_rate"] == 0.0


async def test_the_token_is_not_shown_and_admin_is_off_without_faults(aiohttp_client, clock) -> None:
    client = await node_client(aiohttp_client, clock, faults_admin=True, admin_token=TOKEN)
    assert TOKEN not in await (await client.get("/stats")).text()
    off = await node_client(aiohttp_client, clock, admin_token=TOKEN)
    resp = await off.post("/admin/faults", json={"error_rate": 1}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert resp.status == 404


# -- end to end through a real node ---------------------------------------------------------------------------
def raw_get(port: int, path: str, headers: list[tuple[str, bytes]], method: str = "GET",
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request whose header values go on the wire as the given bytes (http.client sends bytes as-is)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.putrequest(method, path)
        for name, value in headers:
            conn.putheader(name, value)
        if body is not None:
            conn.putheader("Content-Type", "application/json")
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


@pytest.fixture(scope="module")
def node():
    """A real node with every input this file fuzzes switched on; its admin token comes from the environment."""
    with pytest.MonkeyPatch.context() as env:
        env.setenv("TESTBED_ADMIN_TOKEN", TOKEN)  # Proc hands the node our environment
        proc = Proc("node", "--port", "0", "--id", "fuzzed", "--rate-limit", "1000000", "--max-per-client", "50",
                    "--trust-proxy", "127.0.0.1,10.0.0.0/8", "--faults", "--impl", "solution")
    yield proc
    proc.stop()


def test_a_real_node_behind_a_trusted_proxy_counts_the_real_client() -> None:
    limited = Proc("node", "--port", "0", "--id", "limited", "--rate-limit", "1", "--burst", "2",
                   "--trust-proxy", "127.0.0.1", "--impl", "solution")
    try:
        statuses = [raw_get(limited.port, "/health", [("X-Forwarded-For", f"10.0.0.{i}, 203.0.113.9".encode())])[0]
                    for i in range(10)]
        assert statuses == [200, 200] + [429] * 8
    finally:
        limited.stop()


def test_a_real_node_refuses_a_long_client_id_and_wants_its_token(node) -> None:
    status, headers, body = raw_get(node.port, "/work", [("X-Client-ID", b"x" * 300)])
    assert status == 400 and headers["X-Node-ID"] == "fuzzed"
    assert assert_json_error(400, json.loads(body), "bad_client_id")["limit_bytes"] == 256
    short = Proc("node", "--port", "0", "--trust-proxy", "127.0.0.1", "--max-client-id-bytes", "16")
    try:
        assert raw_get(short.port, "/health", [("X-Client-ID", b"x" * 16)])[0] == 200
        status, _, body = raw_get(short.port, "/health", [("X-Client-ID", b"x" * 17)])
        assert status == 400 and json.loads(body)["error"]["limit_bytes"] == 16
    finally:
        short.stop()
    assert request(node.url + "/admin/faults", "POST", {"error_rate": 0.5})[0] == 401
    status, _, body = raw_get(node.port, "/admin/faults", [("Authorization", b"Bearer \xff\xfe" + TOKEN.encode())])
    assert status == 401 and json.loads(body)["error"]["code"] == "unauthorized"
    auth = {"Authorization": f"Bearer {TOKEN}"}
    assert request(node.url + "/admin/faults", "GET", headers=auth)[0] == 200


@pytest.mark.parametrize("args, words", [
    (["--trust-proxy", "127.0.0.1,nonsense"], "'nonsense' is not an IP address or a CIDR network"),
    (["--trust-proxy", "10.0.0.1/8"], "did you mean 10.0.0.0/8"),
    (["--max-clients", "0"], "--max-clients"),
    (["--max-client-id-bytes", "0"], "--max-client-id-bytes"),
    (["--faults", "--admin-token", "has space"], "--admin-token"),
])
def test_bad_flags_are_usage_errors_naming_the_entry(args, words) -> None:
    done = subprocess.run([TESTBED, "node", "--port", "0", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and words in done.stderr, done.stderr


# -- item 11, the node's share: fuzzed header values never get a 5xx -----------------------------------------
def _on_one_line(value: bytes) -> bytes:
    return value.replace(b"\r", b"").replace(b"\n", b"")  # CR and LF would end the header: framing, not values


hops = st.one_of(st.ip_addresses().map(str), st.sampled_from(["unknown", "", " ", "[::1]:80", "1.2.3.4:99999"]),
                 st.text(max_size=70))
values = st.one_of(
    st.binary(max_size=400),                                                        # any bytes, UTF-8 or not
    st.lists(hops, max_size=8).map(lambda h: ",".join(h).encode("utf-8", "surrogatepass")),  # chains
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),        # text, lone surrogates too
    st.sampled_from([b"Bearer " + TOKEN.encode(), b"bearer \xff" + TOKEN.encode(), b"c" * 257]),
).map(_on_one_line)
FUZZ = settings(max_examples=60, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _check(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status < 500, (status, body[:300])
    if "X-Node-ID" in headers and status >= 400:  # the node's own answer (not the HTTP parser's): one JSON shape
        assert_json_error(status, json.loads(body))


@pytest.mark.parametrize("header, path, method", [
    ("X-Client-ID", "/work", "GET"), ("X-Client-ID", "/health", "GET"),
    ("X-Forwarded-For", "/health", "GET"),
    ("Authorization", "/admin/faults", "GET"), ("Authorization", "/admin/faults", "POST"),
])
def test_fuzzed_header_values_never_get_a_5xx(node, header, path, method) -> None:
    @FUZZ
    @given(value=values, repeat=st.booleans())
    def fuzz(value: bytes, repeat: bool) -> None:
        headers = [(header, value)] * (2 if repeat else 1)
        body = b'{"error_rate": 0}' if method == "POST" else None
        _check(*raw_get(node.port, path, headers, method, body))
    fuzz()


# -- the live runner's token ------------------------------------------------------------------------------------
FAULTY = """
name = "token"
seed = 1
duration_s = 1
[workload]
arrival = "poisson"
rate_per_s = 5
clients = 1
[[nodes]]
id = "a"
workers = 1
load_factor_ms = 1
[[nodes.faults]]
start_s = 0
end_s = 0.2
error_rate = 0.5
"""


async def test_live_runs_give_nodes_a_random_token_and_post_faults_with_it() -> None:
    import tomllib

    from core.scenario import Scenario
    from live.cluster import Cluster
    from live.loadgen import clock
    from live.run import _fault
    from live.upstream import UpstreamPool

    scenario = Scenario.from_mapping(tomllib.loads(FAULTY))
    async with Cluster(scenario, command=[TESTBED], echo=lambda _: None) as cluster:
        node = cluster.nodes["a"]
        assert cluster.admin_token not in " ".join(node.argv) and len(cluster.admin_token) >= 32
        with open(f"/proc/{node.pid}/environ", "rb") as f:  # where it is: the node's environment, not argv
            assert f"TESTBED_ADMIN_TOKEN={cluster.admin_token}".encode() in f.read().split(b"\0")
        pool = UpstreamPool(timeout_s=5.0)
        try:
            status, _, _ = await pool.request(node.url, "POST", "/admin/faults",
                                              [("Content-Type", "application/json")], b'{"error_rate": 1}')
            assert status == 401  # not without the token
        finally:
            pool.close()
        log: list[dict] = []
        await _fault(cluster, "a", scenario.nodes[0].faults[0], clock(), log)
        assert [(e["action"].split(":")[0], e["result"]) for e in log] == [("faults on", "ok"), ("faults off", "ok")]
