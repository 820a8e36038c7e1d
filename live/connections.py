"""Connection-level guards of the three servers: slow clients, too many clients, malformed requests.

Theory of operation
-------------------
aiohttp's server bounds how long an *idle* keep-alive connection lives and how
long a header line may be, but nothing else about a connection: a client that
sends its headers one byte at a time holds a connection (and a file
descriptor) forever, and once the process runs out of descriptors every new
client gets an empty reply. Requests it cannot parse it answers itself, as
``text/plain``, and logs each with a 7-line ERROR traceback. This module wraps
aiohttp's per-connection protocol (``RequestHandler``) and its factory
(``web.Server``) to add what nginx has (``client_header_timeout``,
``keepalive_timeout``, ``worker_connections``), and nothing per request:

* **Header timeout** (``header_timeout_s``): a request's headers must be
  complete within this long of the connection opening, or, on a kept-alive
  connection, of the first byte of that request. One timer per connection,
  armed when a request begins and cancelled when its headers are parsed; the
  common case (a whole request in one read) never arms it. On expiry a client
  that sent part of a request gets a ``408`` JSON error; one that sent nothing
  is closed silently (nginx does the same: an unsolicited response could be
  read as the answer to a request the client is about to send). One gap: the
  start of a next request that came in the same read as the end of the
  previous one (pipelined) and then stalls is bounded by the keep-alive
  timeout instead, as the parser does not say it holds part of a request.
* **Keep-alive timeout** (``keepalive_timeout_s``): an idle connection
  (nothing received since the last response) is closed after this long;
  aiohttp's own timer does it. Once bytes of a next request arrive, the header
  timeout takes over.
* **Connection cap** (``max_connections``): the protocol factory counts open
  connections. At the cap it first makes room by closing the longest-idle
  keep-alive connection, if any (nginx reuses idle connections the same way:
  an idle client loses nothing but a reconnect, and idle connections cannot
  lock new clients out). With none idle, it hands the new connection a tiny
  refusal protocol instead of an HTTP handler (no parser is built): it answers
  ``503`` JSON with ``Retry-After`` and ``Connection: close``. The listening
  socket keeps accepting, so a client past the cap gets that answer, not an
  empty reply or a hang. The answer is sent when the client's first bytes
  arrive (at most :data:`REFUSAL_WAIT_S` later): closing a socket whose
  request is still unread makes the kernel send a reset, which can destroy the
  ``503`` before the client reads it. At most :data:`MAX_WAITING_REFUSALS`
  refused connections wait at once; past that they are answered at once.
  One WARNING line when the cap is first hit, one when the process is below
  it again (with how many were closed and refused): a flood does not flood
  the log.
* **Malformed requests**: every error aiohttp's parser raises (bad request
  line, method or version, header line or request line too long, too many
  headers, bad or duplicate ``Content-Length``, ``Content-Length`` with
  ``Transfer-Encoding``, a bad chunk, non-HTTP bytes) becomes the project's
  JSON error (:func:`framing_error` picks status and code: ``414`` for a long
  request line, ``431`` for too many or too long headers, ``505`` for an
  unsupported version, else ``400``) with ``Connection: close``, and one
  WARNING log line naming the peer and the problem. A parse error inside a
  body (a bad chunk) fails the body's stream, so the handler reading it gets
  ``RequestPayloadError`` (400 ``bad_body``) instead of waiting forever:
  aiohttp's C parser drops that stream silently.

The limits and their defaults are :class:`~live.server_limits.ServerLimits`
(apart, so the command line can show them without importing aiohttp).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http import HttpVersion10
from aiohttp.http_exceptions import BadStatusLine, HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo
from aiohttp.web_request import BaseRequest
from aiohttp.web_response import StreamResponse

from live.http import error_bytes, error_response, json_error
from live.server_limits import ServerLimits, default_max_connections

__all__ = ["GuardedAppRunner", "GuardedServer", "IDLE_SCAN_INTERVAL_S", "MAX_WAITING_REFUSALS", "REFUSAL_WAIT_S",
           "ServerLimits",
           "default_max_connections", "framing_error"]

log = logging.getLogger("testbed.connections")

#: Longest a refused connection waits for the client's request before its 503 is sent anyway, in seconds.
REFUSAL_WAIT_S = 1.0
#: Refused connections waiting for their client's first bytes at most; past it the 503 goes out at once.
MAX_WAITING_REFUSALS = 256
#: At the cap, seconds between two searches for idle keep-alive connections to close.
IDLE_SCAN_INTERVAL_S = 1.0


class GuardedAppRunner(web.AppRunner):
    """``web.AppRunner`` whose server is a :class:`GuardedServer` with ``limits``."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: ServerLimits, **kwargs: Any) -> None:
        super().__init__(app, **{**kwargs, **limits.handler_args()})
        self._limits = limits

    async def _make_server(self) -> web.Server:
        plain = await super()._make_server()  # the app's startup runs here, as in AppRunner
        return GuardedServer(plain, self._limits)


