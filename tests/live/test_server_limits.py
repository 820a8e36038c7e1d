"""Slow and numerous clients against the connection guards (live/connections.py), on raw sockets.

Most tests run an app in this process behind ``GuardedAppRunner`` on a free loopback port, with small
limits, and read the guard's counters to know when the server has seen what the test did. The last ones
start the real ``testbed`` processes with the server options and check the same from outside.
"""

from __future__ import annotations

import asyncio
import json
import socket
from typing import AsyncIterator, Awaitable, Callable

import pytest
from aiohttp import web

from live.connections import GuardedAppRunner, GuardedServer
from live.server_limits import ServerLimits, default_max_connections
from tests.live.polling import until
from tests.live.procs import Proc, wait_until

#: Bounds on waiting for something that must happen (a hang fails the test instead of blocking it).
DEADLINE_S = 15.0

GET_OK = b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\n"
PARTIAL = b"GET /ok HTTP/1.1\r\nHost: x\r\nX-Slow: "


class Server:
    """An app behind the guards: ``GET /ok`` answers at once, ``GET /hold`` waits for ``release``."""

    def __init__(self, runner: GuardedAppRunner, port: int, release: asyncio.Event, holding: list[int]) -> None:
        self.runner, self.port, self.release, self.holding = runner, port, release, holding

    @property
    def guard(self) -> GuardedServer:
        server = self.runner.server
        assert isinstance(server, GuardedServer)
        return server

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


async def start(**limits: float) -> Server:
    release = asyncio.Event()
    holding = [0]

    async def ok(request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def hold(request: web.Request) -> web.Response:
        holding[0] += 1
        await release.wait()
        return web.json_response({"held": True})

    app = web.Application()
    app.router.add_get("/ok", ok)
    app.router.add_get("/hold", hold)
    runner = GuardedAppRunner(app, limits=ServerLimits(**limits), access_log=None)  # type: ignore[arg-type]
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return Server(runner, runner.addresses[0][1], release, holding)


@pytest.fixture
async def servers() -> AsyncIterator:
    started: list[Server] = []

    async def make(**limits: float) -> Server:
        server = await start(**limits)
        started.append(server)
        return server

    yield make
    for server in started:
        server.release.set()
        await server.runner.cleanup()


async def read_to_eof(reader: asyncio.StreamReader) -> bytes:
    """Everything until the server closes; fails the test if it never does."""
    return await asyncio.wait_for(reader.read(), DEADLINE_S)


async def read_response(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """One response with a Content-Length body, leaving the connection open."""
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), DEADLINE_S)
    return _parse_head(head) + (await asyncio.wait_for(reader.readexactly(_length(head)), DEADLINE_S),)


