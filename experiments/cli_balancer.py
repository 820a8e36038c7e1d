"""``testbed balancer`` (alias ``load-balancer``): the load balancer process."""

from __future__ import annotations

import ipaddress
from typing import Any

import click

from core.scenario import BalancerSpec
from core.strategies import STRATEGIES
from experiments.options import echo_notice, impl_option
from experiments.server_options import URL, AllowBackends, NodeList, serve_app, server_options

__all__ = ["balancer_command"]


class ByteSize(click.ParamType):
    """A size in bytes: ``16777216``, ``16MiB``, ``512KiB``, ``1GiB`` (also ``k``/``M``/``G``, powers of 1024)."""

    name = "BYTES"
    _UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2, "g": 1024 ** 3, "gib": 1024 ** 3}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip()
        digits = text.rstrip("kKmMgGiIbB")
        unit = self._UNITS.get(text[len(digits):].lower())
        if not digits.isdigit() or unit is None:
            self.fail(f"{value!r} is not a size (e.g. 16777216, 16MiB, 512KiB)", param, ctx)
        return int(digits) * unit


class CIDRList(click.ParamType):
    """Comma-separated IP networks: ``127.0.0.1/32,10.0.0.0/8`` (a bare address is a /32 or /128)."""

    name = "CIDR,..."

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        networks = []
        for item in (v.strip() for v in str(value).split(",")):
            if not item:
                continue
            try:
                networks.append(str(ipaddress.ip_network(item, strict=False)))
            except ValueError:
                self.fail(f"{item!r} is not an IP network (e.g. 127.0.0.1/32 or 10.0.0.0/8)", param, ctx)
        return tuple(networks)


@click.command("balancer")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@server_options
@click.option("--nodes", type=NodeList(), default=None, help="Backends: ports, host:port or URLs, comma-separated.")
@click.option("--registry", type=URL(), default=None, help="Take the backends from this registry.")
@click.option("--strategy", type=click.Choice(list(STRATEGIES)), default="round_robin", show_default=True)
@click.option("--health-interval", type=click.FloatRange(0.05, 60), default=BalancerSpec.health_check_interval_s,
              show_default=True,
              help="Seconds between active /health checks of each backend.")
@click.option("--unhealthy-after", type=click.IntRange(1, 100), default=BalancerSpec.unhealthy_after,
              show_default=True,
              help="Failed checks in a row that take a backend out (a refused connection counts as one).")
@click.option("--refresh-interval", type=click.FloatRange(0.05, 60), default=2.0, show_default=True,
              help="Seconds between polls of the registry's node list (with --registry).")
@click.option("--timeout", type=click.FloatRange(0.01, 3600), default=BalancerSpec.timeout_s, show_default=True,
              help="Per-request timeout in seconds (504 past it).")
@click.option("--eject-after", type=click.IntRange(0), default=BalancerSpec.eject_after_failures, show_default=True,
              help="Consecutive 5xx/connection failures that take a backend out (0: never).")
@click.option("--ejection-time", type=click.FloatRange(0, min_open=True), default=BalancerSpec.ejection_time_s,
              show_default=True)
@click.option("--no-retry", is_flag=True, help="Do not retry refused connections on another backend.")
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the strategy's generator.")
@click.option("--max-body", type=ByteSize(), default="16MiB", show_default=True,
              help="Largest request body proxied (bytes; 16MiB, 512KiB also work): a larger Content-Length is "
                   "refused with 413 before anything is sent; a chunked body is cut off there (413, the upstream "
                   "exchange aborted).")
@click.option("--trust-clients", type=CIDRList(), default="", show_default="none",
              help="Networks whose clients may name themselves: their X-Client-ID passes and their "
                   "X-Forwarded-For is extended. From anyone else both are replaced by the peer address.")
@click.option("--health-timeout", type=click.FloatRange(0.01, 60), default=None,
              show_default="half of --health-interval",
              help="Seconds a /health check may take before it counts as failed (at most --health-interval).")
@click.option("--health-concurrency", type=click.IntRange(1, 1024), default=32, show_default=True,
              help="Health checks running at once; the others wait their turn.")
@click.option("--stall-after", type=click.FloatRange(0), default=None, show_default="--health-timeout",
              help="A backend holding requests and silent this long (or --stall-factor latency EWMAs, if "
                   "longer) is ejected for --ejection-time (0: never).")
@click.option("--stall-factor", type=click.FloatRange(1, 1000), default=10.0, show_default=True,
              help="See --stall-after.")
@click.option("--max-backends", type=click.IntRange(1, 1_000_000), default=1000, show_default=True,
              help="Backends followed at most; newer registry members past it are left out (one WARNING "
                   "per poll, counted in /lb-stats).")