def _json_errors(handler: Callable[[BaseRequest], Awaitable[web.StreamResponse]]
                 ) -> Callable[[BaseRequest], Awaitable[web.StreamResponse]]:
    """The app's handler, refusing an HTTP/0.9 request line (no version) before it runs.

    aiohttp served such a request with an HTTP/0.9 status line; it gets a JSON 505 instead. Not a
    coroutine of its own: it hands back the handler's awaitable, so the hot path gains a comparison and
    no frame. (What aiohttp itself refuses above the app, a request target that is not a path, is made
    JSON in :meth:`_GuardedHandler.finish_response`.)"""
    def handle(request: BaseRequest) -> Awaitable[web.StreamResponse]:
        if request.version < HttpVersion10:
            return _answer(error_response(request, _VERSION_REFUSED))  # type: ignore[arg-type]
        return handler(request)
    return handle


async def _answer(response: web.StreamResponse) -> web.StreamResponse:
    return response


_VERSION_REFUSED = web.HTTPVersionNotSupported(text="HTTP/1.0 or HTTP/1.1 only (this request line has no version)")


class GuardedServer(web.Server):
    """aiohttp's protocol factory, counting connections and refusing those past the cap.

    ``open_connections``, ``refused``, ``reclaimed`` (idle connections closed to make room),
    ``header_timeouts`` and ``malformed`` are counters an app (or a test) may read."""

    def __init__(self, plain: web.Server, limits: ServerLimits) -> None:
        # Built from the plain server AppRunner made, so the app's handler and request factory,
        # and every handler argument aiohttp and the app chose, stay exactly as they were.
        super().__init__(_json_errors(plain.request_handler), request_factory=plain.request_factory,
                         handler_cancellation=plain.handler_cancellation, loop=plain._loop, **plain._kwargs)
        self.limits = limits
        self.open_connections = 0
        self.refused = 0
        self.header_timeouts = 0
        self.malformed = 0
        self.reclaimed = 0
        self._cap_episode: tuple[int, int] | None = None  # (refused, reclaimed) when the cap was hit; None: below
        self._waiting_refusals: set[_Refusal] = set()
        self._idle_candidates: list[_GuardedHandler] = []
        self._next_idle_scan = 0.0
        self.refusal = error_bytes(
            503, "Service Unavailable", "too_many_connections",
            f"this server already has its maximum of {limits.max_connections} connections open "
            "(--max-connections); retry shortly", headers={"Retry-After": "1"}, retry_after_s=1)
        self.header_timeout_answer = error_bytes(
            408, "Request Timeout", "header_timeout",
            f"the request headers did not arrive within {limits.header_timeout_s:g} s (--header-timeout)")

    def __call__(self) -> Any:
        if self.open_connections >= self.limits.max_connections:
            self._at_cap()
            if not self._reclaim_idle():
                self.refused += 1
                return _Refusal(self)
        self.open_connections += 1
        return _GuardedHandler(self, loop=self._loop, **self._kwargs)

    def pre_shutdown(self) -> None:
        super().pre_shutdown()
        for refusal in list(self._waiting_refusals):
            refusal.answer()

    def _at_cap(self) -> None:
        if self._cap_episode is None:
            self._cap_episode = (self.refused, self.reclaimed)
            log.warning("connection limit reached: %d connections open (--max-connections); idle keep-alive "
                        "connections are closed to make room, new connections get 503 while none is idle",
                        self.open_connections)

    def _reclaim_idle(self) -> bool:
        """Close the longest-idle keep-alive connection, if there is one, to make room for a new one.

        Candidates come from a scan of every connection, at most once per ``IDLE_SCAN_INTERVAL_S``
        (a flood past the cap with no idle connection to take costs one scan a second, not one per
        connection), longest idle last; each is checked again when its turn comes."""
        candidates = self._idle_candidates
        while True:
            while candidates:
                handler = candidates.pop()
                if handler.is_idle():
                    handler.force_close()
                    self.reclaimed += 1
                    return True
            now = self._loop.time()
            if now < self._next_idle_scan:
                return False
            self._next_idle_scan = now + IDLE_SCAN_INTERVAL_S
            candidates.extend(h for h in self._connections if isinstance(h, _GuardedHandler) and h.is_idle())
            candidates.sort(key=_keepalive_deadline, reverse=True)
            if not candidates:
                return False

    def _closed(self) -> None:
        self.open_connections -= 1
        if self._cap_episode is not None and self.open_connections < self.limits.max_connections:
            refused, reclaimed = self._cap_episode
            log.warning("below the connection limit again; meanwhile %d idle keep-alive connections were "
                        "closed to make room and %d new connections refused with 503",
                        self.reclaimed - reclaimed, self.refused - refused)
            self._cap_episode = None


