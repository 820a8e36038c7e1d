"""Malformed HTTP, as raw bytes, against the three real processes; and strict JSON bodies (live/http.py).

Every framing case of issue 11 goes to a node, a registry and a balancer in front of the node. Each must
answer with the project's JSON error (right status, ``Connection: close``) and go on serving. A seeded
fuzz then sends a few hundred mutated requests: no ``5xx``, no hang, every error of the one shape.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
from typing import Iterator

import pytest
from aiohttp import web

from live.connections import GuardedAppRunner
from live.http import MAX_JSON_DEPTH, error_middleware, read_json, reject_unknown
from live.server_limits import ServerLimits
from tests.live.procs import Proc, wait_until

#: A server that neither answers nor closes within this long is hung.
SOCKET_TIMEOUT_S = 10.0
#: Header timeout of the processes under test: a mutated request whose head never ends is answered 408 soon.
HEADER_TIMEOUT_S = 1.0


@pytest.fixture(scope="module")
def processes() -> Iterator[dict[str, Proc]]:
    timeout = ("--header-timeout", str(HEADER_TIMEOUT_S))
    started: list[Proc] = []
    try:
        started.append(Proc("node", "--port", "0", "--id", "n1", *timeout))
        started.append(Proc("registry", "--port", "0", *timeout))
        started.append(Proc("balancer", "--port", "0", "--nodes", started[0].url, *timeout))
        wait_until(lambda: exchange(started[2].port, get("/health"))[0] == 200, 15,
                   "the balancer to reach its node")
        yield dict(zip(("node", "registry", "balancer"), started))
    finally:
        for proc in started:
            proc.stop()


def get(path: str, extra: bytes = b"") -> bytes:
    return f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode() + extra + b"\r\n"


def exchange(port: int, data: bytes) -> tuple[int, dict[str, str], bytes]:
    """Send ``data`` on a fresh connection and read one response: (status, lower-cased headers, body).

    A server that closes without answering gives status 0; one that neither answers nor closes
    within ``SOCKET_TIMEOUT_S`` fails the test (``socket.timeout``)."""
    with socket.create_connection(("127.0.0.1", port), timeout=SOCKET_TIMEOUT_S) as sock:
        try:
            sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # answered and closed before reading it all: the answer may still be there to read
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = sock.recv(65536)
                if not chunk:
                    return (0, {}, b"") if not buf else _fail(buf)
                buf += chunk
            head, _, body = buf.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
            length = 0 if data.startswith(b"HEAD ") else int(headers.get("content-length", "0"))
            while len(body) < length:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                body += chunk
        except ConnectionResetError:
            return (0, {}, b"") if not buf else _fail(buf)
        return int(lines[0].split()[1]), headers, body


def _fail(buf: bytes) -> tuple[int, dict[str, str], bytes]:
    raise AssertionError(f"the connection broke off mid-response: {buf[:300]!r}")


def assert_json_error(status: int, headers: dict[str, str], body: bytes, *, expected: int | None = None) -> dict:
    """``body`` is the project's error shape for ``status``; returns its ``error`` object."""
    if expected is not None:
        assert status == expected, (status, body[:300])
    assert headers.get("content-type", "").startswith("application/json"), (headers, body[:300])
    error = json.loads(body)["error"]
    assert error["status"] == status and isinstance(error["code"], str) and isinstance(error["message"], str)
    return error


HEAD = b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n"

