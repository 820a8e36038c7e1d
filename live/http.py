"""HTTP glue shared by the node, the registry and the balancer.

Every error any of them returns is JSON of one shape, with the right status::

    {"error": {"status": 429, "code": "rate_limited", "message": "...", ...details}}

:func:`error_middleware` turns aiohttp's own errors (404 for an unknown path,
405, 413 for an oversized body, ...) and unexpected exceptions into that shape,
so no client ever sees an HTML page or a traceback. Requests too malformed to
reach an app (bad framing, oversized headers) get the same shape from the
connection layer, :mod:`live.connections`, which renders it with
:func:`error_bytes`.

:func:`read_json` reads a request body as a JSON object and names what is
wrong with it. It accepts only what JSON itself allows, so that nothing a
client sends can be stored and later echoed as invalid JSON or break the
serialisation of a whole listing: no ``NaN``/``Infinity`` (Python's ``json``
takes them by default), no number that overflows a double (``1e999`` would be
``inf``), no integer Python refuses to convert (over 4,300 digits), and no
nesting deeper than :data:`MAX_JSON_DEPTH` levels (serde_json's fixed limit;
a 3,000-level body would otherwise raise ``RecursionError``, and a 990-level
one, stored, would raise it later in whatever serialises it from a deeper
stack). :func:`reject_unknown` refuses fields an endpoint does not know.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from typing import Any, Awaitable, Callable

from aiohttp import web
from aiohttp.web_protocol import RequestPayloadError
from prometheus_client import CONTENT_TYPE_LATEST

from core.events import EventRing
from live.server_limits import ServerLimits

__all__ = ["BODY_TIMEOUT", "MAX_JSON_DEPTH", "cancel_and_wait", "error_body", "error_bytes", "error_middleware", "error_response",
           "events_response", "metrics_response", "json_error", "parse_json_object", "read_json", "reject_unknown", "require"]

log = logging.getLogger("testbed.http")

#: Seconds a JSON body may take to arrive (``--body-timeout``); ``serve`` sets it on each app.
BODY_TIMEOUT = web.AppKey("body_timeout_s", float)

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          408: "request_timeout", 413: "body_too_large", 414: "uri_too_long", 415: "unsupported_media_type",
          429: "too_many_requests", 431: "headers_too_large", 500: "internal_error", 502: "bad_gateway",
          503: "unavailable", 504: "gateway_timeout", 505: "http_version_not_supported"}

#: Deepest nesting of arrays and objects :func:`read_json` accepts (serde_json's fixed recursion limit).
MAX_JSON_DEPTH = 128


def error_body(status: int, code: str | None = None, message: str = "", **details: Any) -> dict[str, Any]:
    """The project-wide error object: ``{"error": {"status", "code", "message", ...details}}``."""
    return {"error": {"status": status, "code": code or _CODES.get(status, "error"), "message": message, **details}}


def json_error(status: int, code: str | None = None, message: str = "", *,
               headers: dict[str, str] | None = None, **details: Any) -> web.Response:
    """A JSON error response of the project-wide shape."""
    return web.json_response(error_body(status, code, message, **details), status=status, headers=headers)


def error_bytes(status: int, reason: str, code: str, message: str, *, headers: dict[str, str] | None = None,
                **details: Any) -> bytes:
    """A whole HTTP/1.1 error response with ``Connection: close``, as bytes for a raw transport.

    For answers given outside any request (a refused connection, a header timeout), where there
    is no aiohttp request to build a response on; computed once per kind, not per connection."""
    body = json.dumps(error_body(status, code, message, **details)).encode()
    head = {"Content-Type": "application/json; charset=utf-8", "Content-Length": str(len(body)),
            "Connection": "close", **(headers or {})}
    lines = "".join(f"{name}: {value}\r\n" for name, value in head.items())
    return f"HTTP/1.1 {status} {reason}\r\n{lines}\r\n".encode("latin-1") + body


@web.middleware
async def error_middleware(request: web.Request,
                           handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
    """Turn any HTTP error or exception of ``handler`` into the project's JSON error response."""
    try:
        return await handler(request)
    except Exception as exc:  # noqa: BLE001 - every error becomes a JSON response
        return error_response(request, exc)


def error_response(request: web.Request, exc: Exception) -> web.StreamResponse:
    """The JSON error response for an exception raised while handling ``request``."""
    if isinstance(exc, _JSONHTTPError):
        response = web.Response(status=exc.status, text=exc.text, content_type="application/json")
        if exc.status == 408:
            response.force_close()  # the rest of the body may never come: answer, then close, never drain
        return response
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no endpoint {request.method} {request.path or request.raw_path}"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
            return json_error(405, message=message, headers={"Allow": allowed}, allowed=allowed.split(","))
        elif exc.status == 413:
            message = f"request body too large (the limit is {request.app._client_max_size} bytes)"
        return json_error(exc.status, message=message)
    if isinstance(exc, RequestPayloadError):
        # The body broke off or was mis-framed (a bad chunk, fewer bytes than Content-Length): the client's fault.
        return json_error(400, "bad_body", f"the request body could not be read: {exc}",
                          headers={"Connection": "close"})
    log.error("unhandled error in %s %s", request.method, request.path, exc_info=exc)
    return json_error(500, message="internal error; the server log has the details")


