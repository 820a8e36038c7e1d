"""The balancer's upstream side: pooled keep-alive HTTP/1.1 connections to the backends, bodies streamed.

Theory of operation
-------------------
A proxy's cost per request is mostly the HTTP client it uses to reach the
backend. aiohttp's client is general (cookies, redirects, auth, tracing,
decompression) and costs more per request than everything else the balancer
does. A balancer needs none of that: it writes one request on a connection it
already has open, reads one response, and puts the connection back. This
module does exactly that, with an ``asyncio.Protocol`` per connection and
``httptools`` (the C parser uvicorn uses) to read responses, chunked or not.

* One exchange at a time per connection; idle connections wait in a
  per-backend pool (at most ``max_idle``) and are reused oldest-first.
* :meth:`UpstreamPool.exchange` returns as soon as the final response's
  headers are in (:class:`UpstreamResponse`). Interim ``1xx`` responses
  (``100 Continue``, ``103 Early Hints``, sent asked or not) are skipped, never
  taken for the answer (RFC 9110 15.2); ``101`` is an error, the balancer
  relays no protocol switch. Small responses are usually complete by then (one
  read holds them): :attr:`UpstreamResponse.complete` and
  :meth:`~UpstreamResponse.body` are the fast path. Larger ones are read with
  :meth:`~UpstreamResponse.read` while they arrive: the connection buffers at
  most ``_HIGH_WATER_BYTES`` (plus one socket read) and stops reading the
  socket past it (``pause_reading``) until the caller has taken the data, so a
  slow client slows the backend down instead of filling the balancer's memory.
* A request body is either bytes (written with the head in one write) or a
  ``read_chunk`` coroutine function the pool calls until it returns ``b""``;
  such a body goes out with ``Content-Length`` when the length is known, else
  chunked, respecting the socket's flow control (``pause_writing``). A backend
  that answers before it has read the whole body (an early ``413``) ends the
  upload: its answer is what counts, and that connection is not reused.
* A connection that fails to open raises :class:`ConnectFailed` (nothing was
  sent, so the caller may retry elsewhere). A *reused* connection that dies
  before the first response byte (the backend closed it while idle) is retried
  on a fresh connection, as every keep-alive proxy does, but only for an
  idempotent method (GET, HEAD, OPTIONS, TRACE, PUT, DELETE): the request may
  have reached the backend before the close, and RFC 9110 9.2.2 allows an
  automatic retry only where doing it twice is the same as doing it once. A
  POST (or PATCH, ...) gets the :class:`UpstreamError` instead (the balancer
  answers 502). A streamed body cannot be replayed, so it always goes on a
  fresh connection.
* Time: ``timeout_s`` bounds each wait on the backend: to connect, for the
  response headers once the request is sent, for room to write more of the
  body, and for each next piece of the response body (nginx's
  ``proxy_read_timeout``: between two reads, not the whole transfer, so a
  500 MB body is not cut at 30 s). A wait that times out raises
  ``asyncio.TimeoutError`` and closes that connection. :meth:`UpstreamPool.request`
  (the buffered call the load generator and the runner use) keeps one deadline
  for the whole exchange instead.
* Size: a response head is capped, as Envoy caps it (``max_response_headers_kb``
  60, ``max_headers_count`` 100): at most ``max_header_bytes`` bytes from the
  request's send until the final response's headers are complete (interim
  ``1xx`` heads included) and at most ``max_headers`` header fields in one
  head. The bytes are counted as they are fed to the parser, not as headers
  come out of it: httptools holds an unfinished header value in memory until
  its line ends, so an endless value would never reach a callback. Past
  either cap the exchange fails with :class:`UpstreamError` ("response
  headers over N bytes", "... over N fields") and the connection is closed:
  a backend sending endless headers costs the balancer at most the cap.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Any, Awaitable, Callable, Union, cast
from urllib.parse import urlsplit

import httptools

from core.balancer_state import IDEMPOTENT

__all__ = ["MAX_RESPONSE_HEADERS", "MAX_RESPONSE_HEADER_BYTES", "ConnectFailed", "UpstreamError", "UpstreamPool",
           "UpstreamResponse"]

#: Response bytes a connection holds for a caller that has not taken them yet before it stops reading.
_HIGH_WATER_BYTES = 256 * 1024
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "DELETE", "OPTIONS"})
#: The defaults of the response-head caps (Envoy: ``max_response_headers_kb`` 60, ``max_headers_count`` 100).
MAX_RESPONSE_HEADER_BYTES = 64 * 1024
MAX_RESPONSE_HEADERS = 100

#: A request body: the whole of it, or a coroutine function giving the next piece (``b""`` at the end).
Body = Union[bytes, Callable[[], Awaitable[bytes]]]


class UpstreamError(Exception):
    """The backend broke the exchange (reset, garbage, early close)."""


class ConnectFailed(UpstreamError):
    """No connection could be opened: nothing was sent."""


class _TooManyHeaders(Exception):
    """Raised from a parser callback to stop the parser; the exchange's error is already set."""


