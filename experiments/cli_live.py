"""``testbed node``, ``registry``, ``balancer`` (alias ``load-balancer``) and ``testbed live run``."""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import click

from core._validate import ConfigError
from core.scenario import BalancerSpec, BreakerSpec, Scenario
from core.strategies import STRATEGIES
from experiments.options import (
    TESTBED_COMMAND, ScenarioParam, apply_overrides, echo_notice, echo_notices, impl_option, run_options,
    write_json,
)
from live.limits import DEFAULT_MAX_IN_FLIGHT

if TYPE_CHECKING:
    from live.node import NodeConfig

__all__ = ["EXIT_GENERATOR_BEHIND", "balancer_command", "compare_live", "live_group", "node_command",
           "node_config", "registry_command", "run_live_scenario"]

#: ``testbed live run`` exit status when the load generator fell behind the asked load.
EXIT_GENERATOR_BEHIND = 4


class URL(click.ParamType):
    name = "URL"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        text = str(value).strip()
        if not text.startswith(("http://", "https://")) or len(text.split("://", 1)[1].strip("/")) == 0:
            self.fail(f"{value!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:5000)", param, ctx)
        return text.rstrip("/")


class NodeList(click.ParamType):
    name = "NODES"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):
            return value
        from live.balancer import parse_node
        items = [v for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("needs at least one node (e.g. 5001,5002,5003)", param, ctx)
        try:
            urls = tuple(parse_node(v) for v in items)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        return tuple(dict.fromkeys(urls))


def _common(f):
    for option in reversed([
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--shutdown-timeout", type=click.FloatRange(0, 600), default=10.0, show_default=True,
                     help="Seconds in-flight requests get to finish on SIGINT/SIGTERM."),
    ]):
        f = option(f)
    return f


@click.command("node")
@click.option("--port", type=click.IntRange(0, 65535), default=5001, show_default=True, help="0 picks a free port.")
@click.option("--id", "node_id", default=None, help="Node id [default: node-PORT].")
@_common
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
@click.option("--trust-proxy", default="", metavar="IPS",
              help="Comma-separated peer addresses whose X-Client-ID / X-Forwarded-For name the client.")
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
@click.option("--error-rate", type=click.FloatRange(0, 1), default=0.0, show_default=True,
              help="Fraction of work requests that fail with 500.")
@click.option("--extra-latency-ms", type=click.FloatRange(0, 600_000), default=0.0, show_default=True)
@click.option("--seed", type=click.IntRange(0), default=None, help="Seed of the service-time generator.")
@click.option("--stream", type=click.IntRange(0), default=None,
              help="Draw from child stream N of --seed (testbed live run gives each node its simulated twin's).")
@impl_option
def node_command(port: int, node_id: str | None, host: str, shutdown_timeout: float, trust_proxy: str,
                 **options: Any) -> None:
    """A node: GET /health, /work, /stats, /queue-stats, /circuit-status, /discovery-status, /peers, /metrics."""
    from live.node import listening, make_node_app
    from live.serve import serve

    config = node_config(port=port, node_id=node_id, host=host, trust_proxy=trust_proxy, **options)
    app = make_node_app(config)
    raise SystemExit(serve(app, host, port, name=config.node_id, shutdown_timeout=shutdown_timeout,
                           on_listening=lambda bound: listening(app, bound)))


def node_config(*, port: int, node_id: str | None, host: str, trust_proxy: str, **options: Any) -> NodeConfig:
    """The node's configuration from ``testbed node``'s parameters; bad combinations are usage errors."""
    from live.node import NodeConfig

    impl = options.pop("impl")
    # The rate limiter is the only exercise a node runs, and only with --rate-limit.
    limiter_cls = echo_notice("rate-limiter", impl) if options["rate_limit"] is not None else None
    config = NodeConfig(
        node_id=node_id or f"node-{port}", host=host, port=port, load_factor_ms=options.pop("load_factor"),
        rate_limit_per_s=options.pop("rate_limit"), rate_limit_burst=options.pop("burst"),
        recovery_timeout_s=options.pop("recovery_timeout"), heartbeat_interval_s=options.pop("heartbeat_interval"),
        trust_proxy=tuple(ip.strip() for ip in trust_proxy.split(",") if ip.strip()), limiter_cls=limiter_cls,
        **options)
    if config.stream is not None and config.seed is None:
        raise click.UsageError("--stream picks a child stream of --seed; give --seed too")
    try:
        config.spec  # the scenario's node type checks every value, the breaker's rules included
    except ConfigError as exc:
        raise click.UsageError(f"--{exc.field.replace('_', '-')} {exc.value}: must be {exc.allowed}") from None
    return config


