"""The balancer's upstream client against real and deliberately odd servers."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from live.upstream import ConnectFailed, UpstreamError, UpstreamPool
from tests.live.polling import until
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


async def one_answer_per_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Answer a connection's first request (keep-alive); at its second, close without a byte of answer:
    a backend closing an idle keep-alive connection just as the next request arrives."""
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    await read_request(reader)  # and close (raw_server), unanswered


@pytest.mark.parametrize("method, resent", [("GET", True), ("HEAD", True), ("OPTIONS", True), ("PUT", True),
                                            ("DELETE", True), ("POST", False), ("PATCH", False)])
async def test_only_idempotent_methods_are_sent_again_after_a_reused_connection_died(method, resent) -> None:
    """RFC 9110 9.2.2: the request may have reached the backend before the close; only a method for which
    twice is the same as once may be retried automatically."""
    url, server, count = await raw_server(one_answer_per_connection)
    pool = UpstreamPool(timeout_s=2)
    assert (await pool.request(url, "GET", "/", [], b""))[0] == 200  # leaves one connection idle
    body = b"" if method in ("GET", "HEAD", "OPTIONS", "DELETE") else b"{}"
    if resent:
        assert (await pool.request(url, method, "/", [], body))[0] == 200
        assert count["n"] == 2  # the dead one, then a fresh one
    else:
        with pytest.raises(UpstreamError, match=f"{method} is not idempotent, so it is not sent again"):
            await pool.request(url, method, "/", [], body)
        assert count["n"] == 1  # sent once, never again
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


# -- interim responses, streaming, flow control ------------------------------------------
async def test_interim_responses_are_skipped_and_101_is_an_error() -> None:
    async def interim(reader, writer):
        while True:
            try:
                req = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if b"/switch" in req:
                writer.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n\r\n")
            else:  # a 100 nobody asked for, then 103 Early Hints, then the answer
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nLink: </a>\r\n\r\n"
                             b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nX-Final: 1\r\n\r\ndone")
            await writer.drain()
    url, server, _ = await raw_server(interim)
    pool = UpstreamPool(timeout_s=2)
    status, headers, body = await pool.request(url, "GET", "/", [], b"")
    assert (status, body) == (200, b"done") and headers == [("Content-Length", "4"), ("X-Final", "1")]
    with pytest.raises(UpstreamError, match="101"):
        await pool.request(url, "GET", "/switch", [], b"")
    pool.close()
    server.close()


