"""``testbed sim run``, ``testbed sim compare`` and ``testbed compare``.

A sweep's repetitions run on the local process pool or a Dask cluster
(``--executor``, ``--scheduler``: :mod:`experiments.executors`), with a
progress bar on a terminal (:mod:`experiments.progress`).
"""

from __future__ import annotations

from typing import Any

import click

from core.scenario import Scenario
from core.strategies import STRATEGIES
from experiments.executors import EXECUTORS, ExecutorError, open_executor, scheduler_address
from experiments.options import (
    OutputPath, ScenarioParam, apply_overrides, check_interval, draw_run, echo_notices, impl_option, report_options,
    run_options, write_json,
)

__all__ = ["compare_command", "sim_group"]

DEFAULT_LOADS = "0.3,0.5,0.7,0.8,0.9"
DEFAULT_STRATEGIES = "round_robin,least_connections"


class CommaList(click.ParamType):
    """A comma-separated list of strategy names or of loads in (0, 2]."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.name = "NAMES" if kind == "strategies" else "LOADS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> list:
        if isinstance(value, list):
            return value
        items = [v.strip() for v in str(value).split(",") if v.strip()]
        if not items:
            self.fail("needs at least one value", param, ctx)
        if self.kind == "strategies":
            bad = [v for v in items if v not in STRATEGIES]
            if bad:
                self.fail(f"unknown strategy {bad[0]!r}; choose from: {', '.join(STRATEGIES)}", param, ctx)
            return list(dict.fromkeys(items))
        loads = []
        for v in items:
            try:
                load = float(v)
            except ValueError:
                self.fail(f"{v!r} is not a number", param, ctx)
            if not 0 < load <= 2:
                self.fail(f"{v} is out of range: loads are fractions of capacity in (0, 2]", param, ctx)
            loads.append(load)
        return sorted(set(loads))


class SchedulerAddress(click.ParamType):
    """A Dask scheduler's ``tcp://HOST:PORT``."""

    name = "ADDRESS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str:
        try:
            return scheduler_address(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


quiet_option = click.option("--quiet", "-q", is_flag=True,
                            help="No progress bar (there is none either when stderr is not a terminal).")


@click.group("sim")
def sim_group() -> None:
    """Simulate scenarios with the SimPy model (same core objects as the live runtime)."""


@sim_group.command("run")
@click.argument("scenario", type=ScenarioParam())
@run_options
@quiet_option
@click.option("--keep-requests", type=OutputPath(), default=None,
              help="Also write every request (arrival, node, start, end, outcome) to this .npz as the run "
                   "goes, in bounded memory; numpy.load(PATH)['arrival'].")
@report_options
def sim_run(scenario: Scenario, strategy: str | None, rate: float | None, load: float | None,
            duration: float | None, seed: int | None, impl: str, json_path: str | None, quiet: bool,
            keep_requests: str | None, interval: float | None, timeline_nodes: int, plot: str | None,
            report: str | None) -> None:
    """Simulate one scenario and print its summary; --plot and --report draw how it went over time."""
    from experiments.progress import over_time
    from experiments.report import run_summary, scheduled_faults
    from sim.requests_file import RequestsFileError
    from solutions.impl import simulation

    scenario = apply_overrides(scenario, strategy, rate, load, duration, seed)
    check_interval(interval, scenario.duration_s)
    echo_notices(impl, scenario)
    model = simulation(scenario, impl, interval_s=interval, timeline_nodes=timeline_nodes)
    if keep_requests:
        try:
            model.keep_requests(keep_requests)
        except RequestsFileError as exc:
            raise click.BadParameter(str(exc), param_hint="--keep-requests") from None
    with over_time(f"simulating {scenario.duration_s:g} s", quiet=quiet) as update:
        result = model.run(progress=update).results()
    result["impl"] = impl
    result.setdefault("faults", scheduled_faults(scenario))
    click.echo(run_summary(result))
    write_json(json_path, result)
    draw_run(result, plot, report)


def _executor_kind(executor: str, scheduler: str | None, workers: int | None) -> str:
    """``--executor`` as the options mean it together: ``--scheduler`` alone means dask; the cluster's
    workers are its own, so ``--workers`` does not go with ``--scheduler``."""
    if scheduler is None:
        return executor
    source = click.get_current_context().get_parameter_source("executor")
    if executor != "dask" and source is not click.core.ParameterSource.DEFAULT:
        raise click.UsageError(f"--scheduler runs the sweep on a Dask cluster: it does not go with --executor {executor}")
    if workers is not None:
        raise click.UsageError("--workers sizes a local pool or local cluster; a --scheduler's cluster has its own "
                               "workers (start more with `dask worker`)")
    return "dask"


def _sweep(scenario: Scenario, strategies: list[str], loads: list[float], reps: int, workers: int | None,
           impl: str, plot: str | None, json_path: str | None, title: str, executor: str = "process",
           scheduler: str | None = None, connect_timeout: float = 10.0, quiet: bool = False) -> None:
    from experiments.compare import aggregate, sweep
    from experiments.progress import counting
    from experiments.report import sweep_table

    if scenario.workload.arrival == "closed":
        raise click.UsageError(f"{scenario.name}: a load sweep needs an open-loop workload (poisson or constant)")
    kind = _executor_kind(executor, scheduler, workers)
    echo_notices(impl, scenario, strategies)
    total = len(strategies) * len(loads) * reps
    click.echo(f"{scenario.name}: {len(strategies)} strategies x {len(loads)} loads x {reps} repetitions "
               f"(seeds {scenario.seed}..{scenario.seed + reps - 1}), capacity {scenario.capacity_per_s:.1f} req/s")
    try:
        with open_executor(kind, scheduler=scheduler, workers=workers, connect_timeout_s=connect_timeout,
                           echo=click.echo) as pool, counting(total, "simulating", quiet=quiet) as update:
            results = sweep(scenario, strategies, loads, reps, impl=impl, workers=workers, executor=pool.executor,
                            progress=update, check=pool.check)
    except ExecutorError as exc:
        raise click.ClickException(str(exc)) from None
    rows = aggregate(results)
    click.echo(sweep_table(rows, scenario=scenario))  # theory's values beside, where it has them
    if plot:
        from experiments.plot import plot_sweep
        click.echo(f"wrote {plot_sweep(rows, plot, title=title, scenario=scenario)}")
    write_json(json_path, {"scenario": scenario.to_dict(), "strategies": strategies, "loads": loads,
                            "reps": reps, "seeds": [scenario.seed + r for r in range(reps)], "impl": impl,
                            "summary": rows, "runs": results})


def _sweep_options(default_plot: str | None, default_json: str | None, default_reps: int):
    def decorate(f):
        options = [
            click.option("--strategies", type=CommaList("strategies"), default=DEFAULT_STRATEGIES, show_default=True,
                         help="Comma-separated strategy names."),
            click.option("--loads", type=CommaList("loads"), default=DEFAULT_LOADS, show_default=True,
                         help="Offered loads as fractions of total capacity (sum of workers / service time)."),
            click.option("--reps", type=click.IntRange(1, 1000), default=default_reps, show_default=True,
                         help="Repetitions per point, on seeds seed, seed+1, ..."),
            click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Override duration_s."),
            click.option("--workers", type=click.IntRange(1, 256), default=None,
                         help="Processes to run repetitions in, locally or in --executor dask's local cluster "
                              "[default: one per core]."),
            click.option("--executor", type=click.Choice(EXECUTORS), default="process", show_default=True,
                         help="Where repetitions run: process (this machine's process pool) or dask (a Dask "
                              "cluster: --scheduler's, else a local one on 127.0.0.1). Same numbers either way."),
            click.option("--scheduler", type=SchedulerAddress(), default=None,
                         help="Run repetitions on the Dask cluster whose scheduler is here (implies --executor "
                              "dask; every worker needs this project installed)."),
            click.option("--connect-timeout", type=click.FloatRange(min=0, min_open=True), default=10.0,
                         show_default=True, help="Seconds to reach --scheduler, to wait for its first worker, "
                                                 "and for a new one if every worker has gone."),
            quiet_option,
            impl_option,
            click.option("--plot", type=OutputPath(), default=default_plot, show_default=True,
                         help="Write a PNG of latency against load here. With --mode both (testbed compare), "
                              "also one figure per strategy and load beside it: the simulated and the live "
                              "timeline of the same seed overlaid, named PATH's stem + -timeline-STRATEGY-LOAD."),
            click.option("--json", "json_path", type=OutputPath(), default=default_json,
                         show_default=True, help="Write every run and the summary as JSON here."),
        ]
        for option in reversed(options):
            f = option(f)
        return f
    return decorate


@sim_group.command("compare")
@click.argument("scenario", type=ScenarioParam())
@_sweep_options(None, None, 5)
def sim_compare(scenario: Scenario, strategies: list[str], loads: list[float], reps: int, duration: float | None,
                workers: int | None, executor: str, scheduler: str | None, connect_timeout: float, quiet: bool,
                impl: str, plot: str | None, json_path: str | None) -> None:
    """Sweep offered load for each strategy; print p50/p95/p99 and node shares with 95% CIs.

    Repetitions run on this machine's process pool, or on a Dask cluster with --executor dask
    (a local one) or --scheduler tcp://HOST:PORT (yours); the numbers are the same, bit for bit."""
    if duration is not None:
        scenario = scenario.replace(duration_s=duration)
    _sweep(scenario, strategies, loads, reps, workers, impl, plot, json_path,
           title=f"{scenario.name}: response time against offered load", executor=executor, scheduler=scheduler,
           connect_timeout=connect_timeout, quiet=quiet)


@click.command("compare")
@click.argument("scenario", type=ScenarioParam(), default="seed")
@click.option("--mode", type=click.Choice(["sim", "live", "both"]), default="sim", show_default=True,
              help="sim: simulate the sweep; live: run each point on real processes; both: each point "
                   "simulated and live, side by side with their differences.")
@_sweep_options("results/compare.png", "results/compare.json", 3)
def compare_command(scenario: Scenario, mode: str, strategies: list[str], loads: list[float], reps: int,
                    duration: float | None, workers: int | None, executor: str, scheduler: str | None,
                    connect_timeout: float, quiet: bool, impl: str, plot: str | None, json_path: str | None) -> None:
    """The seed's experiment: round robin against least connections on the shipped
    three-node scenario (workers 1, 4, 1; 25 ms per request), simulated across loads.

    With --mode live or both, every (strategy, load) point also runs for real (registry,
    nodes and balancer on loopback, for the scenario's duration each; without --loads,
    at the scenario's own rate). A point takes the scenario's seed, so its live run and
    the first simulated repetition offer the very same arrivals.
    """
    if duration is not None:
        scenario = scenario.replace(duration_s=duration)
    if mode == "sim":
        _sweep(scenario, strategies, loads, reps, workers, impl, plot, json_path,
               title=f"{scenario.name}: {' vs '.join(strategies)}", executor=executor, scheduler=scheduler,
               connect_timeout=connect_timeout, quiet=quiet)
        return
    if executor != "process" or scheduler is not None:
        raise click.UsageError(f"--executor dask and --scheduler go with --mode sim (--mode {mode} runs "
                               "its simulations on this machine)")
    if click.get_current_context().get_parameter_source("loads") is click.core.ParameterSource.DEFAULT:
        loads = [scenario.workload.rate_per_s / scenario.capacity_per_s]  # the scenario as written
    from experiments.cli_live import compare_live
    compare_live(scenario, mode, strategies, loads, reps, workers, impl, plot, json_path)