@click.command("registry")
@click.option("--port", type=click.IntRange(0, 65535), default=5000, show_default=True, help="0 picks a free port.")
@_common
@click.option("--ttl", type=click.FloatRange(0.1, 3600), default=5.0, show_default=True,
              help="Seconds without a heartbeat before a node is dead (removed after as long again).")
@click.option("--token", envvar="TESTBED_REGISTRY_TOKEN", default=None, show_envvar=True,
              help="Require 'Authorization: Bearer TOKEN' on writes.")
def registry_command(port: int, host: str, shutdown_timeout: float, ttl: float, token: str | None) -> None:
    """The service registry: POST /register, /heartbeat/{id}, /deregister; GET /nodes, /health, /metrics."""
    from live.registry import make_registry_app
    from live.serve import serve
    raise SystemExit(serve(make_registry_app(ttl_s=ttl, token=token), host, port, name="registry",
                           shutdown_timeout=shutdown_timeout))


@click.command("balancer")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0 picks a free port.")
@_common
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
@impl_option
def balancer_command(port: int, host: str, shutdown_timeout: float, nodes: tuple[str, ...] | None,
                     registry: str | None, strategy: str, health_interval: float, unhealthy_after: int,
                     refresh_interval: float, timeout: float, eject_after: int,
                     ejection_time: float, no_retry: bool, seed: int | None, impl: str) -> None:
    """The load balancer: proxies everything; GET /lb-stats and /metrics are its own."""
    from live.balancer import BalancerConfig, make_balancer_app
    from live.serve import serve

    if not nodes and not registry:
        raise click.UsageError("give --nodes (e.g. 5001,5002,5003) or --registry URL")
    from solutions.impl import strategy_class

    # Least connections is the only exercise a balancer runs, and only as its strategy.
    strategy_cls = (echo_notice("least-connections", impl) if strategy == "least_connections"
                    else strategy_class(strategy))
    config = BalancerConfig(host=host, port=port, nodes=nodes or (), registry=registry, strategy=strategy,
                            health_interval_s=health_interval, unhealthy_after=unhealthy_after,
                            refresh_s=refresh_interval, timeout_s=timeout, eject_after_failures=eject_after,
                            ejection_time_s=ejection_time, retry_connect_failures=not no_retry, seed=seed)
    raise SystemExit(serve(make_balancer_app(config, strategy_cls=strategy_cls), host, port, name="balancer",
                           shutdown_timeout=shutdown_timeout))


