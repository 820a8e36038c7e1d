"""The balancer's upstream client against real and deliberately odd servers."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from live.upstream import ConnectFailed, UpstreamError, UpstreamPool
from tests.live.procs import free_port


async def raw_server(handler):
    """A TCP server whose connection handler writes raw bytes; returns (url, server, connection count)."""
    count = {"n": 0}

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        count["n"] += 1
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    server = await asyncio.start_server(on_conn, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    return f"http://127.0.0.1:{port}", server, count


async def read_request(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")


async def test_keep_alive_reuses_one_connection(aiohttp_server) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text=f"hi {request.query.get('n')}", headers={"X-Test": "1"})
    app = web.Application()
    app.router.add_get("/hello", hello)
    server = await aiohttp_server(app)
    pool = UpstreamPool()
    url = str(server.make_url("")).rstrip("/")
    for n in range(5):
        status, headers, body = await pool.request(url, "GET", f"/hello?n={n}", [], b"")
        assert (status, body) == (200, f"hi {n}".encode()) and ("X-Test", "1") in headers
    assert len(pool._idle[url]) == 1
    pool.close()


async def test_chunked_head_and_204() -> None:
    async def handler(reader, writer):
        while True:
            try:
                req = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if req.startswith(b"HEAD"):
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 99\r\n\r\n")
            elif b"/empty" in req:
                writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
            else:
                writer.write(b"HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n2\r\nde\r\n0\r\n\r\n")
            await writer.drain()
    url, server, _ = await raw_server(handler)
    pool = UpstreamPool(timeout_s=2)
    assert (await pool.request(url, "GET", "/", [], b""))[::2] == (201, b"abcde")
    assert (await pool.request(url, "HEAD", "/", [], b""))[::2] == (200, b"")
    assert (await pool.request(url, "GET", "/empty", [], b""))[::2] == (204, b"")
    pool.close()
    server.close()


async def test_stale_idle_connection_is_retried_on_a_fresh_one() -> None:
    async def handler(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        # ... and then close, as a server does with an idle keep-alive connection
    url, server, count = await raw_server(handler)
    pool = UpstreamPool(timeout_s=2)
    assert (await pool.request(url, "GET", "/", [], b""))[2] == b"ok"
    # The server has closed that connection (whether or not we have noticed yet).
    assert (await pool.request(url, "GET", "/", [], b""))[2] == b"ok"
    assert count["n"] == 2
    pool.close()
    server.close()


async def test_connection_refused_is_connect_failed() -> None:
    with pytest.raises(ConnectFailed):
        await UpstreamPool(timeout_s=2).request(f"http://127.0.0.1:{free_port()}", "GET", "/", [], b"")


async def test_close_mid_response_and_garbage_are_upstream_errors() -> None:
    async def half(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly part")
        await writer.drain()
    url, server, _ = await raw_server(half)
    with pytest.raises(UpstreamError, match="closed the connection"):
        await UpstreamPool(timeout_s=2).request(url, "GET", "/", [], b"")
    server.close()

    async def garbage(reader, writer):
        await read_request(reader)
        writer.write(b"SPLORK\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)
    url, server, _ = await raw_server(garbage)
    with pytest.raises(UpstreamError):
        await UpstreamPool(timeout_s=2).request(url, "GET", "/", [], b"")
    server.close()


async def test_timeout() -> None:
    async def silent(reader, writer):
        await read_request(reader)
        await asyncio.sleep(2)
    url, server, _ = await raw_server(silent)
    with pytest.raises(asyncio.TimeoutError):
        await UpstreamPool(timeout_s=0.2).request(url, "GET", "/", [], b"")
    server.close()


async def test_post_body_and_headers_arrive(aiohttp_server) -> None:
    async def echo(request: web.Request) -> web.Response:
        return web.json_response({"body": (await request.read()).decode(), "h": request.headers.get("X-A")})
    app = web.Application()
    app.router.add_post("/e", echo)
    server = await aiohttp_server(app)
    status, _, body = await UpstreamPool().request(str(server.make_url("")).rstrip("/"), "POST", "/e",
                                                   [("X-A", "b")], b"payload")
    assert status == 200 and body == b'{"body": "payload", "h": "b"}'
