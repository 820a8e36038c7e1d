"""The OpenAPI descriptions (``live/openapi.py``) against the apps and against the real processes.

Three ways the descriptions and the code are kept the same:

* the route walk: every route an app registers is documented and every documented operation is registered
  (the catch-all route and ``HEAD`` beside ``GET`` aside), for each configuration that changes the routes;
* each real process (``testbed registry|node|balancer`` on port 0) serves, at ``GET /openapi.json``, a valid
  OpenAPI 3.1 document equal to the data fuzzed here;
* Schemathesis fuzzes every operation of each real process from that data: no ``5xx``; every status, media type,
  header and body as documented; every error of the one JSON shape with ``error.status`` equal to the HTTP
  status; input the description calls invalid refused with a ``4xx``; an undocumented method ``405`` with
  ``Allow``; and, on the registry, chains that follow the description's links (register, then heartbeat and
  deregister with the lease the registration gave).

The runs are bounded (``MAX_EXAMPLES`` per operation and phase, ``STEPS`` per chain, deadline off, derandomized,
no example database), so each process takes a few seconds on a busy 2-core machine. Schemathesis's loader for
schemas from fixtures (``schemathesis.pytest.from_fixture``) fails on pytest 9 (it sets ``Function._nodeid``,
which pytest 9 no longer has), so the descriptions are loaded from the Python data at collection time and each
request is sent to the process's ``base_url``.
"""

from __future__ import annotations

import json
import zlib
from typing import Any, Iterator

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, settings
from schemathesis.checks import (  # the built-in checks, by name
    content_type_conformance, ignored_auth, negative_data_rejection, not_a_server_error,
    response_headers_conformance, response_schema_conformance, status_code_conformance, unsupported_method,
)

from live.balancer import BalancerConfig, make_balancer_app
from live.node import NodeConfig, make_node_app
from live.openapi import (
    OPENAPI_VERSION, balancer_description, documented_operations, node_description, registry_description,
)
from live.registry import make_registry_app
from tests.live.procs import Proc, request as http

MAX_EXAMPLES = 25
STEPS = 6
CALL_TIMEOUT_S = 10.0  # a handler that hangs fails the test instead of hanging it
ADMIN_TOKEN = "openapi-admin-token"
REGISTRY_TOKEN = "openapi-registry-token"
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=list(HealthCheck))


# -- the route walk --------------------------------------------------------------
def registered_operations(app: web.Application) -> tuple[set[tuple[str, str]], list[str]]:
    """``(METHOD, path)`` of every route ``app`` registers, and the paths of its catch-all routes
    (method ``*``: the node's 404/405 fallback, the balancer's proxy). ``HEAD`` beside ``GET`` is implied."""
    routes = {(route.method, route.resource.canonical) for route in app.router.routes() if route.resource}
    heads = {path for method, path in routes if method == "HEAD"}
    gets = {path for method, path in routes if method == "GET"}
    assert heads <= gets, f"HEAD without GET on {sorted(heads - gets)}"
    return {(m, p) for m, p in routes if m not in ("*", "HEAD")}, sorted(p for m, p in routes if m == "*")


APPS = {  # name: (app factory, its catch-all paths)
    "node": (lambda: make_node_app(NodeConfig("n1", port=0)), ["/{tail}"]),
    "node --faults": (lambda: make_node_app(NodeConfig("n1", port=0, faults_admin=True)), ["/{tail}"]),
    "node --faults --admin-token": (lambda: make_node_app(NodeConfig("n1", port=0, faults_admin=True,
                                                                     admin_token=ADMIN_TOKEN)), ["/{tail}"]),
    "registry": (lambda: make_registry_app(), []),
    "registry --token": (lambda: make_registry_app(token="t"), []),
    "balancer": (lambda: make_balancer_app(BalancerConfig(nodes=("http://127.0.0.1:9",))), ["/{tail}"]),
}


@pytest.mark.parametrize("name", list(APPS))
async def test_every_route_is_documented_and_every_operation_is_served(name: str, aiohttp_client: Any) -> None:
    make_app, catch_all = APPS[name]
    app = make_app()
    client = await aiohttp_client(app)
    response = await client.get("/openapi.json")
    assert response.status == 200 and response.content_type == "application/json"
    description = await response.json()
    registered, catch_alls = registered_operations(app)
    assert catch_alls == catch_all
    documented = documented_operations(description)
    assert registered - documented == set(), "registered but not documented"
    assert documented - registered == set(), "documented but not registered"