#: name -> (raw request, status, code)
CASES: dict[str, tuple[bytes, int, str]] = {
    "header_line_over_8k": (HEAD + b"X-Big: " + b"a" * 9000 + b"\r\n\r\n", 431, "headers_too_large"),
    "request_line_over_8k": (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\nHost: x\r\n\r\n", 414, "uri_too_long"),
    "200_headers": (HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(200)) + b"\r\n", 431, "headers_too_large"),
    "101_header_lines": (HEAD + b"".join(b"X-H%d: v\r\n" % i for i in range(100)) + b"\r\n", 431,
                         "headers_too_large"),
    "bad_content_length": (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n", 400, "bad_content_length"),
    "negative_content_length": (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", 400,
                                "bad_content_length"),
    "duplicate_content_length": (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
                                 400, "bad_content_length"),
    "content_length_and_transfer_encoding": (
        b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400, "bad_framing"),
    "unknown_transfer_encoding": (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", 400,
                                  "bad_transfer_encoding"),
    "bad_chunk_size": (b"POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n", 400,
                       "bad_transfer_encoding"),
    "unknown_method": (b"FROB /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_method"),
    "invalid_method": (b"G=T /metrics HTTP/1.1\r\nHost: x\r\n\r\n", 400, "bad_method"),
    "bad_request_line": (b"GET\r\n\r\n", 400, "bad_request_line"),
    "unsupported_version": (b"GET /metrics HTTP/7.3\r\nHost: x\r\n\r\n", 505, "http_version_not_supported"),
    "no_host_in_http_1_1": (b"GET /metrics HTTP/1.1\r\n\r\n", 400, "bad_header"),
    "nul_in_header_value": (HEAD + b"X-A: a\x00b\r\n\r\n", 400, "bad_header"),
    "space_in_header_name": (HEAD + b"X A: b\r\n\r\n", 400, "bad_header"),
    "tls_client_hello": (b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)), 400, "not_http"),
    "binary_garbage": (bytes(random.Random(7).randrange(256) for _ in range(300)), 400, "bad_method"),
}


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("name", ["node", "registry", "balancer"])
def test_framing_error_is_json_and_the_process_serves_on(processes, name: str, case: str) -> None:
    proc = processes[name]
    data, expected, code = CASES[case]
    status, headers, body = exchange(proc.port, data)
    error = assert_json_error(status, headers, body, expected=expected)
    assert error["code"] == code
    assert headers.get("connection", "").lower() == "close"
    assert exchange(proc.port, get("/metrics"))[0] == 200


@pytest.mark.parametrize("name", ["node", "registry", "balancer"])
def test_up_to_the_header_limit_is_served(processes, name: str) -> None:
    lines = b"".join(b"X-H%d: v\r\n" % i for i in range(ServerLimits.max_headers - 1))  # and Host: 100 in all
    assert exchange(processes[name].port, get("/metrics", lines))[0] == 200
    line = b"X-Long: " + b"b" * (ServerLimits.max_line_bytes - len(b"X-Long") - 2) + b"\r\n"
    assert exchange(processes[name].port, get("/metrics", line))[0] == 200


@pytest.mark.parametrize("name", ["node", "registry", "balancer"])
def test_a_malformed_request_is_one_warning_line_not_a_traceback(processes, name: str) -> None:
    proc = processes[name]
    before = len(proc.lines)
    with socket.create_connection(("127.0.0.1", proc.port), timeout=SOCKET_TIMEOUT_S) as sock:
        peer = f"127.0.0.1:{sock.getsockname()[1]}"
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n")
        while sock.recv(65536):
            pass
    wait_until(lambda: any(peer in line for line in proc.lines[before:]), 10, "the log line")
    mentions = [line for line in proc.lines[before:] if peer in line]
    assert len(mentions) == 1 and " WARNING malformed request from " in mentions[0], mentions
    assert "bad_content_length" in mentions[0]
    assert not any("Traceback" in line or " ERROR " in line for line in proc.lines[before:])


# -- fuzz ---------------------------------------------------------------------------------------

