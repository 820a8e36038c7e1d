"""OpenAPI 3.1 descriptions of the node's, the registry's and the balancer's own HTTP APIs.

Theory of operation
-------------------
Each process serves the description of the API it actually has at ``GET
/openapi.json``: :func:`node_description`, :func:`registry_description` and
:func:`balancer_description` build it as plain Python data from the process's
configuration (a node started without ``--faults`` has no ``/admin/faults``, a
registry without ``--token`` asks for no credentials), and :func:`serve` turns a
description into a handler that answers with bytes serialised once.

The descriptions are a contract, checked by ``tests/live/test_openapi.py``:
every route an app registers is documented and every documented operation is
registered (a walk of ``app.router.routes()``); each real process serves a
valid OpenAPI document equal to this data; and Schemathesis fuzzes each real
process against it (no ``5xx``; every status, media type, header and body as
documented; what the schemas call invalid refused with a ``4xx``). A change to
a handler's answers is a change here too.

One error shape for everything (:func:`live.http.json_error`): a ``4xx``/``5xx``
body is ``{"error": {"status", "code", "message", ...details}}`` whose
``status`` equals the HTTP status and whose ``code`` is a snake_case word
(the codes each response can carry are named in its description). Every
operation also lists what the server layer may answer before any handler runs,
whatever the path (:data:`SERVER_LAYER`): bad framing, a slow client, a full
connection cap.

Only what a handler of the process itself answers is described: the balancer
proxies every other method and path to a backend, so those are the node's API,
not the balancer's. ``HEAD`` is implied by ``GET`` everywhere (RFC 9110 9.3.2)
and not listed.
"""

from __future__ import annotations

import copy
import json
from typing import Any, Awaitable, Callable

from aiohttp import web

__all__ = ["OPENAPI_VERSION", "SERVER_LAYER", "balancer_description", "documented_operations", "node_description",
           "registry_description", "serve"]

OPENAPI_VERSION = "3.1.0"
JSON = "application/json"
Schema = dict[str, Any]

#: Statuses the server layer (:mod:`live.connections`) may answer to any request before any handler runs, each
#: with ``Connection: close``: malformed framing, a slow client, a full connection cap.
SERVER_LAYER: dict[int, str] = {
    400: "Malformed request (`bad_request_line`, `bad_method`, `bad_header`, `bad_content_length`, `bad_framing`, "
         "`bad_transfer_encoding`, `not_http`, `bad_request`).",
    408: "The request's headers did not arrive within `--header-timeout` (`header_timeout`).",
    414: "Request line too long (`uri_too_long`).",
    431: "A header line too long, or too many headers (`headers_too_large`).",
    503: "The process's connection cap (`--max-connections`) is full (`too_many_connections`), with `Retry-After`.",
    505: "Not HTTP/1.0 or 1.1 (`http_version_not_supported`).",
}

ERROR: Schema = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {
        "type": "object", "required": ["status", "code", "message"],
        "properties": {
            "status": {"type": "integer", "minimum": 400, "maximum": 599},
            "code": {"type": "string", "pattern": "^[a-z][a-z0-9_]*$"},
            "message": {"type": "string"},
        },
        "additionalProperties": True,  # details: field, allowed, retry_after_s, node_id, backend, ...
    }},
}
INTEGER: Schema = {"type": "integer", "minimum": 0}
NUMBER: Schema = {"type": "number"}
NONNEG: Schema = {"type": "number", "minimum": 0}
STRING: Schema = {"type": "string"}
RETRY_AFTER: Schema = {"description": "Whole seconds to wait before trying again (RFC 9110 10.2.3).",
                       "schema": {"type": "integer", "minimum": 0}}
#: Node ids: what the registry accepts, so a ``/heartbeat/{id}`` URL always reaches the heartbeat route.
NODE_ID: Schema = {"type": "string", "pattern": "^[A-Za-z0-9._:-]{1,200}$", "not": {"enum": [".", ".."]}}


def _obj(required: dict[str, Schema], optional: dict[str, Schema] | None = None, *, more: bool = True) -> Schema:
    """An object schema: ``required`` properties, ``optional`` ones; ``more``: other properties allowed."""
    schema: Schema = {"type": "object", "properties": {**required, **(optional or {})}, "additionalProperties": more}
    if required:
        schema["required"] = list(required)
    return schema