async def cancel_and_wait(*tasks: asyncio.Task[Any]) -> None:
    """Stop background tasks at app cleanup and wait until they have."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


def metrics_response(body: bytes) -> web.Response:
    """A ``GET /metrics`` answer in the Prometheus text format."""
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object; raise a 400/408/413 JSON error naming the problem.

    The body must arrive within the app's ``BODY_TIMEOUT`` (``--body-timeout``, set by ``serve``): a client
    that announces a body and then sends it a byte at a time would otherwise hold its connection for good.

    Strict JSON only (see the module docstring): ``NaN``, ``Infinity``, numbers out of a
    double's range, integers of more than 4,300 digits and nesting deeper than
    :data:`MAX_JSON_DEPTH` are each a 400 ``bad_json`` that says which."""
    timeout_s = request.app.get(BODY_TIMEOUT, ServerLimits.body_timeout_s)
    try:
        raw = await asyncio.wait_for(request.read(), timeout_s)
    except asyncio.TimeoutError:
        raise _JSONHTTPError(408, "body_timeout", f"the request body did not arrive within {timeout_s:g} s "
                                                  "(--body-timeout)") from None
    if not raw:
        raise _bad("empty_body", "the request body is empty; send a JSON object")
    return parse_json_object(raw)


class _KeyTwice(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _no_twice(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object whose keys are all different: JSON parsers disagree on which of two equal keys wins (the
    first, the last, an error), so a body that means different things to different readers is refused."""
    out = dict(pairs)
    if len(out) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                raise _KeyTwice(key)
            seen.add(key)
    return out


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """:func:`read_json` without the request: ``raw`` as a strict JSON object, or a 400 ``bad_json``."""
    try:
        data = json.loads(raw, parse_constant=_no_constant, parse_float=_finite_float, object_pairs_hook=_no_twice)
    except _KeyTwice as exc:
        raise _bad("bad_json", f"the request body has the key {exc.key[:100]!r} twice in one object", key=exc.key[:100])
    except RecursionError:
        raise _bad("bad_json", f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError, too many digits, NaN/Infinity, 1e999
        raise _bad("bad_json", f"the request body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise _bad("bad_json", f"the request body must be a JSON object, not {type(data).__name__}")
    if _deeper_than(data, MAX_JSON_DEPTH):
        raise _bad("bad_json", f"the request body is nested too deeply (the limit is {MAX_JSON_DEPTH} levels)")
    return data


def reject_unknown(data: dict[str, Any], allowed: set[str] | frozenset[str]) -> None:
    """Raise a 400 ``unknown_field`` naming the first field of ``data`` not in ``allowed``, and the known ones."""
    for field in data:
        if field not in allowed:
            known = ", ".join(sorted(allowed))
            raise _bad("unknown_field", f"unknown field {field!r}; the known fields are: {known}",
                       field=field, allowed=sorted(allowed))


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON value")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is out of range (beyond a double)")
    return value


def _deeper_than(data: Any, limit: int) -> bool:
    """Whether arrays/objects in ``data`` nest more than ``limit`` levels (iterative: no recursion to exhaust)."""
    stack: list[tuple[Any, int]] = [(data, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def require(data: dict[str, Any], field: str, kind: type | tuple[type, ...], *, optional: bool = False,
            check: Callable[[Any], bool] | None = None, allowed: str = "") -> Any:
    """``data[field]`` if it has the right type (and passes ``check``); else a 400 naming the field."""
    if field not in data:
        if optional:
            return None
        raise _bad("missing_field", f"field {field!r} is required", field=field)
    value = data[field]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok_type = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if not ok_type or (check is not None and not check(value)):
        expected = allowed or " or ".join(k.__name__ for k in kinds)
        raise _bad("bad_field", f"field {field!r} must be {expected}, got {value!r}", field=field)
    return value


class _JSONHTTPError(web.HTTPException):
    """An HTTP error whose body is already the project's JSON shape."""

    def __init__(self, status: int, code: str, message: str, **details: Any) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"error": {"status": status, "code": code, "message": message, **details}}),
            content_type="application/json")


def _bad(code: str, message: str, **details: Any) -> web.HTTPException:
    return _JSONHTTPError(400, code, message, **details)


#: The largest ``since`` a ring reader may ask for (JSON numbers are exact up to here).
_MAX_SINCE = 2**53


def events_response(request: web.Request, ring: EventRing[Any]) -> web.Response:
    """``GET ...?since=N``: ``{"events": [...], "next": M, "missed": K}``; a ``since`` that is not a whole
    number from 0 to 2**53 is a 400 naming it."""
    raw = request.query.getall("since", [])
    if len(raw) > 1:
        return json_error(400, "bad_query", "give 'since' once", field="since")
    seq = 0
    if raw:
        text = raw[0]
        if not (text.isascii() and text.isdigit() and len(text) <= 16 and int(text) <= _MAX_SINCE):
            return json_error(400, "bad_query", f"query 'since' must be a whole number from 0 to {_MAX_SINCE}, "
                              f"got {text[:40]!r}", field="since")
        seq = int(text)
    events, following, missed = ring.since(seq)
    return web.json_response({"events": events, "next": following, "missed": missed})