def _keepalive_deadline(handler: _GuardedHandler) -> float:
    return handler._next_keepalive_close_time


class _GuardedHandler(RequestHandler):
    """aiohttp's per-connection protocol with a header timeout and JSON answers to malformed requests."""

    __slots__ = ("_guard", "_counted", "_header_handle", "_header_count", "_header_bytes")

    def __init__(self, guard: GuardedServer, **kwargs: Any) -> None:
        super().__init__(guard, **kwargs)
        self._guard = guard
        self._counted = True
        self._header_handle: asyncio.TimerHandle | None = None
        self._header_count = 0  # _request_count when the header timer was armed
        self._header_bytes = False  # whether part of the awaited request has arrived

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_header_timer(got_bytes=False)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard._closed()
        if self._header_handle is not None:
            self._header_handle.cancel()
            self._header_handle = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        messages = self._messages
        if messages and type(messages[-1][0]) is _ErrInfo:
            self._fail_unfinished_bodies(messages[-1][0])
        handle = self._header_handle
        if handle is not None:
            if self._request_count != self._header_count:  # the awaited request's headers are in
                handle.cancel()
                self._header_handle = None
            else:
                self._header_bytes = True
            return
        waiter = self._waiter
        if waiter is not None and not waiter.done() and not (self._force_close or self._close):
            # Idle, and bytes came that are not yet a whole request head: a request has begun, and from
            # now on the header timeout, not the keep-alive timeout, bounds the wait for the rest of it.
            self._arm_header_timer(got_bytes=True)
            if self._keepalive_handle is not None:
                self._keepalive_handle.cancel()
                self._keepalive_handle = None  # aiohttp re-arms it after the next response

    async def finish_response(self, request: BaseRequest, resp: web.StreamResponse,
                              start_time: float | None) -> tuple[web.StreamResponse, bool]:
        """aiohttp's, with an HTTP error raised above the app made JSON, and then a 408 closes the
        connection at once: the body it gave up on may never come, and aiohttp would otherwise linger
        up to 10 s reading it (the slow-body attack's hold)."""
        if isinstance(resp, web.HTTPException) and resp.status >= 400:
            # Raised above the app (a request target that is not a path, ``CONNECT host:22`` or
            # ``OPTIONS *``, matches no route, even the catch-alls): aiohttp would answer text/plain.
            resp = error_response(request, resp)  # type: ignore[arg-type]
        resp, reset = await super().finish_response(request, resp, start_time)
        if resp.status == 408 and not reset:
            self.force_close()  # the answer is written; closing the transport flushes it first
        return resp, reset

    def is_idle(self) -> bool:
        """Kept alive between requests with nothing of a next request received: safe to close."""
        waiter = self._waiter
        return (waiter is not None and not waiter.done() and self._header_handle is None
                and self._request_count > 0 and self.transport is not None and not self._force_close)

    def _fail_unfinished_bodies(self, error: _ErrInfo) -> None:
        """The parser failed inside a body: make whoever reads that body see it.

        aiohttp's C parser drops the body stream it was filling without an error (its pure-Python
        parser sets one), so a handler reading the body would wait forever; give it the error instead
        (the app answers 400 ``bad_body``)."""
        failure = RequestPayloadError(_first_line(error.exc))
        streams = [payload for _, payload in self._messages]
        if self._current_request is not None:
            streams.append(self._current_request.content)
        for stream in streams:
            if not stream.is_eof() and stream.exception() is None:
                stream.set_exception(failure)
                # And once more after the reader has run: if the bytes before the bad ones had already
                # woken it (a chunk ended), it is waiting again and only a second call reaches it.
                self._loop.call_soon(stream.set_exception, failure)

    def log_exception(self, *args: Any, **kw: Any) -> None:
        """aiohttp's ERROR with traceback, except for a broken request body: the client's fault, one line."""
        exc = kw.get("exc_info")
        if isinstance(exc, (RequestPayloadError, HttpProcessingError)):
            log.warning("request from %s: %s", _peer(self), exc)
        else:
            super().log_exception(*args, **kw)

    def _arm_header_timer(self, *, got_bytes: bool) -> None:
        loop = self._loop
        self._header_count = self._request_count
        self._header_bytes = got_bytes
        self._header_handle = loop.call_at(loop.time() + self._guard.limits.header_timeout_s, self._header_timeout)

    def _header_timeout(self) -> None:
        self._header_handle = None
        transport = self.transport
        if transport is None or self._force_close or self._request_count != self._header_count:
            return
        guard = self._guard
        guard.header_timeouts += 1
        if self._header_bytes:
            log.warning("request headers from %s incomplete after %g s (--header-timeout): 408, closed",
                        _peer(self), guard.limits.header_timeout_s)
            transport.write(guard.header_timeout_answer)
        self.force_close()

    def handle_error(self, request: BaseRequest, status: int = 500, exc: BaseException | None = None,
                     message: str | None = None) -> StreamResponse:
        """The JSON answer to a request aiohttp could not parse (or whose handler failed outside the app)."""
        if request.writer.output_size > 0:  # part of a response went out already: only closing is left
            raise ConnectionError("Response is sent already, cannot send another response with the error message")
        if isinstance(exc, HttpProcessingError):
            status, code, text = framing_error(exc)
            self._guard.malformed += 1
            log.warning("malformed request from %s: %d %s: %s", _peer(self), status, code, _detail(exc))
            response = json_error(status, code, text, headers={"Connection": "close"})
        elif status == 500:
            log.error("unhandled error serving %s", _peer(self), exc_info=exc)
            response = json_error(500, message="internal error; the server log has the details",
                                  headers={"Connection": "close"})
        else:  # 504: the handler raised asyncio.TimeoutError past the app's middleware
            response = json_error(status, message=message or "", headers={"Connection": "close"})
        response.force_close()
        return response