def _nullable(schema: Schema) -> Schema:
    return {"anyOf": [schema, {"type": "null"}]}


def _ok(description: str, schema: Schema, *, headers: dict[str, Any] | None = None,
        media: str = JSON) -> dict[str, Any]:
    response: dict[str, Any] = {"description": description, "content": {media: {"schema": schema}}}
    if headers:
        response["headers"] = headers
    return response


def _error(status: int, description: str, *, retry_after: bool = False) -> dict[str, Any]:
    """An error response: the shared shape, with ``error.status`` equal to ``status``."""
    schema = {"allOf": [{"$ref": "#/components/schemas/Error"},
                        {"properties": {"error": {"properties": {"status": {"const": status}}}}}]}
    response: dict[str, Any] = {"description": description, "content": {JSON: {"schema": schema}}}
    if retry_after:
        response["headers"] = {"Retry-After": RETRY_AFTER}
    return response


def _operation(summary: str, ok: dict[str, dict[str, Any]], errors: dict[int, str], *, tag: str,
               description: str = "", parameters: list[dict[str, Any]] | None = None,
               body: Schema | None = None, body_required: bool = True, secured: str | None = None,
               retry_after: frozenset[int] = frozenset({429, 503})) -> dict[str, Any]:
    """One operation: its success responses, its own errors and the server layer's (:data:`SERVER_LAYER`)."""
    merged = dict(SERVER_LAYER)
    for status, text in errors.items():
        merged[status] = f"{text} {merged[status]}" if status in merged else text
    if secured:
        merged.setdefault(401, "Missing or wrong credentials (`unauthorized`).")
    responses = {**ok, **{str(status): _error(status, text, retry_after=status in retry_after)
                          for status, text in sorted(merged.items())}}
    if secured:
        responses["401"]["headers"] = {"WWW-Authenticate": {"description": "The scheme wanted (RFC 9110 11.6.1).",
                                                            "schema": STRING}}
    operation: dict[str, Any] = {"summary": summary, "tags": [tag], "responses": responses}
    if description:
        operation["description"] = description
    if parameters:
        operation["parameters"] = parameters
    if body is not None:
        operation["requestBody"] = {"required": body_required, "content": {JSON: {"schema": body}}}
    if secured:
        operation["security"] = [{secured: []}]
    return operation


def _document(title: str, description: str, paths: dict[str, Any], *,
              security_schemes: dict[str, Any] | None = None) -> dict[str, Any]:
    components: dict[str, Any] = {"schemas": {"Error": copy.deepcopy(ERROR)}}
    if security_schemes:
        components["securitySchemes"] = security_schemes
    return {"openapi": OPENAPI_VERSION,
            "info": {"title": title, "version": "1", "description": description},
            "paths": paths, "components": components}


def _get(summary: str, schema: Schema, *, tag: str, description: str = "", errors: dict[int, str] | None = None,
         headers: dict[str, Any] | None = None, parameters: list[dict[str, Any]] | None = None,
         media: str = JSON) -> dict[str, Any]:
    return {"get": _operation(summary, {"200": _ok(summary, schema, headers=headers, media=media)}, errors or {},
                              tag=tag, description=description, parameters=parameters)}