@click.option("--allow-backends", type=AllowBackends(), default=None,
              show_default="loopback when --host is loopback, else all but link-local/metadata",
              help="Networks a backend's address may resolve into, comma-separated CIDRs, or 'any'. A --nodes "
                   "backend outside them is a usage error; a registry member is skipped with a WARNING.")
@click.option("--warmup-timeout", type=click.FloatRange(0, 3600), default=2.0, show_default=True,
              help="Seconds the balancer may spend at start learning its backends (the first registry listing, "
                   "one round of health checks) before it listens; past it, it listens anyway with one WARNING "
                   "(0: listen at once).")
@click.option("--max-response-header-bytes", type=ByteSize(), default="64KiB", show_default=True,
              help="Largest response head a backend may send (bytes, status line and interim 1xx heads "
                   "included); past it the exchange is dropped and the client gets 502 backend_error.")
@click.option("--max-response-headers", type=click.IntRange(1, 10_000), default=100, show_default=True,
              help="Most header fields in a backend's response; past it the client gets 502 backend_error.")
@click.option("--dashboard-max-streams", type=click.IntRange(0, 10_000), default=8, show_default=True,
              help="Open /dashboard/events streams at most; past it 503 dashboard_busy (0: no dashboard "
                   "streams).")
@click.option("--events-kept", type=click.IntRange(1, 1_000_000), default=4096, show_default=True,
              help="State changes (health flips, ejector transitions) GET /lb-events keeps, the newest; a reader "
                   "that fell further behind is told how many it missed.")
@impl_option
def balancer_command(port: int, host: str, nodes: tuple[str, ...] | None,
                     registry: str | None, strategy: str, health_interval: float, unhealthy_after: int,
                     refresh_interval: float, timeout: float, eject_after: int,
                     ejection_time: float, no_retry: bool, seed: int | None, impl: str,
                     max_body: int, trust_clients: tuple[str, ...], health_timeout: float | None,
                     health_concurrency: int, stall_after: float | None, stall_factor: float, max_backends: int,
                     allow_backends: str | None, warmup_timeout: float, max_response_header_bytes: int,
                     max_response_headers: int, dashboard_max_streams: int, events_kept: int) -> None:
    """The load balancer: proxies everything; GET /lb-stats, /lb-events (health flips and ejector moves),
    /metrics, /dashboard and /openapi.json are its own."""
    from live.balancer import STATE, BalancerConfig, make_balancer_app

    if not nodes and not registry:
        raise click.UsageError("give --nodes (e.g. 5001,5002,5003) or --registry URL")
    from solutions.impl import strategy_class

    # Least connections is the only exercise a balancer runs, and only as its strategy.
    strategy_cls = (echo_notice("least-connections", impl) if strategy == "least_connections"
                    else strategy_class(strategy))
    config = BalancerConfig(host=host, port=port, nodes=nodes or (), registry=registry, strategy=strategy,
                            health_interval_s=health_interval, unhealthy_after=unhealthy_after,
                            refresh_s=refresh_interval, timeout_s=timeout, eject_after_failures=eject_after,
                            ejection_time_s=ejection_time, retry_connect_failures=not no_retry, seed=seed,
                            max_body_bytes=max_body, trust_clients=trust_clients,
                            health_timeout_s=health_timeout, health_concurrency=health_concurrency,
                            stall_after_s=stall_after, stall_factor=stall_factor, max_backends=max_backends,
                            allow_backends=allow_backends, warmup_timeout_s=warmup_timeout,
                            max_response_header_bytes=max_response_header_bytes,
                            max_response_headers=max_response_headers, events_kept=events_kept)
    from core.addresses import AddressError
    from live.backends import check_nodes, listening

    if max_response_header_bytes < 1:
        raise click.UsageError("--max-response-header-bytes must be at least 1 byte")
    if health_timeout is not None and health_timeout > health_interval:
        raise click.UsageError(f"--health-timeout {health_timeout:g} is longer than --health-interval "
                               f"{health_interval:g}: a check must end before the next one is due")
    try:
        check_nodes(config)  # every --nodes backend in the allowed networks, none of them this balancer
    except AddressError as exc:
        raise click.UsageError(str(exc)) from None
    from live.dashboard import DashboardConfig

    app = make_balancer_app(config, strategy_cls=strategy_cls,
                            dashboard=DashboardConfig(max_streams=dashboard_max_streams))
    lb = app[STATE]
    serve_app(app, port, name="balancer", on_listening=lambda bound: listening(lb, bound))