async def test_a_body_framed_by_the_close_ends_at_the_close() -> None:
    async def old_style(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
        await writer.drain()
    url, server, _ = await raw_server(old_style)
    assert (await UpstreamPool(timeout_s=2).request(url, "GET", "/", [], b""))[::2] == (200, b"until the end")
    server.close()


async def test_a_large_response_is_read_in_pieces_and_the_socket_waits_for_the_reader() -> None:
    size = 8_000_000
    sent = {"bytes": 0}

    async def big(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % size)
        for _ in range(size // 100_000):
            writer.write(b"b" * 100_000)
            await writer.drain()
            sent["bytes"] += 100_000
    url, server, _ = await raw_server(big)
    pool = UpstreamPool(timeout_s=5)
    response = await pool.exchange(url, "GET", b"/", b"")
    assert response.status == 200 and not response.complete
    conn = response._conn
    assert conn is not None
    await until(lambda: _now(conn.reading_paused), what="the connection to stop reading")
    assert conn.buffered < 1_000_000  # what it holds for the reader is bounded, not the 8 MB
    got = 0
    while chunk := await response.read():
        assert len(chunk) <= 1_000_000
        got += len(chunk)
    assert got == size == sent["bytes"]
    assert len(pool._idle[url]) == 1  # complete and kept alive: back in the pool
    pool.close()
    server.close()


async def _now(value: bool) -> bool:
    return value


async def test_a_streamed_body_goes_chunked_or_with_its_length(aiohttp_server) -> None:
    async def echo(request: web.Request) -> web.Response:
        body = await request.read()
        return web.json_response({"size": len(body), "te": request.headers.get("Transfer-Encoding"),
                                  "cl": request.headers.get("Content-Length"), "tail": body[-3:].decode()})
    app = web.Application()
    app.router.add_post("/e", echo)
    server = await aiohttp_server(app)
    url = str(server.make_url("")).rstrip("/")
    pieces = [b"x" * 300_000, b"y" * 300_000, b"end"]

    def source():
        it = iter(pieces + [b""])

        async def read_chunk() -> bytes:
            return next(it)
        return read_chunk
    pool = UpstreamPool(timeout_s=5)
    for length, te, cl in ((None, "chunked", None), (600_003, None, "600003")):
        response = await pool.exchange(url, "POST", b"/e", b"", source(), length=length)
        assert response.complete
        assert json.loads(response.body()) == {"size": 600_003, "te": te, "cl": cl, "tail": "end"}
    pool.close()


async def test_an_early_answer_ends_the_upload_and_is_the_response() -> None:
    async def refuse_early(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 413 Payload Too Large\r\nContent-Length: 3\r\nConnection: close\r\n\r\nno!")
        await writer.drain()
        await asyncio.sleep(5)  # reads nothing more, keeps the connection open
    url, server, count = await raw_server(refuse_early)
    served = {"chunks": 0}

    async def endless() -> bytes:
        served["chunks"] += 1
        await asyncio.sleep(0)
        return b"z" * 1_000_000
    pool = UpstreamPool(timeout_s=5)
    response = await pool.exchange(url, "POST", b"/", b"", endless)
    assert (response.status, response.body()) == (413, b"no!")
    assert served["chunks"] < 50  # it stopped sending once the answer was in, not after 5 s of writes
    pool.close()
    server.close()


async def test_request_keeps_one_deadline_but_a_stream_waits_per_piece() -> None:
    async def trickle(reader, writer):
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 50\r\n\r\n")
        for _ in range(50):
            await asyncio.sleep(0.02)
            writer.write(b".")
            await writer.drain()
    url, server, _ = await raw_server(trickle)
    with pytest.raises(asyncio.TimeoutError):  # at least 1 s in all: past request()'s 0.8 s deadline
        await UpstreamPool(timeout_s=0.8).request(url, "GET", "/", [], b"")
    response = await UpstreamPool(timeout_s=0.8).exchange(url, "GET", b"/", b"")
    parts = []
    while chunk := await response.read():  # a byte every 0.02 s: never 0.8 s without one
        parts.append(chunk)
    assert b"".join(parts) == b"." * 50
    server.close()


# -- the response head's caps (issue 11 follow-up: a backend's endless headers) -----------------------------------
async def odd_heads(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Per request path: endless header lines, one endless value, endless 103s, N header fields, or a normal
    answer; the endless ones write until the client hangs up."""
    while True:
        try:
            req = await read_request(reader)
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        path = req.split(b" ")[1]
        try:
            if path == b"/endless-headers":
                writer.write(b"HTTP/1.1 200 OK\r\n")
                for i in range(10 ** 9):
                    writer.write(b"X-H%d: %s\r\n" % (i, b"a" * 1000))
                    await writer.drain()
            elif path == b"/endless-value":
                writer.write(b"HTTP/1.1 200 OK\r\nX-Big: ")
                while True:
                    writer.write(b"a" * 65536)
                    await writer.drain()
            elif path == b"/endless-interim":
                while True:
                    writer.write(b"HTTP/1.1 103 Early Hints\r\nLink: </a>; rel=preload\r\n\r\n")
                    await writer.drain()
            elif path.startswith(b"/fields/"):
                n = int(path.rsplit(b"/", 1)[1])
                writer.write(b"HTTP/1.1 200 OK\r\n" + b"".join(b"X-H%d: v\r\n" % i for i in range(n - 1))
                             + b"Content-Length: 2\r\n\r\nok")
            else:
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
        except ConnectionError:
            return


@pytest.mark.parametrize("path, words", [("/endless-headers", "over 65536 bytes"),
                                         ("/endless-value", "over 65536 bytes"),
                                         ("/endless-interim", "over 65536 bytes"),
                                         ("/fields/101", "over 100 fields")])
async def test_a_response_head_past_its_caps_is_an_error_and_the_next_answer_passes(path: str, words: str) -> None:
    url, server, count = await raw_server(odd_heads)
    pool = UpstreamPool(timeout_s=30)  # the default caps: 64 KiB, 100 fields
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(UpstreamError, match=f"response headers {words}"):
        await pool.request(url, "GET", path, [], b"")
    print(f"{path}: UpstreamError after {loop.time() - started:.3f} s")  # long before the 30 s timeout
    assert not pool._idle.get(url), "the connection of a broken head went back to the pool"
    assert (await pool.request(url, "GET", "/ok", [], b""))[::2] == (200, b"ok")
    status, headers, _ = await pool.request(url, "GET", "/fields/100", [], b"")
    assert status == 200 and len(headers) == 100
    pool.close()
    server.close()


async def test_the_byte_cap_counts_the_head_only_and_is_exact() -> None:
    """The cap is on the head (all of it fits: it passes, one byte more: it fails) even when the head and
    a body much larger than the cap arrive in one read."""
    head = b"HTTP/1.1 200 OK\r\nContent-Length: 20000\r\n\r\n"
    body = b"b" * 20000

    async def one_write(reader, writer):
        while True:
            try:
                await read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            writer.write(head + body)
            await writer.drain()
    url, server, _ = await raw_server(one_write)
    exact = UpstreamPool(timeout_s=5, max_header_bytes=len(head))
    assert (await exact.request(url, "GET", "/", [], b""))[::2] == (200, body)
    assert (await exact.request(url, "GET", "/", [], b""))[::2] == (200, body)  # again on the kept connection
    with pytest.raises(UpstreamError, match=f"response headers over {len(head) - 1} bytes"):
        await UpstreamPool(timeout_s=5, max_header_bytes=len(head) - 1).request(url, "GET", "/", [], b"")
    one_field = UpstreamPool(timeout_s=5, max_headers=1)  # Content-Length is the head's one field
    assert (await one_field.request(url, "GET", "/", [], b""))[::2] == (200, body)
    one_field.close()
    with pytest.raises(ValueError):
        UpstreamPool(max_headers=0)
    exact.close()
    server.close()