def _metrics(tag: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _get("Prometheus metrics (text format)", STRING, tag=tag, headers=headers, media="text/plain")


def _openapi(tag: str, headers: dict[str, Any] | None = None) -> dict[str, Any]:
    return _get("This description (OpenAPI 3.1)", _obj({"openapi": STRING, "info": {"type": "object"},
                                                         "paths": {"type": "object"}}),
                tag=tag, headers=headers)


# -- the node ------------------------------------------------------------------
_NODE_ID_HEADER = {"X-Node-ID": {"description": "The node's id.", "required": True, "schema": STRING}}
_RATE_LIMIT_HEADERS = {
    name: {"description": f"`{name}` (IETF RateLimit draft), when the node runs `--rate-limit`.",
           "schema": {"type": "integer", "minimum": 0}}
    for name in ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")}
_CLIENT_HEADERS = [
    {"name": "X-Client-ID", "in": "header", "required": False,
     "description": "The client's key, honoured only from a `--trust-proxy` peer; at most 256 bytes "
                    "(longer: 400 `bad_client_id`).",
     "schema": {"type": "string", "maxLength": 256}},
    {"name": "X-Forwarded-For", "in": "header", "required": False,
     "description": "From a `--trust-proxy` peer: the client is the rightmost untrusted hop.",
     "schema": STRING},
]
_FAULT_FIELDS: dict[str, Schema] = {"error_rate": {"type": "number", "minimum": 0, "maximum": 1},
                                    "extra_latency_ms": {"type": "number", "minimum": 0, "maximum": 600_000}}
_FAULTS = _obj(_FAULT_FIELDS, more=False)
_REFUSALS = {429: "Refused by the rate limiter (`rate_limited`), the backpressure gate (`backpressure`) or the "
                  "client bulkhead (`client_bulkhead`); with `Retry-After`.",
             400: "An `X-Client-ID` over 256 bytes (`bad_client_id`)."}
_NOT_ENABLED = {404: "The feature is off on this node (`not_enabled`, naming the flag that turns it on)."}


def node_description(*, faults: bool = False, admin_token: bool = False) -> dict[str, Any]:
    """The node's API; ``faults``: started with ``--faults``; ``admin_token``: with ``--admin-token``."""
    tag, hdr = "node", dict(_NODE_ID_HEADER)
    ok_hdr = {**hdr, **_RATE_LIMIT_HEADERS}
    paths: dict[str, Any] = {
        "/health": _get("Liveness; never does the work (the rate limiter counts it)", _obj(
            {"status": {"const": "ok"}, "node_id": STRING, "active_requests": INTEGER, "workers": INTEGER,
             "busy_workers": INTEGER, "queued": INTEGER}), tag=tag, headers=ok_hdr, errors=_REFUSALS,
            parameters=_CLIENT_HEADERS),
        "/work": {"get": _operation(
            "One unit of work: waits FIFO for a worker, then takes a service time",
            {"200": _ok("Done", _obj({"node_id": STRING, "queue_wait_ms": NONNEG, "service_ms": NONNEG,
                                      "downstream_status": _nullable(INTEGER)}), headers=ok_hdr)},
            {**_REFUSALS,
             500: "The work failed (`work_failed`): an injected fault (`/admin/faults`, `--error-rate`). The "
                  "error object's `service_ms` is the service time it took, as in an OK answer.",
             502: "The `--downstream` call failed (`work_failed`); the error object has `service_ms` too.",
             503: "The circuit breaker refuses (`circuit_open`), with `Retry-After`."},
            tag=tag, parameters=_CLIENT_HEADERS)},
        "/stats": _get("Counters and configuration", _obj(
            {"node_id": STRING, "uptime_s": NONNEG, "active_requests": INTEGER, "busy_workers": INTEGER,
             "queued": INTEGER, "requests": {"type": "object", "additionalProperties": INTEGER},
             "faults": _FAULTS, "config": _obj({"node_id": STRING, "workers": INTEGER})},
            {"rate_limiter": _obj({"clients": INTEGER, "max_clients": INTEGER, "evicted": INTEGER})}),
            tag=tag, headers=hdr),
        "/queue-stats": _get("The backpressure gate (`--backpressure`)", _obj(
            {"current": INTEGER, "max": INTEGER, "utilization_percent": NONNEG, "accepted": INTEGER,
             "rejected": INTEGER, "rejection_rate": NONNEG, "peak": INTEGER, "in_service": INTEGER,
             "waiting_for_worker": INTEGER, "workers": INTEGER}), tag=tag, headers=hdr, errors=_NOT_ENABLED),
        "/circuit-status": _get("The circuit breaker (`--circuit-breaker`)", _obj(
            {"name": STRING, "state": {"enum": ["CLOSED", "OPEN", "HALF_OPEN"]}, "generation": INTEGER,
             "retry_after_s": NONNEG, "opened_at": _nullable(NUMBER), "next_transition_at": _nullable(NUMBER),
             "consecutive_failures": INTEGER, "window": {"type": "object"}, "half_open": {"type": "object"},
             "counts": {"type": "object"}, "config": {"type": "object"},
             "transitions": {"type": "array", "items": _obj(
                 {"from": STRING, "to": STRING, "signal": STRING, "at": NUMBER})}}),
            tag=tag, headers=hdr, errors=_NOT_ENABLED),
        "/discovery-status": _get("Registration with the registry (`--registry`)", _obj(
            {"registry": STRING, "node_id": STRING, "address": _nullable(STRING), "registered": {"type": "boolean"},
             "registrations": INTEGER, "heartbeats_ok": INTEGER, "failures": INTEGER,
             "last_error": _nullable(STRING), "seconds_since_heartbeat": _nullable(NONNEG),
             "heartbeat_interval_s": NONNEG}, {"conflicts": INTEGER}), tag=tag, headers=hdr, errors=_NOT_ENABLED),
        "/peers": _get("The other nodes the registry lists (`--registry`)", _obj(
            {"node_id": STRING, "peers": {"type": "array", "items": _obj({"id": STRING, "address": STRING})}}),
            tag=tag, headers=hdr, errors=_NOT_ENABLED),
        "/metrics": _metrics(tag, hdr),
        "/openapi.json": _openapi(tag, hdr),
    }
    schemes = None
    if faults:
        secured = "adminToken" if admin_token else None
        schemes = {"adminToken": {"type": "http", "scheme": "bearer"}} if admin_token else None
        current = {"200": _ok("The faults now in force", _FAULTS, headers=hdr)}
        paths["/admin/faults"] = {
            "get": _operation("The injected faults", current, {}, tag="admin", secured=secured),
            "post": _operation(
                "Set injected faults (the fields given)", current,
                {400: "Not a JSON object (`empty_body`, `bad_json`, `bad_body`), an unknown field (`unknown_field`) or a value "
                      "out of range (`bad_field`, naming the field).",
                 413: "Body over the node's 64 KiB limit (`body_too_large`)."},
                tag="admin", body=_obj({}, _FAULT_FIELDS, more=False), secured=secured),
            "delete": _operation("Clear every injected fault", current, {}, tag="admin", secured=secured),
        }
    return _document(
        "testbed node",
        "A node of the resilience testbed: `GET /work` runs the request path (rate limiter, backpressure gate, "
        "circuit breaker, FIFO workers). Every response carries `X-Node-ID`; a feature that is off answers 404 "
        "naming its flag; every error is the `Error` shape.", paths, security_schemes=schemes)


# -- state changes (the registry's GET /events, the balancer's GET /lb-events) ----
_SINCE = [{"name": "since", "in": "query", "required": False,
           "schema": {"type": "integer", "minimum": 0, "maximum": 2**53},
           "description": "The number of the first event wanted (the `next` of the previous answer; default 0)."}]


def _events(summary: str, event: Schema, *, tag: str) -> dict[str, Any]:
    """A ring of numbered state changes read from ``since`` on (:func:`live.http.events_response`)."""
    return _get(summary, _obj({
        "events": {"type": "array", "items": event},
        "next": {**INTEGER, "description": "The `since` to ask for next."},
        "missed": {**INTEGER, "description": "Events from `since` on that were pushed out of the ring "
                                             "(it keeps the newest `--events-kept`, 4,096 by default) before "
                                             "this read."}}, more=False),
                tag=tag, parameters=_SINCE,
                errors={400: "`since` is not a whole number from 0 to 2**53, or given twice (`bad_query`)."})


# -- the registry --------------------------------------------------------------
_MEMBER = _obj({"id": STRING, "address": STRING, "metadata": {"type": "object"},
                "status": {"enum": ["alive", "dead"]}, "registered_at": NUMBER, "incarnation": INTEGER},
               {"last_heartbeat": NUMBER, "seconds_since_heartbeat": NONNEG})
_METADATA: Schema = {
    "type": "object", "maxProperties": 32, "propertyNames": {"minLength": 1, "maxLength": 64},
    "additionalProperties": {"type": ["string", "number", "boolean", "null"]},
    "description": "JSON scalars (finite numbers) under at most 32 keys of 1-64 characters, at most 4 KiB as JSON.",
}
_WRITE_ERRORS = {400: "Not a JSON object (`empty_body`, `bad_json`, `bad_body`), an unknown field (`unknown_field`), a missing or "
                      "bad field (`missing_field`, `bad_field`, naming it).",
                 413: "Body over the registry's 16 KiB limit (`body_too_large`)."}
_LEASE_MISMATCH = "The lease is missing or not the current one (`lease_mismatch`, `action: register`)."


def _lease(required: bool, description: str) -> dict[str, Any]:
    return {"name": "X-Lease", "in": "header", "required": required, "description": description,
            "schema": STRING}


def registry_description(*, token: bool = False) -> dict[str, Any]:
    """The registry's API; ``token``: started with ``--token`` (writes then need ``Authorization: Bearer``).

    A registration belongs to the instance that made it: ``POST /register`` answers with a ``lease`` that the
    heartbeats and the deregistration of that id carry in ``X-Lease``; the OpenAPI links say so, which lets a
    stateful run follow a registration with its heartbeats."""
    tag = "registry"
    secured = "registryToken" if token else None
    schemes = {"registryToken": {"type": "http", "scheme": "bearer"}} if token else None
    registered = _obj({"registered": _MEMBER, "lease": {"type": "string", "minLength": 1},
                       "heartbeat_interval_s": NONNEG, "ttl_s": NONNEG})
    owned = {"X-Lease": "$response.body#/lease"}
    links = {
        "Heartbeat": {"operationId": "heartbeat", "parameters": {
            "path.node_id": "$request.body#/id", **{f"header.{k}": v for k, v in owned.items()}}},
        "Deregister": {"operationId": "deregister", "requestBody": {"id": "$request.body#/id"},
                       "parameters": {f"header.{k}": v for k, v in owned.items()}},
    }
    register = _operation(
        "Register a node (or register it again)",
        {"201": _ok("A new member, with its lease", registered),
         "200": _ok("A known member registered again (same address or current lease): a new lease", registered)},
        {**_WRITE_ERRORS,
         400: _WRITE_ERRORS[400] + " An address that is not `http://host:port` or resolves outside "
                                   "`--allow-backends` (`bad_address`); metadata over its limits (`bad_field`).",
         409: "The id is alive, registered from another address, and the request has not its lease (`conflict`).",
         503: "`--max-nodes` members already (`registry_full`), with `Retry-After`."},
        tag=tag, secured=secured,
        parameters=[_lease(False, "The current lease of this id: a re-registration by its owner.")],
        body=_obj({"id": NODE_ID, "address": {"type": "string", "pattern": "^http://",
                                              "examples": ["http://127.0.0.1:5001"]}},
                  {"metadata": _METADATA}, more=False))
    for status in ("200", "201"):
        register["responses"][status]["links"] = links
    heartbeat = _operation(
        "A node is alive (and, with a body, its new metadata)",
        {"200": _ok("Heard", _obj({"status": {"const": "ok"}, "node_id": STRING}))},
        {400: _WRITE_ERRORS[400], 413: _WRITE_ERRORS[413],
         404: "Unknown id (`unknown_node`, `action: register`): register again.", 409: _LEASE_MISMATCH},
        tag=tag, secured=secured, body=_obj({}, {"metadata": _METADATA}, more=False), body_required=False,
        parameters=[{"name": "node_id", "in": "path", "required": True, "schema": NODE_ID},
                    _lease(True, "The lease from the registration.")])
    deregister = _operation(
        "A node leaves",
        {"200": _ok("Gone", _obj({"deregistered": STRING}))},
        {**_WRITE_ERRORS, 404: "Unknown id (`unknown_node`).", 409: _LEASE_MISMATCH},
        tag=tag, secured=secured, body=_obj({"id": NODE_ID}, more=False),
        parameters=[_lease(True, "The lease from the registration.")])
    heartbeat["operationId"], deregister["operationId"], register["operationId"] = "heartbeat", "deregister", "register"
    paths: dict[str, Any] = {
        "/register": {"post": register},
        "/heartbeat/{node_id}": {"post": heartbeat},
        "/deregister": {"post": deregister},
        "/nodes": _get("The members (sorted by id), and which registry process answered (`registry.instance`, "
                       "new at each start: a balancer keeps the members a new instance does not list yet for "
                       "its `ttl_s`)", _obj({"nodes": {"type": "array", "items": _MEMBER}, "count": INTEGER,
                                             "registry": _obj({"instance": STRING, "ttl_s": NONNEG,
                                                               "heartbeat_interval_s": NONNEG}, more=False)}),
                       tag=tag, parameters=[{
                           "name": "all", "in": "query", "required": False, "schema": STRING,
                           "description": "`1`, `true` or `yes`: the dead not yet forgotten too, and the heartbeat "
                                          "times; any other value: the alive only."}]),
        "/events": _events(
            "Membership changes, oldest first, each at the registry's clock (`time.monotonic` seconds)",
            _obj({"kind": {"enum": ["joined", "rejoined", "died", "revived", "left", "removed"]},
                  "node_id": STRING, "at": NUMBER}, more=False), tag=tag),
        "/health": _get("Liveness and member counts", _obj({"status": {"const": "ok"}, "alive": INTEGER,
                                                             "dead": INTEGER}), tag=tag),
        "/metrics": _metrics(tag),
        "/openapi.json": _openapi(tag),
    }
    return _document(
        "testbed registry",
        "The service registry: nodes register, heartbeat and deregister; `GET /nodes` lists the members. "
        "Every error is the `Error` shape.", paths, security_schemes=schemes)


# -- the balancer --------------------------------------------------------------
_BACKEND = _obj({"url": STRING, "weight": INTEGER, "requests": INTEGER, "active": INTEGER, "errors": INTEGER,
                 "share": NONNEG, "healthy": {"type": "boolean"}, "last_check": STRING,
                 "ejector": _nullable(STRING), "latency_ms": _nullable(_obj(
                     {"p50": NONNEG, "p95": NONNEG, "p99": NONNEG, "ewma": NONNEG})),
                 "stalls": INTEGER, "last_sent_ago_s": _nullable(NONNEG)})


def balancer_description() -> dict[str, Any]:
    """The balancer's own endpoints (every other method and path is proxied to a backend)."""
    tag = "balancer"
    paths = {
        "/lb-stats": _get("Per-backend books", _obj(
            {"strategy": STRING, "requests": INTEGER, "no_healthy_backend": INTEGER, "max_backends": INTEGER,
             "left_out": INTEGER, "refused": INTEGER,
             "backends": {"type": "object", "additionalProperties": _BACKEND}},
            {"id": {"type": "string", "description": "This balancer's name in `Via` (loop detection)."}}), tag=tag),
        "/lb-events": _events(
            "Health flips and ejector transitions, oldest first, each at the balancer's clock (`time.monotonic` "
            "seconds)", _obj({"t": NUMBER, "target": STRING, "kind": {"enum": ["health", "ejector"]},
                              "from": STRING, "to": STRING}, {"detail": STRING}, more=False), tag=tag),
        "/metrics": _metrics(tag),
        "/openapi.json": _openapi(tag),
        "/dashboard": _get("The live dashboard: one HTML page", STRING, tag=tag, media="text/html"),
        "/dashboard/events": _get(
            "Dashboard snapshots, one a second, as Server-Sent Events", STRING, tag=tag, media="text/event-stream",
            errors={503: "`--dashboard-max-streams` streams open already (`dashboard_busy`), with `Retry-After`."}),
        "/dashboard/{file}": _get(
            "The dashboard's script or style", STRING, tag=tag, media="application/javascript",
            errors={404: "No such file (`not_found`)."},
            parameters=[{"name": "file", "in": "path", "required": True, "schema": STRING}]),
    }
    return _document(
        "testbed balancer",
        "The load balancer's own endpoints. Every other method and path is proxied to a backend picked by the "
        "strategy (the backend's status, headers and body come back, plus `X-Backend`), except `/admin/*`, which "
        "is never proxied (403 `admin_not_proxied`). The balancer's own refusals on proxied requests are the "
        "`Error` shape too: 400 (a header value the upstream cannot carry, a body cut short), 408 "
        "(`request_timeout`), 413 (`body_too_large`, past `--max-body`), 417 (`expectation_failed`), 502 "
        "(`backend_unreachable`, `backend_error`), 503 (`no_healthy_backend`), 504 (`backend_timeout`), 508 "
        "(`loop_detected`).", paths)


# -- serving and reading -------------------------------------------------------
def serve(description: dict[str, Any]) -> Callable[[web.Request], Awaitable[web.Response]]:
    """A ``GET /openapi.json`` handler for ``description``, serialised once."""
    body = json.dumps(description, separators=(",", ":")).encode()

    async def openapi_json(request: web.Request) -> web.Response:
        return web.Response(body=body, content_type=JSON)
    return openapi_json


def documented_operations(description: dict[str, Any]) -> set[tuple[str, str]]:
    """``(METHOD, path)`` of every operation ``description`` documents (paths in aiohttp's ``{name}`` form)."""
    methods = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}
    return {(method.upper(), path) for path, item in description["paths"].items() for method in item
            if method in methods}