class _Bar:
    """A click progress bar over the run's duration, opened on the first report (after the start-up lines)."""

    def __init__(self, duration_s: float, label: str) -> None:
        self.steps = max(1, int(duration_s * 10))
        self.label = label
        self.bar: Any = None
        self.shown = 0

    def __call__(self, elapsed_s: float, sent: int, completed: int, in_flight: int) -> None:
        if self.bar is None:
            self.bar = click.progressbar(length=self.steps, label=self.label, file=sys.stderr,
                                         item_show_func=lambda text: text)
            self.bar.__enter__()
        step = min(self.steps, int(elapsed_s * 10)) - self.shown
        self.shown += max(0, step)
        self.bar.update(max(0, step), f"sent {sent}, answered {completed}, in flight {in_flight}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None


def run_live_scenario(scenario: Any, impl: str, *, label: str | None = None, quiet: bool = False,
                      **limits: Any) -> dict[str, Any]:
    """One live run with a progress bar; a process failure or Ctrl-C ends the command with a clear message.
    ``quiet`` leaves out the lines naming each process started; ``limits`` (``max_in_flight``, ``drain_s``)
    go to :func:`live.run.run_live`."""
    from live.run import LiveRunError, run_live

    bar = _Bar(scenario.duration_s, label or f"live {scenario.balancer.strategy}")
    try:
        return run_live(scenario, command=TESTBED_COMMAND, impl=impl,
                        echo=(lambda text: None) if quiet else click.echo, progress=bar,
                        **limits)
    except KeyboardInterrupt:
        bar.close()
        click.echo("interrupted: every process this run started has been stopped", err=True)
        raise SystemExit(130) from None
    except LiveRunError as exc:
        bar.close()
        raise click.ClickException(f"the live run failed: {exc}") from None
    finally:
        bar.close()


@click.group("live")
def live_group() -> None:
    """Run scenarios for real: a registry, the nodes and a balancer as processes on loopback."""


@live_group.command("run")
@click.argument("scenario", type=ScenarioParam())
@run_options
@click.option("--max-in-flight", type=click.IntRange(1, 1_000_000), default=DEFAULT_MAX_IN_FLIGHT,
              show_default=True,
              help="Requests the load generator keeps outstanding at most; an arrival due while that many are "
                   "outstanding is not sent (counted as 'not sent').")
@click.option("--drain", "drain_s", type=click.FloatRange(0, 3600), default=None,
              help="Seconds to wait for outstanding responses after the duration; what is still out then "
                   "counts as a timeout [default: the scenario's balancer timeout_s + 1, as long as the "
                   "simulator waits].")
def live_run_command(scenario: Any, strategy: str | None, rate: float | None, load: float | None,
                     duration: float | None, seed: int | None, impl: str, json_path: str | None,
                     max_in_flight: int, drain_s: float | None) -> None:
    """Run one scenario live: start its processes on free loopback ports, send its workload
    through the balancer, stop everything, and print the same summary as `testbed sim run`.

    Exit status 4 when the load generator could not offer the asked load (the summary says how far off it was).
    """
    from experiments.report import run_summary

    scenario = apply_overrides(scenario, strategy, rate, load, duration, seed)
    echo_notices(impl, scenario)
    result = run_live_scenario(scenario, impl, max_in_flight=max_in_flight, drain_s=drain_s)
    result["impl"] = impl
    click.echo(run_summary(result))
    write_json(json_path, result)
    if not result["generator"]["kept_up"]:
        raise SystemExit(EXIT_GENERATOR_BEHIND)


def compare_live(scenario: Scenario, mode: str, strategies: list[str], loads: list[float], reps: int,
                  workers: int | None, impl: str, plot: str | None, json_path: str | None) -> None:
    from experiments.compare import aggregate, sweep
    from experiments.report import differences, side_by_side, sweep_table

    if scenario.workload.arrival == "closed":
        raise click.UsageError(f"{scenario.name}: a load sweep needs an open-loop workload (poisson or constant)")
    echo_notices(impl, scenario, strategies)
    points = [(strategy, load) for strategy in strategies for load in loads]
    click.echo(f"{scenario.name}: {len(points)} live run{'s' * (len(points) > 1)} of {scenario.duration_s:g} s "
               f"(capacity {scenario.capacity_per_s:.1f} req/s)"
               + (f", and {len(points) * reps} simulated" if mode == "both" else ""))
    sim_rows: list[dict[str, Any]] = []
    sim_runs: list[dict[str, Any]] = []
    if mode == "both":
        with click.progressbar(length=len(points) * reps, label="simulating", show_pos=True) as bar:
            sim_runs = sweep(scenario, strategies, loads, reps, impl=impl, workers=workers, progress=bar.update)
        sim_rows = aggregate(sim_runs)
    live_runs = []
    for strategy, load in points:
        s = scenario.replace(strategy=strategy).with_load(load)
        result = run_live_scenario(s, impl, label=f"live {strategy} at {load:.2f}", quiet=True)
        result["impl"] = impl
        live_runs.append(result)
    diffs = []
    if mode == "both":
        rows = {(r["strategy"], round(r["load"], 6)): r for r in sim_rows}
        same = {(r["strategy"], round(r["load"], 6)): r for r in sim_runs if r["rep"] == 0}
        for live in live_runs:
            point = (live["strategy"], round(live["load"], 6))
            click.echo(side_by_side(same[point], rows[point], live))
            click.echo()
            diffs.append(differences(same[point], live))
    else:
        click.echo(sweep_table(aggregate(live_runs)))
    behind = [f"{r['strategy']} at {r['load']:.2f}" for r in live_runs if not r["generator"]["kept_up"]]
    if behind:
        click.echo(f"WARNING: the load generator fell behind in: {', '.join(behind)}; "
                   "those live latencies include its own delay")
    if plot:
        from experiments.plot import plot_sweep
        click.echo(f"wrote {plot_sweep(sim_rows, plot, title=f'{scenario.name}: simulated and live', live=live_runs)}")
    write_json(json_path, {"mode": mode, "scenario": scenario.to_dict(), "strategies": strategies, "loads": loads,
                            "reps": reps if mode == "both" else 0, "impl": impl, "sim": {"summary": sim_rows,
                            "runs": sim_runs}, "live": live_runs, "differences": diffs})