BASES = [
    b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: fuzz\r\nAccept: */*\r\nX-Client-ID: c1\r\n",
    b"GET /health?x=1&y=%20 HTTP/1.1\r\nHost: a\r\nConnection: keep-alive\r\nCookie: a=b\r\n",
    b"HEAD /nodes HTTP/1.0\r\nHost: a\r\n",
    b"DELETE /nodes/x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer x\r\n",
]
BODY = b'{"id": "fuzz", "address": "http://127.0.0.1:1", "metadata": {"k": [1, 2.5, null]}}'
POST_HEAD = b"POST /register HTTP/1.1\r\nHost: a\r\nContent-Type: application/json\r\n"


def mutate(rng: random.Random, head: bytes) -> bytes:
    """``head`` with one to three random edits: bytes replaced, inserted or deleted, a line doubled, a CRLF
    made a bare LF, a long run, many header lines, or a well-formed header with odd value bytes."""
    data = bytearray(head)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(9)
        at = rng.randrange(len(data) + 1)
        if op == 0 and data:
            data[min(at, len(data) - 1)] = rng.randrange(256)
        elif op == 1:
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
        elif op == 2 and data:
            del data[at:at + rng.randint(1, 6)]
        elif op == 3:
            lines = bytes(data).split(b"\r\n")
            i = rng.randrange(len(lines))
            lines.insert(i, lines[i])
            data = bytearray(b"\r\n".join(lines))
        elif op == 4:
            data = bytearray(bytes(data).replace(b"\r\n", b"\n", 1))
        elif op == 5:
            data[at:at] = bytes([rng.choice(b"a/%:\t ")]) * rng.choice([100, 5000, 9000])
        elif op == 6:
            data[at:at] = b"".join(b"X-F%d: %d\r\n" % (i, i) for i in range(rng.choice([50, 99, 150])))
        else:  # a well-formed header line with any legal value bytes (obs-text included): mostly served
            value = bytes(rng.choice([*range(0x20, 0x7f), *range(0x80, 0x100)]) for _ in range(rng.randint(0, 20)))
            line = b"X-Fz%d: " % rng.randrange(100) + value + b"\r\n"
            end = bytes(data).find(b"\r\n") + 2
            data[end:end] = line if end >= 2 else b""
    return bytes(data)


def fuzz_case(rng: random.Random) -> bytes:
    """A mutated request whose head always ends (so the server owes an answer) and whose body, if any,
    has exactly the length its untouched Content-Length line says (so the server never waits for more)."""
    if rng.random() < 0.25:
        return mutate(rng, POST_HEAD) + b"Content-Length: %d\r\n\r\n" % len(BODY) + BODY
    return mutate(rng, rng.choice(BASES)) + b"\r\n\r\n"


@pytest.mark.parametrize("name", ["node", "registry", "balancer"])
def test_fuzzed_requests_get_no_5xx_and_no_hang(processes, name: str) -> None:
    proc = processes[name]
    rng = random.Random(f"framing-fuzz-{name}")
    answered: dict[int, int] = {}
    for i in range(120):
        data = fuzz_case(rng)
        status, headers, body = exchange(proc.port, data)
        answered[status] = answered.get(status, 0) + 1
        assert status < 500, f"case {i}: {data[:200]!r} -> {status} {body[:300]!r}"
        if status >= 400 and not data.startswith(b"HEAD"):
            assert_json_error(status, headers, body)
    assert proc.popen.poll() is None
    assert exchange(proc.port, get("/metrics"))[0] == 200
    assert sum(n for status, n in answered.items() if status >= 400) > 0, answered  # the fuzz did reach errors


# -- strict JSON bodies (read_json, reject_unknown) ----------------------------------------------

async def echo(request: web.Request) -> web.Response:
    data = await read_json(request)
    if "strict" in request.query:
        reject_unknown(data, {"id", "address"})
    return web.json_response(data)


@pytest.fixture
async def client(aiohttp_client):
    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/echo", echo)
    return await aiohttp_client(app)


def nested(levels: int) -> str:
    return '{"a": ' * (levels - 1) + "[]" + "}" * (levels - 1)


@pytest.mark.parametrize("body, words", [
    (nested(3000), "nested too deeply"),
    (nested(MAX_JSON_DEPTH + 1), "nested too deeply"),
    ('{"n": ' + "7" * 5000 + "}", "digits"),
    ('{"x": NaN}', "NaN"),
    ('{"x": Infinity}', "Infinity"),
    ('{"x": [-Infinity]}', "-Infinity"),
    ('{"x": 1e999}', "out of range"),
    ('{"x": -2.5e400}', "out of range"),
    ("[1, 2]", "JSON object"),
    ('{"x": ', "not valid JSON"),
    (b'{"x": "\xff"}', "not valid JSON"),
    ('{"x": 1, "x": 2}', "'x' twice"),
    ('{"m": {"k": 1, "k": 1}}', "'k' twice"),
], ids=["3000_levels", "one_level_too_deep", "5000_digits", "nan", "infinity", "minus_infinity", "1e999",
        "minus_2.5e400", "array", "truncated", "not_utf8", "key_twice", "nested_key_twice"])
async def test_read_json_refuses_what_json_does_not_allow(client, body: str | bytes, words: str) -> None:
    resp = await client.post("/echo", data=body, headers={"Content-Type": "application/json"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "bad_json" and words in error["message"], error


async def test_read_json_takes_the_deepest_allowed_nesting_and_big_finite_numbers(client) -> None:
    body = '{"deep": ' + nested(MAX_JSON_DEPTH - 1) + ', "big": 1e308, "int": ' + "9" * 4000 + "}"
    resp = await client.post("/echo", data=body)
    assert resp.status == 200
    assert (await resp.json())["big"] == 1e308


async def test_reject_unknown_names_the_field_and_the_known_ones(client) -> None:
    resp = await client.post("/echo?strict=1", json={"id": "a", "adress": "http://x"})
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "unknown_field" and error["field"] == "adress"
    assert error["allowed"] == ["address", "id"] and "'adress'" in error["message"]
    assert (await client.post("/echo?strict=1", json={"id": "a", "address": "http://x"})).status == 200


async def test_a_body_broken_mid_chunk_is_400_json() -> None:
    reading = asyncio.Event()

    async def slow_echo(request: web.Request) -> web.Response:
        reading.set()
        return await echo(request)

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/echo", slow_echo)
    runner = GuardedAppRunner(app, limits=ServerLimits(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", runner.addresses[0][1])
        writer.write(b"POST /echo HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n{\"a\":")
        await asyncio.wait_for(reading.wait(), SOCKET_TIMEOUT_S)
        writer.write(b"\r\nzz\r\n")  # the handler is reading the body: the chunk breaks it
        raw = await asyncio.wait_for(reader.read(), SOCKET_TIMEOUT_S)
        writer.close()
        await writer.wait_closed()
    finally:
        await runner.cleanup()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400") and b"Connection: close" in head, raw[:300]
    error = json.loads(body)["error"]
    assert error["code"] == "bad_body" and "chunk" in error["message"], error


# -- the guard's answers, in process ----------------------------------------------------------

async def test_in_process_malformed_requests_log_one_warning_each(caplog) -> None:
    app = web.Application()
    runner = GuardedAppRunner(app, limits=ServerLimits(), access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    try:
        with caplog.at_level(logging.DEBUG):
            for data, expected, _ in (CASES["bad_content_length"], CASES["200_headers"], CASES["unknown_method"]):
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(data)
                raw = await asyncio.wait_for(reader.read(), SOCKET_TIMEOUT_S)
                writer.close()
                await writer.wait_closed()
                assert raw.split()[1] == str(expected).encode()
    finally:
        await runner.cleanup()
    mine = [r for r in caplog.records if r.name.startswith(("aiohttp", "testbed"))]
    assert [r.levelname for r in mine] == ["WARNING"] * 3, [(r.name, r.levelname, r.getMessage()) for r in mine]
    assert all(r.exc_info is None and "malformed request from 127.0.0.1:" in r.getMessage() for r in mine)


@pytest.mark.parametrize("data, expected, code", [
    (b"CONNECT host:22 HTTP/1.1\r\nHost: host:22\r\nConnection: close\r\n\r\n", 404, "not_found"),
    (b"OPTIONS * HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", 404, "not_found"),
    (b"GET /metrics\r\n\r\n", 505, "http_version_not_supported"),
], ids=["connect", "options_star", "http_0_9"])
@pytest.mark.parametrize("name", ["node", "registry", "balancer"])
def test_targets_no_route_matches_and_http_0_9_get_json_too(processes, name: str, data: bytes, expected: int,
                                                            code: str) -> None:
    """A target that is not a path matches no route, not even the catch-alls, and aiohttp answered it with a
    text/plain 404; an HTTP/0.9 request line was served (the balancer proxied it)."""
    proc = processes[name]
    status, headers, body = exchange(proc.port, data)
    assert assert_json_error(status, headers, body, expected=expected)["code"] == code
    assert exchange(proc.port, get("/metrics"))[0] == 200