class _Refusal(asyncio.Protocol):
    """A connection past the cap: read its first bytes, answer 503, close."""

    __slots__ = ("_guard", "_transport", "_timer")

    def __init__(self, guard: GuardedServer) -> None:
        self._guard = guard
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)
        waiting = self._guard._waiting_refusals
        if len(waiting) >= MAX_WAITING_REFUSALS:
            self.answer()
            return
        waiting.add(self)
        self._timer = self._guard._loop.call_later(REFUSAL_WAIT_S, self.answer)

    def data_received(self, data: bytes) -> None:
        self.answer()  # the request is read (and dropped): closing now sends a FIN, not a reset

    def eof_received(self) -> bool | None:
        self.answer()
        return None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._finish()
        self._transport = None

    def answer(self) -> None:
        transport = self._transport
        if transport is not None and not transport.is_closing():
            transport.write(self._guard.refusal)
            transport.close()
        self._finish()

    def _finish(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._guard._waiting_refusals.discard(self)


def framing_error(exc: HttpProcessingError) -> tuple[int, str, str]:
    """``(status, code, message)`` of the JSON answer to a request aiohttp's parser rejected.

    Read from the exception's class and aiohttp's message (llhttp's reason); anything not
    recognised is a plain ``400 bad_request`` with aiohttp's first line as the message."""
    first = _first_line(exc)
    text = (exc.message or "").lower()
    if isinstance(exc, LineTooLong):
        # The C parser reports the request line from its URL buffer (a bytearray), header lines as bytes.
        limit = exc.args[1] if len(exc.args) > 1 else "the limit of"
        if exc.args and isinstance(exc.args[0], bytearray):
            return 414, "uri_too_long", f"the request line is longer than {limit} bytes"
        return 431, "headers_too_large", f"a header line is longer than {limit} bytes"
    if "too many headers" in text:
        return 431, "headers_too_large", "the request has too many header lines"
    if "https traffic" in text:
        return 400, "not_http", "this is a plain HTTP port; TLS (https) is not served here"
    if "invalid method" in text:
        return 400, "bad_method", "the request method is not one this server knows"
    if "http version" in text:
        return 505, "http_version_not_supported", "only HTTP/1.0 and HTTP/1.1 are served here"
    if isinstance(exc, BadStatusLine):  # BadHttpMethod included: llhttp reports other request-line errors as one
        return 400, "bad_request_line", f"the request line is malformed: {first}"
    if "transfer-encoding" in text and "content-length" in text:
        return 400, "bad_framing", "a request may not have both Content-Length and Transfer-Encoding"
    if "content-length" in text:
        return 400, "bad_content_length", f"bad Content-Length: {first}"
    if "transfer-encoding" in text or "chunk" in text:
        return 400, "bad_transfer_encoding", f"bad Transfer-Encoding or chunked body: {first}"
    if "header" in text:
        return 400, "bad_header", f"bad header: {first}"
    return 400, "bad_request", f"the request is malformed: {first}"


def _first_line(exc: BaseException) -> str:
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc)
    return (text or type(exc).__name__).strip().splitlines()[0].rstrip(":").strip()


def _detail(exc: HttpProcessingError) -> str:
    """aiohttp's description of the problem on one line, short, with control characters escaped."""
    text = " ".join(line.strip() for line in (exc.message or type(exc).__name__).splitlines() if line.strip())
    return repr(text[:300])[1:-1]


def _peer(handler: RequestHandler) -> str:
    peer = handler.peername
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer)
