"""The balancer's upstream side: pooled keep-alive HTTP/1.1 connections to the backends.

Theory of operation
-------------------
A proxy's cost per request is mostly the HTTP client it uses to reach the
backend. aiohttp's client is general (cookies, redirects, auth, tracing,
decompression) and costs more per request than everything else the balancer
does. A balancer needs none of that: it writes one request on a connection it
already has open, reads one response, and puts the connection back. This
module does exactly that, with an ``asyncio.Protocol`` per connection and
``httptools`` (the C parser uvicorn uses) to read responses, chunked or not.

* One request at a time per connection; idle connections wait in a per-backend
  pool (at most ``max_idle``) and are reused oldest-first.
* A connection that fails to open raises :class:`ConnectFailed` (nothing was
  sent, so the caller may retry elsewhere). A *reused* connection that dies
  before the first response byte (the backend closed it while idle) is retried
  once on a fresh connection, as every keep-alive proxy does.
* ``timeout_s`` bounds the whole exchange; a timeout closes that connection.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, cast
from urllib.parse import urlsplit

import httptools

__all__ = ["ConnectFailed", "UpstreamError", "UpstreamPool"]


class UpstreamError(Exception):
    """The backend broke the exchange (reset, garbage, early close)."""


class ConnectFailed(UpstreamError):
    """No connection could be opened: nothing was sent."""


class _Connection(asyncio.Protocol):
    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[Any] | None = None
        self.received_any = False
        self._reset(head=False)

    def _reset(self, head: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head = head
        self.headers: list[tuple[str, str]] = []
        self.body: list[bytes] = []
        self.status = 0

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types the argument as BaseTransport; a TCP connection's is a Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from the backend: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail(UpstreamError(f"the backend closed the connection{f': {exc}' if exc else ''}"))

    # -- httptools callbacks -----------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.decode("latin-1"), value.decode("latin-1")))

    def on_headers_complete(self) -> None:
        self.status = self.parser.get_status_code()
        if self.head or self.status in (204, 304) or 100 <= self.status < 200:
            self._done(keep_alive=False)  # no body follows; do not trust the parser with the rest

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        self._done(keep_alive=self.parser.should_keep_alive())

    # -- the exchange ------------------------------------------------------
    def _done(self, keep_alive: bool) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result((self.status, self.headers, b"".join(self.body), keep_alive))

    def _fail(self, exc: Exception) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc)

    def send(self, payload: bytes, head: bool) -> asyncio.Future[Any]:
        assert self.transport is not None
        self._reset(head)
        self.received_any = False
        self.waiter = self.loop.create_future()
        self.transport.write(payload)
        return self.waiter

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamPool:
    """Keep-alive connections to any number of ``http://host:port`` backends."""

    def __init__(self, *, timeout_s: float = 30.0, max_idle: int = 64) -> None:
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self._idle: dict[str, deque[_Connection]] = {}
        self._addr: dict[str, tuple[str, int, bytes]] = {}

    def _address(self, base_url: str) -> tuple[str, int, bytes]:
        addr = self._addr.get(base_url)
        if addr is None:
            parts = urlsplit(base_url)
            if parts.scheme != "http" or not parts.hostname:
                raise ConnectFailed(f"{base_url}: only http:// backends are supported")
            port = parts.port or 80
            addr = self._addr[base_url] = (parts.hostname, port, f"{parts.hostname}:{port}".encode())
        return addr

    async def _open(self, base_url: str) -> _Connection:
        host, port, _ = self._address(base_url)
        loop = asyncio.get_running_loop()
        try:
            _, conn = await asyncio.wait_for(loop.create_connection(lambda: _Connection(loop), host, port),
                                             self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {base_url}: {exc or type(exc).__name__}") from None
        return conn

    async def request(self, base_url: str, method: str, path_qs: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request; return (status, headers, body). Raises ConnectFailed, UpstreamError, TimeoutError."""
        _, _, host_header = self._address(base_url)
        lines = [f"{method} {path_qs} HTTP/1.1\r\n".encode("latin-1"), b"Host: ", host_header, b"\r\n"]
        for name, value in headers:
            lines.append(f"{name}: {value}\r\n".encode("latin-1"))
        if body or method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            lines.append(b"Content-Length: %d\r\n" % len(body))
        lines.append(b"\r\n")
        payload = b"".join(lines) + body
        idle = self._idle.setdefault(base_url, deque())
        head = method == "HEAD"
        while idle:
            conn = idle.popleft()
            if conn.closed:
                continue
            try:
                return await self._exchange(base_url, conn, payload, head)
            except UpstreamError:
                if conn.received_any:
                    raise
                # A stale keep-alive connection, closed by the backend while idle: try a fresh one.
        return await self._exchange(base_url, await self._open(base_url), payload, head)

    async def _exchange(self, base_url: str, conn: _Connection, payload: bytes,
                        head: bool) -> tuple[int, list[tuple[str, str]], bytes]:
        try:
            status, headers, body, keep_alive = await asyncio.wait_for(conn.send(payload, head), self.timeout_s)
        except BaseException:
            conn.close()
            raise
        idle = self._idle[base_url]
        if keep_alive and not conn.closed and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()
        return status, headers, body

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.popleft().close()
