"""The balancer app in front of real node apps: pass-through, headers, strategies, failures."""

from __future__ import annotations

import asyncio
import socket

import pytest
from aiohttp import web

from live.balancer import BalancerConfig, make_balancer_app, parse_node
from live.node import NodeConfig, make_node_app
from tests.live.polling import until
from solutions.impl import strategy_class
from solutions.token_bucket_solution import TokenBucketSolution


async def nodes(aiohttp_server, specs):
    servers = [await aiohttp_server(make_node_app(NodeConfig(node_id=f"node-{i + 1}", limiter_cls=TokenBucketSolution, **spec)))
               for i, spec in enumerate(specs)]
    return [str(s.make_url("")).rstrip("/") for s in servers]


async def balancer(aiohttp_client, urls, **config):
    config = BalancerConfig(nodes=tuple(urls), seed=1, **config)
    return await aiohttp_client(make_balancer_app(config, strategy_cls=strategy_class(config.strategy, "solution")))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_round_robin_and_headers(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{}, {}, {}])
    lb = await balancer(aiohttp_client, urls)
    seen = []
    for _ in range(6):
        resp = await lb.get("/health")
        assert resp.status == 200
        seen.append(resp.headers["X-Node-ID"])
        assert resp.headers["X-Backend"] == f"node-{int(seen[-1][-1])}" or resp.headers["X-Backend"] in urls
    assert seen == ["node-1", "node-2", "node-3"] * 2
    stats = await (await lb.get("/lb-stats")).json()
    assert stats["requests"] == 6 and all(b["requests"] == 2 for b in stats["backends"].values())


async def test_status_headers_body_and_query_pass_through(aiohttp_client, aiohttp_server) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.Response(status=418, body=body[::-1], headers={"X-Echo-Query": request.query_string,
                                                                  "X-Seen-XFF": request.headers.get("X-Forwarded-For", "")})
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    server = await aiohttp_server(app)
    lb = await balancer(aiohttp_client, [str(server.make_url("")).rstrip("/")])
    resp = await lb.put("/anything/here?a=1&b=two", data=b"hello")
    assert resp.status == 418
    assert await resp.read() == b"olleh"
    assert resp.headers["X-Echo-Query"] == "a=1&b=two"
    assert resp.headers["X-Seen-XFF"] == "127.0.0.1"


async def test_backend_429_and_500_are_not_hidden(aiohttp_client, aiohttp_server) -> None:
    # Trusting the balancer keeps its health checks out of the client's bucket.
    urls = await nodes(aiohttp_server, [{"rate_limit_per_s": 1, "error_rate": 1.0, "trust_proxy": ("127.0.0.1",)}])
    lb = await balancer(aiohttp_client, urls, eject_after_failures=0)
    assert (await lb.get("/work")).status == 500
    resp = await lb.get("/work")
    assert resp.status == 429 and resp.headers["Retry-After"] == "1"
    assert (await resp.json())["error"]["code"] == "rate_limited"


async def test_refused_connection_is_retried_elsewhere(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{}])
    dead = f"http://127.0.0.1:{free_port()}"
    lb = await balancer(aiohttp_client, [dead, urls[0]], health_interval_s=60,
                        unhealthy_after=2)  # the first (failed) check alone must not take it out
    statuses = [(await lb.get("/health")).status for _ in range(4)]
    assert statuses == [200] * 4
    stats = await (await lb.get("/lb-stats")).json()
    assert stats["backends"][dead]["healthy"] is False and stats["backends"][dead]["errors"] >= 1


async def test_no_healthy_backend_is_503_json(aiohttp_client) -> None:
    lb = await balancer(aiohttp_client, [f"http://127.0.0.1:{free_port()}"], health_interval_s=60,
                        unhealthy_after=2)  # the first (failed) check alone must not take it out
    assert (await lb.get("/work")).status == 502  # the only backend refused: nothing to retry on
    resp = await lb.get("/work")
    assert resp.status == 503
    assert (await resp.json())["error"]["code"] == "no_healthy_backend"


async def test_timeout_is_504(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{"load_factor_ms": 2000, "service": "deterministic"}])
    lb = await balancer(aiohttp_client, urls, timeout_s=0.2)
    resp = await lb.get("/work")
    assert resp.status == 504 and (await resp.json())["error"]["code"] == "backend_timeout"