def test_a_token_is_in_the_description_when_the_process_wants_one() -> None:
    admin = node_description(faults=True, admin_token=True)
    assert admin["components"]["securitySchemes"] == {"adminToken": {"type": "http", "scheme": "bearer"}}
    assert all(op["security"] == [{"adminToken": []}] and "401" in op["responses"]
               for op in admin["paths"]["/admin/faults"].values())
    assert "securitySchemes" not in node_description(faults=True)["components"]
    registry = registry_description(token=True)
    writes = [registry["paths"][p]["post"] for p in ("/register", "/heartbeat/{node_id}", "/deregister")]
    assert all(op["security"] == [{"registryToken": []}] and "401" in op["responses"] for op in writes)
    assert "security" not in registry["paths"]["/nodes"]["get"]


# -- the real processes ------------------------------------------------------------
def start_registry(*flags: str) -> Proc:
    # Nothing expires while the test runs, however slow the machine: the same requests get the same answers.
    return Proc("registry", "--port", "0", "--ttl", "600", *flags)


@pytest.fixture(scope="module")
def registry() -> Iterator[Proc]:
    proc = start_registry()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def token_registry() -> Iterator[Proc]:
    proc = start_registry("--token", REGISTRY_TOKEN)
    yield proc
    proc.stop()


@pytest.fixture
def empty_registry() -> Iterator[Proc]:
    proc = start_registry()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def node(registry: Proc) -> Iterator[Proc]:
    """A node with every feature on (so no operation is a 404 ``not_enabled``), trusting the test's own address
    to name clients (so ``X-Client-ID`` and ``X-Forwarded-For`` are read), registered with the registry."""
    proc = Proc("node", "--port", "0", "--id", "api-node", "--rate-limit", "100000", "--burst", "100000",
                "--backpressure", "50", "--max-per-client", "20", "--circuit-breaker", "--trust-proxy", "127.0.0.1",
                "--registry", registry.url, "--heartbeat-interval", "0.5")
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def faults_node() -> Iterator[Proc]:
    """A node of its own for ``/admin/faults``: what the fuzzing sets there (errors, 10-minute latencies) must not
    reach the node whose ``/work`` is fuzzed."""
    proc = Proc("node", "--port", "0", "--id", "faults-node", "--faults", "--admin-token", ADMIN_TOKEN)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def balancer(node: Proc) -> Iterator[Proc]:
    """In front of the node; it believes the test's own address naming its clients, so the node's client headers
    reach the node and are judged there."""
    proc = Proc("balancer", "--port", "0", "--nodes", str(node.port), "--trust-clients", "127.0.0.1/32")
    yield proc
    proc.stop()


def error_shape(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every ``4xx``/``5xx`` is the one JSON error shape and names its own status (beside the schema check,
    so an undocumented error status is judged too)."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])[0]
    assert content_type.startswith("application/json"), f"error {response.status_code} is {content_type!r}"
    body = json.loads(response.content)
    assert set(body) == {"error"}, body
    error = body["error"]
    assert error["status"] == response.status_code, body
    assert isinstance(error["code"], str) and error["code"] and isinstance(error["message"], str), body
    return True


def test_the_error_shape_check_refuses_any_other_error() -> None:
    class Response:
        status_code = 400
        headers = {"content-type": ["application/json"]}
        content = b'{"error": {"status": 400, "code": "bad_json", "message": "..."}}'

    assert error_shape(None, Response, None)
    for content_type, body in [("text/plain", b"400: Bad Request"),
                               ("application/json", b'{"error": {"status": 500, "code": "x", "message": ""}}'),
                               ("application/json", b'{"error": {"status": 400, "code": "", "message": ""}}'),
                               ("application/json", b'{"error": {"status": 400, "code": "x"}}'),
                               ("application/json", b'{"detail": "bad"}')]:
        Response.headers, Response.content = {"content-type": [content_type]}, body
        with pytest.raises((AssertionError, KeyError)):
            error_shape(None, Response, None)


CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection, error_shape]


def described(description: dict[str, Any]) -> Any:
    """``description`` as Schemathesis reads it, from a JSON round trip (Schemathesis writes into what it loads)."""
    return schemathesis.openapi.from_dict(json.loads(json.dumps(description)))


# What each process serves: the node with every feature but the faults admin, the faults node with it and a token.
DESCRIPTIONS = {"node": node_description(), "faults_node": node_description(faults=True, admin_token=True),
                "registry": registry_description(), "token_registry": registry_description(token=True),
                "balancer": balancer_description()}
NODE_API = described(DESCRIPTIONS["node"])
FAULTS_API = described(DESCRIPTIONS["faults_node"]).include(path="/admin/faults")
REGISTRY_API = described(DESCRIPTIONS["registry"])
REGISTRY_WRITES_API = described(DESCRIPTIONS["token_registry"]).include(method="POST")
BALANCER_API = described(DESCRIPTIONS["balancer"]).exclude(path="/dashboard/events")  # a stream never ends
# The node's API through the balancer: everything but the paths the balancer answers itself.
PROXIED_API = described(DESCRIPTIONS["node"]).exclude(path=list(BALANCER_API.raw_schema["paths"]))


