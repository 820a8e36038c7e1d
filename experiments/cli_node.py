"""``testbed node``: one node process."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import click

from core._validate import ConfigError
from core.client_key import MAX_CLIENT_ID_BYTES, TrustedProxies
from core.rate_limiter import DEFAULT_MAX_CLIENTS
from core.scenario import BreakerSpec
from experiments.options import echo_notice, impl_option
from experiments.server_options import URL, serve_app, server_options

if TYPE_CHECKING:
    from live.node import NodeConfig

__all__ = ["default_node_id", "node_command", "node_config"]


@click.command("node")
@click.option("--port", type=click.IntRange(0, 65535), default=5001, show_default=True, help="0 picks a free port.")
@click.option("--id", "node_id", default=None, help="Node id [default: node-PORT; with --port 0, node-pidPID].")
@server_options
@click.option("--workers", type=click.IntRange(1, 10_000), default=1, show_default=True,
              help="Requests served at once; the rest wait FIFO.")
@click.option("--load-factor", type=click.FloatRange(0, 600_000), default=0.0, show_default=True,
              help="Mean service time of GET /work, in milliseconds.")
@click.option("--service", type=click.Choice(["exponential", "deterministic"]), default="exponential",
              show_default=True, help="Service-time distribution.")
@click.option("--work-mode", type=click.Choice(["sleep", "cpu"]), default="sleep", show_default=True,
              help="sleep: hold a worker while waiting; cpu: burn CPU for the service time.")
@click.option("--rate-limit", type=click.FloatRange(0, min_open=True), default=None,
              help="Per-client token bucket: requests per second.")
@click.option("--burst", type=click.FloatRange(1), default=None, help="Bucket capacity [default: the rate].")
@click.option("--max-clients", type=click.IntRange(1), default=DEFAULT_MAX_CLIENTS, show_default=True,
              help="Rate-limiter buckets kept at most; past it the least recently used client is forgotten "
                   "(it comes back with a full bucket). About 500 bytes each at most.")
@click.option("--max-client-id-bytes", type=click.IntRange(1, 8190), default=MAX_CLIENT_ID_BYTES, show_default=True,
              help="Longest X-Client-ID (from a --trust-proxy peer) the node keys on; longer is a 400.")
@click.option("--trust-proxy", default="", metavar="IPS",
              help="Comma-separated IPs and CIDR networks (127.0.0.1,10.0.0.0/8) of proxies whose X-Client-ID "
                   "names the client, and whose X-Forwarded-For is read from the right up to the first hop "
                   "that is not one of them.")
@click.option("--backpressure", type=click.IntRange(1), default=None,
              help="At most N requests inside the node (in service plus waiting).")
@click.option("--max-per-client", type=click.IntRange(1), default=None,
              help="Client bulkhead: at most N requests of one client inside the node (429 past it).")
@click.option("--circuit-breaker", is_flag=True, help="Guard the work with a circuit breaker.")
@click.option("--failure-threshold", type=click.IntRange(1), default=BreakerSpec.failure_threshold, show_default=True)
@click.option("--recovery-timeout", type=click.FloatRange(0, min_open=True), default=BreakerSpec.recovery_timeout_s,
              show_default=True,
              help="Seconds the breaker stays open before probing.")
@click.option("--half-open-max-calls", type=click.IntRange(1), default=BreakerSpec.half_open_max_calls,
              show_default=True,
              help="Probe requests the breaker lets through when half-open.")
@click.option("--success-threshold", type=click.IntRange(1), default=BreakerSpec.success_threshold,
              show_default=True,
              help="Successful probes that close the breaker again.")
@click.option("--downstream", type=URL(), default=None, help="Call this URL as part of the work (breaker-guarded).")
@click.option("--registry", type=URL(), default=None,
              help="Register and heartbeat with this registry (with --port 0, once the port is known).")
@click.option("--registry-token", envvar="TESTBED_REGISTRY_TOKEN", default=None, show_envvar=True)
@click.option("--heartbeat-interval", type=click.FloatRange(0.05, 60), default=2.0, show_default=True)
@click.option("--advertise", type=URL(), default=None, help="Address to register [default: http://HOST:PORT].")
@click.option("--faults", "faults_admin", is_flag=True, help="Enable GET/POST/DELETE /admin/faults.")
@click.option("--admin-token", envvar="TESTBED_ADMIN_TOKEN", default=None, show_envvar=True, metavar="TOKEN",
              help="With --faults, /admin/faults wants 'Authorization: Bearer TOKEN' (401 otherwise).")
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of work requests that fail with 500.")
@click.option("--extra-latency-ms", type=click.FloatRange(0, 600_000), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the service-time generator.")
@click.option("--stream", type=click.IntRange(0), default=None,
              help="Draw from child stream N of --seed (testbed live run gives each node its simulated twin's).")
@impl_option
def node_command(port: int, node_id: str | None, host: str, trust_proxy: str,
                 **options: Any) -> None:
    """A node: GET /health, /work, /stats, /queue-stats, /circuit-status, /discovery-status, /peers, /metrics."""
    from live.node import listening, make_node_app

    config = node_config(port=port, node_id=node_id, host=host, trust_proxy=trust_proxy, **options)
    if config.faults_admin and not config.admin_token and not _loopback(host):
        click.echo(f"WARNING: /admin/faults is open to anyone who reaches {host}; give --admin-token "
                   "(or TESTBED_ADMIN_TOKEN), or listen on 127.0.0.1", err=True)
    app = make_node_app(config)
    serve_app(app, port, name=config.node_id, on_listening=lambda bound: listening(app, bound))


def _loopback(host: str) -> bool:
    import ipaddress
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_node_id(port: int) -> str:
    """``node-PORT``; with ``--port 0`` the port is not known yet, and ``node-0`` for every such node would make
    them one id to the registry (the second gets 409), so the process id names it instead."""
    return f"node-{port}" if port else f"node-pid{os.getpid()}"


def node_config(*, port: int, node_id: str | None, host: str, trust_proxy: str, **options: Any) -> NodeConfig:
    """The node's configuration from ``testbed node``'s parameters; bad combinations are usage errors."""
    from live.node import NodeConfig

    impl = options.pop("impl")
    # The rate limiter is the only exercise a node runs, and only with --rate-limit.
    limiter_cls = echo_notice("rate-limiter", impl) if options["rate_limit"] is not None else None
    try:
        TrustedProxies.parse(trust_proxy)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'--trust-proxy'") from None
    token = options.get("admin_token")
    if token is not None and not (0 < len(token) <= 512 and token.isascii() and token.isprintable()
                                  and " " not in token):
        raise click.BadParameter("must be 1 to 512 visible ASCII characters, no spaces (a bearer token)",
                                 param_hint="'--admin-token' / TESTBED_ADMIN_TOKEN")
    if options.get("registry") and not options.get("advertise") and host in ("0.0.0.0", "::", ""):
        raise click.UsageError(f"--host {host or repr('')} listens on every interface, so it is no address to register; "
                               "give --advertise http://ADDRESS:PORT (the address the balancer should use)")
    config = NodeConfig(
        node_id=node_id or default_node_id(port), host=host, port=port, load_factor_ms=options.pop("load_factor"),
        rate_limit_per_s=options.pop("rate_limit"), rate_limit_burst=options.pop("burst"),
        recovery_timeout_s=options.pop("recovery_timeout"), heartbeat_interval_s=options.pop("heartbeat_interval"),
        trust_proxy=tuple(t.strip() for t in trust_proxy.split(",") if t.strip()), limiter_cls=limiter_cls,
        **options)
    if config.stream is not None and config.seed is None:
        raise click.UsageError("--stream picks a child stream of --seed; give --seed too")
    try:
        config.spec  # the scenario's node type checks every value, the breaker's rules included
    except ConfigError as exc:
        raise click.UsageError(f"--{exc.field.replace('_', '-')} {exc.value}: must be {exc.allowed}") from None
    return config
