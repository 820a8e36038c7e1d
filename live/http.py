"""HTTP glue shared by the node, the registry and the balancer.

Every error any of them returns is JSON of one shape, with the right status::

    {"error": {"status": 429, "code": "rate_limited", "message": "...", ...details}}

:func:`error_middleware` turns aiohttp's own errors (404 for an unknown path,
405, 413 for an oversized body, ...) and unexpected exceptions into that shape,
so no client ever sees an HTML page or a traceback. :func:`read_json` reads a
request body as a JSON object and names what is wrong with it.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

__all__ = ["cancel_and_wait", "error_middleware", "error_response", "metrics_response", "json_error", "read_json", "require"]

log = logging.getLogger("testbed.http")

_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
          413: "body_too_large", 415: "unsupported_media_type", 429: "too_many_requests", 500: "internal_error",
          502: "bad_gateway", 503: "unavailable", 504: "gateway_timeout"}


def json_error(status: int, code: str | None = None, message: str = "", *,
               headers: dict[str, str] | None = None, **details: Any) -> web.Response:
    """A JSON error response of the project-wide shape."""
    body = {"error": {"status": status, "code": code or _CODES.get(status, "error"), "message": message, **details}}
    return web.json_response(body, status=status, headers=headers)


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
        return web.Response(status=exc.status, text=exc.text, content_type="application/json")
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        message = exc.text if exc.text and not exc.text.startswith(f"{exc.status}:") else exc.reason
        if exc.status == 404:
            message = f"no endpoint {request.method} {request.path}"
        elif exc.status == 405:
            allowed = exc.headers.get("Allow", "")
            message = f"{request.method} is not allowed on {request.path}; allowed: {allowed}"
            return json_error(405, message=message, headers={"Allow": allowed}, allowed=allowed.split(","))
        elif exc.status == 413:
            message = f"request body too large (the limit is {request.app._client_max_size} bytes)"
        return json_error(exc.status, message=message)
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
    """The body as a JSON object; raise a 400/413 JSON error naming the problem."""
    raw = await request.read()
    if not raw:
        raise _bad("empty_body", "the request body is empty; send a JSON object")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _bad("bad_json", f"the request body is not valid JSON: {exc}")
    if not isinstance(data, dict):
        raise _bad("bad_json", f"the request body must be a JSON object, not {type(data).__name__}")
    return data


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