class _Connection(asyncio.Protocol):
    """One connection to a backend and the state of its current exchange.

    Every change a caller may be waiting for (final headers, body data, the end,
    an error, room to write) wakes ``waiter``; the caller looks at the state."""

    def __init__(self, loop: asyncio.AbstractEventLoop, max_header_bytes: int = MAX_RESPONSE_HEADER_BYTES,
                 max_headers: int = MAX_RESPONSE_HEADERS) -> None:
        self.loop = loop
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.waiter: asyncio.Future[None] | None = None
        self.reading_paused = False
        self.writing_paused = False
        self.reusable = True  # False once the exchange left the connection in an unknown state
        self._reset(head=False)

    def _reset(self, head: bool) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.head = head
        self.headers: list[tuple[str, str]] = []
        self.chunks: deque[bytes] = deque()
        self.buffered = 0
        self.status = 0
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.interim = False
        self.error: Exception | None = None
        self.received_any = False
        self.head_bytes = 0  # fed to the parser before the final headers were complete

    # -- asyncio.Protocol --------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio types the argument as BaseTransport; a TCP connection's is a Transport.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        self.received_any = True
        if self.error is not None:
            return  # the exchange is over: do not parse what follows
        try:
            if self.headers_done:
                self.parser.feed_data(data)
                return
            room = self.max_header_bytes - self.head_bytes
            if len(data) <= room:
                self.head_bytes += len(data)
                self.parser.feed_data(data)
                return
            # The head may end within the room left: feed that much, and the rest only if it did.
            self.head_bytes += room
            self.parser.feed_data(data[:room])
            if not self.headers_done:
                self._fail(UpstreamError(f"response headers over {self.max_header_bytes} bytes"))
                self.close()
                return
            self.parser.feed_data(data[room:])
        except httptools.HttpParserError as exc:
            self._fail(UpstreamError(f"bad response from the backend: {exc}"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.writing_paused = False
        if self.headers_done and not self.complete and not self._framed():
            # Neither Content-Length nor chunked: the body is whatever came before the close (RFC 9112 6.3).
            self.complete = True
            self._wake()
        self._fail(UpstreamError(f"the backend closed the connection{f': {exc}' if exc else ''}"))

    def pause_writing(self) -> None:
        self.writing_paused = True

    def resume_writing(self) -> None:
        self.writing_paused = False
        self._wake()

    # -- httptools callbacks -----------------------------------------------
    def on_message_begin(self) -> None:
        if self.complete:
            self.reusable = False  # more than one response to one request: do not trust this connection
        else:
            self.headers = []  # the final response after an interim one

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.complete:
            return
        if len(self.headers) >= self.max_headers:
            self._fail(UpstreamError(f"response headers over {self.max_headers} fields"))
            raise _TooManyHeaders  # stops the parser (data_received closes the connection)
        # Header values are relayed through aiohttp, which writes str as UTF-8: this is the inverse.
        self.headers.append((name.decode("latin-1"), value.decode("utf-8", "surrogateescape")))

    def on_headers_complete(self) -> None:
        if self.complete:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200:
            if status == 101:
                self._fail(UpstreamError("the backend switched protocols (101), which the balancer does not relay"))
                self.close()
            else:
                self.interim = True  # 100 Continue, 103 Early Hints: the final response follows
            return
        self.status = status
        self.headers_done = True
        if self.head or status in (204, 304):
            self.complete = True  # no body follows; do not trust the parser with the rest
            self.reusable = False
        self._wake()

    def on_body(self, body: bytes) -> None:
        if self.complete:
            return
        self.chunks.append(body)
        self.buffered += len(body)
        if self.buffered > _HIGH_WATER_BYTES and not self.reading_paused and self.transport is not None:
            self.reading_paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        if self.interim:
            self.interim = False
            return
        if self.complete:
            return
        self.complete = True
        self.keep_alive = self.parser.should_keep_alive()
        self._wake()

    # -- the exchange ------------------------------------------------------
    def _framed(self) -> bool:
        return any(name.lower() in ("content-length", "transfer-encoding") for name, _ in self.headers)

    def _wake(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc
        self._wake()

    def _timed_out(self) -> None:
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(asyncio.TimeoutError())

    async def wait(self, deadline: float) -> None:
        """Until something changes (see the class docstring); TimeoutError at ``deadline`` (loop time)."""
        self.waiter = self.loop.create_future()
        timer = self.loop.call_at(deadline, self._timed_out)
        try:
            await self.waiter
        finally:
            timer.cancel()
            self.waiter = None

    def start(self, payload: bytes, head: bool) -> None:
        assert self.transport is not None
        self._reset(head)
        self.transport.write(payload)

    def write(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)

    def take(self) -> bytes:
        """Everything the backend sent since the last take; reading goes on if it had stopped."""
        chunks = self.chunks
        data = chunks.popleft() if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        if self.reading_paused and self.transport is not None and not self.closed:
            self.reading_paused = False
            self.transport.resume_reading()
        return data

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class UpstreamResponse:
    """A backend's final response: ``status`` and ``headers`` now, the body as it arrives.

    Take the body with :meth:`body` when :attr:`complete` (the fast path) or with
    :meth:`read` until it returns ``b""``; then the connection goes back to the
    pool. :meth:`close` gives it up however far the exchange got (idempotent)."""

    __slots__ = ("status", "headers", "_pool", "_url", "_conn", "_timeout_s")

    def __init__(self, pool: UpstreamPool, url: str, conn: _Connection) -> None:
        self.status = conn.status
        self.headers = conn.headers
        self._pool = pool
        self._url = url
        self._conn: _Connection | None = conn
        self._timeout_s = pool.timeout_s

    @property
    def complete(self) -> bool:
        """Whether the whole body has arrived."""
        return self._conn is None or self._conn.complete

    def body(self) -> bytes:
        """The whole body; only when :attr:`complete`."""
        conn = self._conn
        if conn is None:
            return b""
        assert conn.complete, "body() before the response is complete: read() it"
        data = conn.take() if conn.chunks else b""
        self._finish(conn)
        return data

    async def read(self, deadline: float | None = None) -> bytes:
        """The body's next piece (all that has arrived, at most about ``_HIGH_WATER_BYTES`` plus one socket
        read); ``b""`` at the end. UpstreamError if the backend broke it, TimeoutError if nothing came
        for ``timeout_s`` (or by ``deadline``, loop time)."""
        conn = self._conn
        if conn is None:
            return b""
        while not conn.chunks and not conn.complete:
            if conn.error is not None:
                self.close()
                raise conn.error
            try:
                await conn.wait(deadline if deadline is not None else conn.loop.time() + self._timeout_s)
            except BaseException:
                self.close()
                raise
        if conn.chunks:
            return conn.take()
        self._finish(conn)
        return b""

    def _finish(self, conn: _Connection) -> None:
        self._conn = None
        self._pool._release(self._url, conn)

    def close(self) -> None:
        """Give the connection up unless it went back to the pool: the exchange ends here."""
        if self._conn is not None:
            self._conn.close()
            self._conn = None


class UpstreamPool:
    """Keep-alive connections to any number of ``http://host:port`` backends.

    ``max_header_bytes`` and ``max_headers`` cap each response's head (see the module docstring)."""

    def __init__(self, *, timeout_s: float = 30.0, max_idle: int = 64,
                 max_header_bytes: int = MAX_RESPONSE_HEADER_BYTES, max_headers: int = MAX_RESPONSE_HEADERS) -> None:
        if max_header_bytes < 1 or max_headers < 1:
            raise ValueError(f"max_header_bytes and max_headers must be >= 1, got {max_header_bytes}, {max_headers}")
        self.timeout_s = timeout_s
        self.max_idle = max_idle
        self.max_header_bytes = max_header_bytes
        self.max_headers = max_headers
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
            _, conn = await asyncio.wait_for(loop.create_connection(
                lambda: _Connection(loop, self.max_header_bytes, self.max_headers), host, port), self.timeout_s)
        except (OSError, asyncio.TimeoutError) as exc:
            raise ConnectFailed(f"cannot connect to {base_url}: {exc or type(exc).__name__}") from None
        return conn

    def _release(self, base_url: str, conn: _Connection) -> None:
        idle = self._idle.setdefault(base_url, deque())
        if conn.keep_alive and conn.reusable and not conn.closed and not conn.reading_paused and len(idle) < self.max_idle:
            idle.append(conn)
        else:
            conn.close()

    async def request(self, base_url: str, method: str, path_qs: str, headers: list[tuple[str, str]],
                      body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
        """Send one request and read the whole response: (status, headers, body), all within ``timeout_s``.
        Raises ConnectFailed, UpstreamError, TimeoutError."""
        lines = [f"{name}: {value}\r\n".encode("latin-1") for name, value in headers]
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        response = await self.exchange(base_url, method, path_qs.encode("latin-1"), b"".join(lines), body,
                                       deadline=deadline)
        try:
            if response.complete:
                return response.status, response.headers, response.body()
            parts = []
            while chunk := await response.read(deadline):
                parts.append(chunk)
            return response.status, response.headers, b"".join(parts)
        finally:
            response.close()

    async def exchange(self, base_url: str, method: str, target: bytes, header_lines: bytes, body: Body = b"", *,
                       length: int | None = None, deadline: float | None = None) -> UpstreamResponse:
        """Send ``method target`` with ``header_lines`` (``Name: value\\r\\n`` each; not Host, Content-Length or
        Transfer-Encoding, which this sets) and ``body``; return once the final response's headers are in.

        ``body`` is bytes, or a coroutine function returning the next piece (``b""`` at the end) whose total is
        ``length`` bytes if known (else it goes chunked); an exception it raises ends the exchange and propagates.
        ``deadline`` (loop time) replaces ``timeout_s`` for waits on the headers. Raises ConnectFailed (nothing
        sent), UpstreamError (also for a non-idempotent ``method`` whose reused connection died before any
        answer: see the module docstring), TimeoutError."""
        _, _, host = self._address(base_url)
        start = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (method.encode("latin-1"), target, host, header_lines)
        head = method == "HEAD"
        if isinstance(body, bytes):
            if body or method not in _NO_BODY_METHODS:
                payload = b"%sContent-Length: %d\r\n\r\n%s" % (start, len(body), body)
            else:
                payload = start + b"\r\n"
            idle = self._idle.get(base_url)
            while idle:
                conn = idle.popleft()
                if conn.closed:
                    continue
                try:
                    return await self._whole(base_url, conn, payload, head, deadline)
                except UpstreamError as exc:
                    if conn.received_any:
                        raise
                    if method not in IDEMPOTENT:  # it may have been done: not ours to do again
                        raise UpstreamError(f"{exc} (a reused connection, before any answer; {method} is not "
                                            "idempotent, so it is not sent again: RFC 9110 9.2.2)") from exc
                    # A stale keep-alive connection, closed by the backend while idle: try a fresh one.
            return await self._whole(base_url, await self._open(base_url), payload, head, deadline)
        framing = b"Content-Length: %d\r\n\r\n" % length if length is not None else b"Transfer-Encoding: chunked\r\n\r\n"
        conn = await self._open(base_url)
        try:
            conn.start(start + framing, head)
            await self._upload(conn, body, chunked=length is None)
            await self._headers(conn, deadline)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, base_url, conn)

    async def _whole(self, base_url: str, conn: _Connection, payload: bytes, head: bool,
                     deadline: float | None) -> UpstreamResponse:
        try:
            conn.start(payload, head)
            await self._headers(conn, deadline)
        except BaseException:
            conn.close()
            raise
        return UpstreamResponse(self, base_url, conn)

    async def _headers(self, conn: _Connection, deadline: float | None) -> None:
        if deadline is None:
            deadline = conn.loop.time() + self.timeout_s
        while not conn.headers_done:
            if conn.error is not None:
                raise conn.error
            await conn.wait(deadline)

    async def _upload(self, conn: _Connection, read_chunk: Callable[[], Awaitable[bytes]], *, chunked: bool) -> None:
        """Stream the body: stop early if the backend answers first (its answer counts) or breaks."""
        while not (conn.headers_done or conn.error is not None):
            chunk = await read_chunk()
            if conn.headers_done or conn.error is not None:
                break
            if not chunk:
                if chunked:
                    conn.write(b"0\r\n\r\n")
                return
            conn.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
            deadline = conn.loop.time() + self.timeout_s
            while conn.writing_paused and not conn.headers_done and conn.error is None:
                await conn.wait(deadline)  # the backend is not reading: wait for room, at most timeout_s
        conn.reusable = False  # the request was not sent whole: what the backend makes of the rest is unknown

    def close(self) -> None:
        for idle in self._idle.values():
            while idle:
                idle.popleft().close()