async def test_failing_backend_is_ejected(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{"error_rate": 1.0}, {}])
    lb = await balancer(aiohttp_client, urls, eject_after_failures=2, ejection_time_s=60)
    statuses = [(await lb.get("/work")).status for _ in range(10)]
    assert statuses.count(500) == 2  # then node-1 is out
    stats = await (await lb.get("/lb-stats")).json()
    assert stats["backends"][urls[0]]["ejector"] == "OPEN"


async def test_least_connections_avoids_the_busy_backend(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{"load_factor_ms": 400, "service": "deterministic"}, {}])
    lb = await balancer(aiohttp_client, urls, strategy="least_connections")
    slow = asyncio.create_task(lb.get("/work"))

    async def one_in_flight() -> bool:
        stats = await (await lb.get("/lb-stats")).json()
        return sum(b["active"] for b in stats["backends"].values()) == 1
    await until(one_in_flight, what="the slow request in flight")
    picked = [(await lb.get("/work")).headers["X-Node-ID"] for _ in range(5)]
    assert set(picked) == {"node-2"} or picked.count("node-2") >= 4
    assert (await slow).status == 200


async def test_balancer_metrics(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{}])
    lb = await balancer(aiohttp_client, urls)
    await lb.get("/health")
    text = await (await lb.get("/metrics")).text()
    assert f'testbed_lb_requests_total{{backend="{urls[0]}",status="200"}} 1.0' in text


@pytest.mark.parametrize("spec, url", [("5001", "http://127.0.0.1:5001"), ("example:80", "http://example:80"),
                                       ("http://127.0.0.1:9/", "http://127.0.0.1:9")])
def test_parse_node(spec, url) -> None:
    assert parse_node(spec) == url


@pytest.mark.parametrize("spec", ["abc", "70000", "host:", ":80", "ftp://x"])
def test_parse_node_rejects(spec) -> None:
    with pytest.raises(ValueError, match="not a port"):
        parse_node(spec)


async def test_lb_stats_shows_the_membership_and_stall_figures(aiohttp_client, aiohttp_server) -> None:
    urls = await nodes(aiohttp_server, [{}, {}])
    lb = await balancer(aiohttp_client, urls, strategy="round_robin")
    assert (await lb.get("/work")).status == 200  # one of the two; the other has had no request yet
    stats = await (await lb.get("/lb-stats")).json()
    assert (stats["max_backends"], stats["left_out"], stats["refused"]) == (1000, 0, 0)
    backends = stats["backends"]
    used = next(u for u in urls if backends[u]["requests"] == 1)
    unused = next(u for u in urls if u != used)
    assert backends[used]["stalls"] == 0 and backends[used]["last_sent_ago_s"] >= 0
    assert backends[unused]["stalls"] == 0 and backends[unused]["last_sent_ago_s"] is None


async def test_a_post_is_not_sent_again_when_its_reused_connection_dies(aiohttp_client) -> None:
    """The backend answers each connection's first request and closes it at the second, unanswered: the
    balancer re-sends a GET on a fresh connection, never a POST (RFC 9110 9.2.2), which is a 502."""
    seen: list[bytes] = []

    async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b" ", 1)[0])
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 15\r\n\r\n{\"status\":\"ok\"}")
            await writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            seen.append(head.split(b" ", 1)[0])
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()
    server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
    lb = await balancer(aiohttp_client, [url], health_interval_s=60)  # one check, on its own connection
    try:
        statuses = []
        for method in ("GET", "POST", "GET", "GET"):
            resp = await lb.request(method, "/work", data=b"{}" if method == "POST" else None)
            body = await resp.json(content_type=None)
            statuses.append((method, resp.status, body.get("error", {}).get("code")))
    finally:
        await lb.close()  # the balancer's connections go first, so the server's handlers end
        server.close()
        await server.wait_closed()
    assert statuses == [("GET", 200, None), ("POST", 502, "backend_error"), ("GET", 200, None),
                        ("GET", 200, None)], statuses
    assert seen.count(b"POST") == 1, seen