def _parse_head(head: bytes) -> tuple[int, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return int(lines[0].split()[1]), headers


def _length(head: bytes) -> int:
    return int(_parse_head(head)[1]["content-length"])


def parse(raw: bytes) -> tuple[int, dict[str, str], dict]:
    """A whole response read to EOF: status, lower-cased headers, JSON body."""
    head, _, body = raw.partition(b"\r\n\r\n")
    status, headers = _parse_head(head + b"\r\n")
    return status, headers, json.loads(body)


async def close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except OSError:
        pass  # the server reset it first


# -- header timeout ---------------------------------------------------------------------------

async def test_partial_headers_get_408_json_and_are_closed(servers) -> None:
    server = await servers(header_timeout_s=0.5)
    conns = [await server.connect() for _ in range(10)]
    for _, writer in conns:
        writer.write(PARTIAL)
    answers = await asyncio.gather(*(read_to_eof(reader) for reader, _ in conns))
    for raw in answers:
        status, headers, body = parse(raw)
        assert status == 408 and headers["connection"] == "close"
        assert headers["content-type"].startswith("application/json")
        assert body["error"]["status"] == 408 and body["error"]["code"] == "header_timeout"
    assert server.guard.header_timeouts == 10
    for _, writer in conns:
        await close(writer)


async def test_a_connection_that_sends_nothing_is_closed_without_an_answer(servers) -> None:
    server = await servers(header_timeout_s=0.3)
    reader, writer = await server.connect()
    assert await read_to_eof(reader) == b""
    assert server.guard.header_timeouts == 1
    await close(writer)


async def test_slowloris_one_byte_every_200_ms_is_cut_off_before_its_headers_end(servers) -> None:
    server = await servers(header_timeout_s=0.5)
    reader, writer = await server.connect()
    answer = asyncio.ensure_future(read_to_eof(reader))
    sent = 0
    for byte in GET_OK:
        if answer.done():
            break
        try:
            writer.write(bytes([byte]))
            await writer.drain()
        except ConnectionError:
            break
        sent += 1
        await asyncio.wait({answer}, timeout=0.2)  # the client's pace, not a wait for the server
    assert sent < len(GET_OK), "the whole request went out: the server never cut the trickle off"
    status, _, body = parse(await answer)
    assert status == 408 and body["error"]["code"] == "header_timeout"
    await close(writer)


async def test_the_next_request_on_a_kept_alive_connection_has_the_header_timeout_too(servers) -> None:
    server = await servers(header_timeout_s=0.5, keepalive_timeout_s=60)
    reader, writer = await server.connect()
    writer.write(GET_OK)
    status, headers, _ = await read_response(reader)
    assert status == 200 and headers.get("connection", "keep-alive").lower() != "close"
    writer.write(PARTIAL)  # a second request begins and stalls: the keep-alive timeout no longer applies
    status, _, body = parse(await read_to_eof(reader))
    assert status == 408 and body["error"]["code"] == "header_timeout"
    await close(writer)


async def test_an_idle_kept_alive_connection_is_closed_after_the_keepalive_timeout(servers) -> None:
    server = await servers(header_timeout_s=60, keepalive_timeout_s=0.3)
    reader, writer = await server.connect()
    for _ in range(3):  # requests on one connection keep it open
        writer.write(GET_OK)
        assert (await read_response(reader))[0] == 200
    assert await read_to_eof(reader) == b""  # then idle: closed without a word
    await close(writer)


async def test_pipelined_requests_in_one_packet_are_all_answered(servers) -> None:
    server = await servers(header_timeout_s=5)
    reader, writer = await server.connect()
    writer.write(GET_OK * 5)
    assert [(await read_response(reader))[0] for _ in range(5)] == [200] * 5
    assert server.guard.header_timeouts == 0
    await close(writer)


# -- connection cap ---------------------------------------------------------------------------

async def test_past_the_cap_a_new_client_gets_503_json_then_is_served_once_some_close(servers) -> None:
    server = await servers(max_connections=20, header_timeout_s=60)
    holders = [await server.connect() for _ in range(20)]
    for _, writer in holders:
        writer.write(b"GET /hold HTTP/1.1\r\nHost: x\r\n\r\n")
    await until(holds(lambda: server.holding[0] == 20), what="20 requests held", timeout_s=DEADLINE_S)
    assert server.guard.open_connections == 20

    for _ in range(3):
        reader, writer = await server.connect()
        writer.write(GET_OK)
        status, headers, body = parse(await read_to_eof(reader))
        assert status == 503 and headers["connection"] == "close" and headers["retry-after"] == "1"
        assert body["error"]["code"] == "too_many_connections" and body["error"]["status"] == 503
        await close(writer)
    assert server.guard.refused == 3 and server.guard.open_connections == 20
    assert server.guard.reclaimed == 0  # a connection with a request in progress is never taken

    server.release.set()
    for reader, writer in holders:
        assert (await read_response(reader))[0] == 200
        await close(writer)
    await until(holds(lambda: server.guard.open_connections == 0), what="the holders to close", timeout_s=DEADLINE_S)
    reader, writer = await server.connect()
    writer.write(GET_OK)
    assert (await read_response(reader))[0] == 200
    await close(writer)


async def test_slow_clients_filling_the_cap_time_out_and_new_clients_are_served(servers) -> None:
    server = await servers(max_connections=20, header_timeout_s=2)
    slow = [await server.connect() for _ in range(20)]
    for _, writer in slow:
        writer.write(PARTIAL)
    await until(holds(lambda: server.guard.open_connections == 20), what="20 open", timeout_s=DEADLINE_S)
    reader, writer = await server.connect()
    writer.write(GET_OK)
    assert parse(await read_to_eof(reader))[0] == 503
    assert server.guard.reclaimed == 0  # nor one whose request has begun
    await close(writer)
    for reader, writer in slow:
        assert parse(await read_to_eof(reader))[0] == 408
        await close(writer)
    await until(holds(lambda: server.guard.open_connections == 0), what="the slow ones to go", timeout_s=DEADLINE_S)
    reader, writer = await server.connect()
    writer.write(GET_OK)
    assert (await read_response(reader))[0] == 200
    await close(writer)


async def test_at_the_cap_the_longest_idle_keepalive_connection_makes_room(servers) -> None:
    server = await servers(max_connections=3, header_timeout_s=60, keepalive_timeout_s=60)
    idle = []
    for _ in range(3):
        reader, writer = await server.connect()
        writer.write(GET_OK)
        assert (await read_response(reader))[0] == 200
        idle.append((reader, writer))
    reader, writer = await server.connect()  # a 4th: the first idle one goes, this one is served
    writer.write(GET_OK)
    assert (await read_response(reader))[0] == 200
    assert await read_to_eof(idle[0][0]) == b""
    assert server.guard.reclaimed == 1 and server.guard.refused == 0
    idle[1][1].write(GET_OK)  # the others were left alone
    assert (await read_response(idle[1][0]))[0] == 200
    for _, w in [*idle, (reader, writer)]:
        await close(w)


async def test_a_refused_client_that_sends_nothing_still_gets_its_503(servers) -> None:
    server = await servers(max_connections=1, header_timeout_s=60)
    _, holder = await server.connect()
    holder.write(PARTIAL)
    await until(holds(lambda: server.guard.open_connections == 1), what="1 open", timeout_s=DEADLINE_S)
    reader, writer = await server.connect()
    assert parse(await read_to_eof(reader))[0] == 503  # after REFUSAL_WAIT_S with no request
    await close(writer)
    await close(holder)


def holds(predicate: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    """``predicate`` as the async check :func:`until` polls."""
    async def check() -> bool:
        return predicate()
    return check


# -- limits and the command line --------------------------------------------------------------

def test_limits_are_validated_with_the_field_named() -> None:
    for bad in ({"header_timeout_s": 0}, {"keepalive_timeout_s": float("inf")}, {"max_connections": 0},
                {"max_headers": True}, {"max_line_bytes": 10}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            ServerLimits(**bad)  # type: ignore[arg-type]


def test_default_cap_leaves_room_for_two_descriptors_per_connection() -> None:
    assert default_max_connections(20_000) == 9_872
    assert default_max_connections(1_024) == 384
    assert default_max_connections(100) == 1
    assert 1 <= default_max_connections() < 1 << 20


def _silent_connections(port: int, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S)
        s.sendall(PARTIAL)
        socks.append(s)
    return socks


def _exchange(port: int, path: str) -> bytes:
    """One request on a fresh connection (``Connection: close``), the answer read to EOF."""
    with socket.create_connection(("127.0.0.1", port), timeout=DEADLINE_S) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
        return b"".join(chunks)


@pytest.mark.parametrize("command", [("node", "--id", "n1"), ("registry",), ("balancer", "--nodes", "1")],
                         ids=lambda c: c[0])
def test_each_process_takes_the_server_options(command) -> None:
    proc = Proc(*command, "--port", "0", "--max-connections", "3", "--header-timeout", "3")
    socks: list[socket.socket] = []
    try:
        socks = _silent_connections(proc.port, 3)
        status, headers, body = parse(_exchange(proc.port, "/metrics"))
        assert status == 503 and body["error"]["code"] == "too_many_connections"
        for s in socks:  # the header timeout closes them with a 408
            s.settimeout(DEADLINE_S)
            assert parse(b"".join(iter(lambda: s.recv(65536), b"")))[0] == 408
        wait_until(lambda: _exchange(proc.port, "/metrics")
                   .startswith(b"HTTP/1.1 200"), DEADLINE_S, "the process to serve again")
    finally:
        for s in socks:
            s.close()
        proc.stop()
    assert "connection limit reached" in proc.output() and "incomplete after 3 s" in proc.output()


def test_a_server_raises_its_soft_open_file_limit_to_the_hard_one_in_a_child() -> None:
    """A soft limit of 1,024 under a higher hard limit (a common default) would cap a server at 384
    connections; serve() raises the soft limit first, within the hard one (checked in a child process, so the
    test's own limits stay as they are)."""
    import resource
    import subprocess
    import sys

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 1024:
        pytest.skip("the hard open-file limit leaves nothing to raise")
    code = ("import resource; resource.setrlimit(resource.RLIMIT_NOFILE, (512, resource.getrlimit("
            "resource.RLIMIT_NOFILE)[1])); from live.server_limits import raise_open_file_limit, "
            "default_max_connections; print(raise_open_file_limit(), default_max_connections())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    raised, cap = int(out[0]), int(out[1])
    expected = 65_536 if hard == resource.RLIM_INFINITY else min(hard, 65_536)
    assert raised == expected
    assert cap == (expected - 256) // 2


@pytest.mark.parametrize("command,path", [(("registry",), "/register"),
                                          (("node", "--id", "n1", "--faults"), "/admin/faults")],
                         ids=["registry", "node"])
def test_a_body_sent_a_byte_at_a_time_gets_408_and_frees_its_connection(command, path) -> None:
    """The attack that held a registry: connections that announce a 100 KB JSON body and send one byte, at
    the connection cap. Each gets `408 body_timeout` once `--body-timeout` has passed, its connection is
    closed, and the process serves new clients again (before the fix they were held as long as the client
    liked, and every new client got 503)."""
    proc = Proc(*command, "--port", "0", "--max-connections", "3", "--body-timeout", "0.5")
    socks: list[socket.socket] = []
    try:
        for _ in range(3):
            s = socket.create_connection(("127.0.0.1", proc.port), timeout=DEADLINE_S)
            s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                      "Content-Length: 100000\r\n\r\n{".encode())
            socks.append(s)
        for s in socks:
            status, _, body = parse(b"".join(iter(lambda: s.recv(65536), b"")))  # read to EOF: it was closed
            assert status == 408 and body["error"]["code"] == "body_timeout", body
        wait_until(lambda: _exchange(proc.port, "/health").startswith(b"HTTP/1.1 200"), DEADLINE_S,
                   "the process to serve again")
    finally:
        for s in socks:
            s.close()
        proc.stop()