@pytest.mark.parametrize("process", list(DESCRIPTIONS))
def test_each_process_serves_a_valid_openapi_3_description(process: str, request: pytest.FixtureRequest) -> None:
    proc: Proc = request.getfixturevalue(process)
    status, headers, body = http(proc.url + "/openapi.json")
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert body["openapi"] == OPENAPI_VERSION
    schema = schemathesis.openapi.from_url(proc.url + "/openapi.json", timeout=CALL_TIMEOUT_S)
    schema.validate()  # against the OpenAPI 3.1 meta-schema
    assert all(operation.ok() for operation in schema.get_all_operations())
    assert body == json.loads(json.dumps(DESCRIPTIONS[process])), "it serves another description than is fuzzed"


def allowed_address(case: Any) -> None:
    """A registration the fuzzing means to be valid gets an address this registry admits (loopback, as it is
    bound to loopback), so registrations succeed too and their answers are checked; the port follows the id."""
    body = case.body
    if (case.operation.label == "POST /register" and case.meta is not None and case.meta.generation.mode.is_positive
            and isinstance(body, dict) and isinstance(body.get("id"), str)):
        body["address"] = f"http://127.0.0.1:{20000 + zlib.crc32(body['id'].encode()) % 40000}"


@NODE_API.parametrize()
@FUZZ
def test_node_api(case: Any, node: Proc) -> None:
    case.call_and_validate(base_url=node.url, checks=[*CHECKS, unsupported_method], timeout=CALL_TIMEOUT_S)


@FAULTS_API.parametrize()
@FUZZ
def test_node_faults_api(case: Any, faults_node: Proc) -> None:
    # ignored_auth: the same request without the token, and with a wrong one, must be refused (401).
    case.call_and_validate(base_url=faults_node.url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
                           checks=[*CHECKS, unsupported_method, ignored_auth], timeout=CALL_TIMEOUT_S)


@REGISTRY_API.parametrize()
@FUZZ
def test_registry_api(case: Any, registry: Proc) -> None:
    allowed_address(case)
    case.call_and_validate(base_url=registry.url, checks=[*CHECKS, unsupported_method], timeout=CALL_TIMEOUT_S)


@REGISTRY_WRITES_API.parametrize()
@FUZZ
def test_registry_writes_want_the_token(case: Any, token_registry: Proc) -> None:
    # ignored_auth: the same request without the token, and with a wrong one, must be refused (401).
    allowed_address(case)
    case.call_and_validate(base_url=token_registry.url, headers={"Authorization": f"Bearer {REGISTRY_TOKEN}"},
                           checks=[*CHECKS, ignored_auth], timeout=CALL_TIMEOUT_S)


def test_registry_workflows_follow_the_links(empty_registry: Proc) -> None:
    """Register, then heartbeat and deregister with the lease it gave (the description's links), in chains.

    Each chain starts from an empty registry (its own process, and each chain deregisters what it registered
    when it ends), so Hypothesis, which replays chains, sees the same answers to the same requests."""
    registry = empty_registry

    class Workflows(REGISTRY_API.as_state_machine()):  # type: ignore[misc]
        def setup(self) -> None:
            self.leases: dict[str, str] = {}

        def before_call(self, case: Any) -> None:
            allowed_address(case)

        def after_call(self, response: Any, case: Any) -> None:
            if case.operation.label == "POST /register" and response.status_code in (200, 201):
                self.leases[case.body["id"]] = response.json()["lease"]

        def teardown(self) -> None:
            for node_id, lease in self.leases.items():
                http(registry.url + "/deregister", "POST", {"id": node_id}, headers={"X-Lease": lease})

        def get_call_kwargs(self, case: Any) -> dict[str, Any]:
            return {"base_url": registry.url, "timeout": CALL_TIMEOUT_S}

        def validate_response(self, response: Any, case: Any, additional_checks: Any = None, **kwargs: Any) -> None:
            case.validate_response(response, checks=CHECKS, transport_kwargs=kwargs)

    Workflows.run(settings=settings(FUZZ, stateful_step_count=STEPS))


@BALANCER_API.parametrize()
@FUZZ
def test_balancer_api(case: Any, balancer: Proc) -> None:
    # Not unsupported_method: the balancer proxies every method it does not answer itself (POST /lb-stats
    # reaches the node, which answers 404), as its description says.
    case.call_and_validate(base_url=balancer.url, checks=CHECKS, timeout=CALL_TIMEOUT_S)


@PROXIED_API.parametrize()
@FUZZ
def test_node_api_through_the_balancer(case: Any, balancer: Proc) -> None:
    """The proxy path keeps the node's contract: statuses, headers and bodies come through as documented."""
    case.call_and_validate(base_url=balancer.url, checks=[*CHECKS, unsupported_method], timeout=CALL_TIMEOUT_S)
