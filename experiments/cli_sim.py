"""``testbed sim run``, ``testbed sim compare`` and ``testbed compare``."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Sequence

import click

from core.scenario import Scenario, ScenarioError
from core.strategies import STRATEGIES
from experiments.options import OutputPath, echo_notice, impl_option

__all__ = ["ScenarioParam", "apply_overrides", "compare_command", "echo_notices", "run_options", "sim_group",
           "write_json"]

DEFAULT_LOADS = "0.3,0.5,0.7,0.8,0.9"
DEFAULT_STRATEGIES = "round_robin,least_connections"


class ScenarioParam(click.ParamType):
    """A shipped scenario name or a path to a TOML file, loaded and validated."""

    name = "SCENARIO"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Scenario:
        if isinstance(value, Scenario):
            return value
        from experiments.scenarios import load
        try:
            return load(value)
        except ScenarioError as exc:
            self.fail(str(exc), param, ctx)


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


def write_json(path: str | None, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` (parents created) and say so; nothing without a path."""
    if path:
        p = pathlib.Path(path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps(data, indent=2) + "\n")
        click.echo(f"wrote {p}")


def apply_overrides(scenario: Scenario, strategy: str | None, rate: float | None, load: float | None,
               duration: float | None, seed: int | None) -> Scenario:
    """The scenario with ``--strategy/--rate/--load/--duration/--seed`` applied; bad combinations are usage errors."""
    if rate is not None and load is not None:
        raise click.UsageError("give --rate or --load, not both")
    if scenario.workload.arrival == "closed" and (rate is not None or load is not None):
        raise click.UsageError(f"{scenario.name} is a closed loop: its load is set by clients and think_time_ms, "
                               "not by --rate or --load")
    try:
        scenario = scenario.replace(strategy=strategy, rate_per_s=rate, duration_s=duration, seed=seed)
        if load is not None:
            scenario = scenario.with_load(load)
    except ScenarioError as exc:
        raise click.UsageError(str(exc)) from None
    return scenario


def run_options(f):
    """The options ``sim run`` and ``live run`` share."""
    for option in reversed([
        click.option("--strategy", type=click.Choice(list(STRATEGIES)), help="Override the scenario's strategy."),
        click.option("--rate", type=click.FloatRange(min=0, min_open=True),
                     help="Override the arrival rate (requests/s)."),
        click.option("--load", type=click.FloatRange(0, 2, min_open=True),
                     help="Set the arrival rate to this fraction of the total capacity instead."),
        click.option("--duration", type=click.FloatRange(min=0, min_open=True), help="Override duration_s."),
        click.option("--seed", type=click.IntRange(min=0), help="Override the seed."),
        impl_option,
        click.option("--json", "json_path", type=OutputPath(), help="Write the results JSON here."),
    ]):
        f = option(f)
    return f


@click.group("sim")
def sim_group() -> None:
    """Simulate scenarios with the SimPy model (same core objects as the live runtime)."""


@sim_group.command("run")
@click.argument("scenario", type=ScenarioParam())
@run_options
def sim_run(scenario: Scenario, strategy: str | None, rate: float | None, load: float | None,
            duration: float | None, seed: int | None, impl: str, json_path: str | None) -> None:
    """Simulate one scenario and print its summary."""
    from experiments.report import run_summary, scheduled_faults
    from solutions.impl import simulate

    scenario = apply_overrides(scenario, strategy, rate, load, duration, seed)
    echo_notices(impl, scenario)
    result = simulate(scenario, impl)
    result["impl"] = impl
    result.setdefault("faults", scheduled_faults(scenario))
    click.echo(run_summary(result))
    write_json(json_path, result)


def echo_notices(impl: str, scenario: Scenario, strategies: Sequence[str] = ()) -> None:
    """Say whose exercise code runs, for the exercises that ``scenario`` (under each of
    ``strategies``, or its own) uses; a stub forced with ``--impl exercise`` ends the command (exit 3)."""
    from solutions.impl import uses
    used = {name for strategy in (strategies or [scenario.balancer.strategy])
            for name in uses(scenario.replace(strategy=strategy))}
    for name in sorted(used):
        echo_notice(name, impl)


def _sweep(scenario: Scenario, strategies: list[str], loads: list[float], reps: int, workers: int | None,
           impl: str, plot: str | None, json_path: str | None, title: str) -> None:
    from experiments.compare import aggregate, sweep
    from experiments.report import sweep_table

    if scenario.workload.arrival == "closed":
        raise click.UsageError(f"{scenario.name}: a load sweep needs an open-loop workload (poisson or constant)")
    echo_notices(impl, scenario, strategies)
    total = len(strategies) * len(loads) * reps
    click.echo(f"{scenario.name}: {len(strategies)} strategies x {len(loads)} loads x {reps} repetitions "
               f"(seeds {scenario.seed}..{scenario.seed + reps - 1}), capacity {scenario.capacity_per_s:.1f} req/s")
    with click.progressbar(length=total, label="simulating", show_pos=True) as bar:
        results = sweep(scenario, strategies, loads, reps, impl=impl, workers=workers, progress=bar.update)
    rows = aggregate(results)
    click.echo(sweep_table(rows))
    if plot:
        from experiments.plot import plot_sweep
        click.echo(f"wrote {plot_sweep(rows, plot, title=title)}")
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
                         help="Processes to run repetitions in [default: one per core]."),
            impl_option,
            click.option("--plot", type=OutputPath(), default=default_plot, show_default=True,
                         help="Write a PNG of latency against load here."),
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
                workers: int | None, impl: str, plot: str | None, json_path: str | None) -> None:
    """Sweep offered load for each strategy; print p50/p95/p99 and node shares with 95% CIs."""
    if duration is not None:
        scenario = scenario.replace(duration_s=duration)
    _sweep(scenario, strategies, loads, reps, workers, impl, plot, json_path,
           title=f"{scenario.name}: response time against offered load")


@click.command("compare")
@click.argument("scenario", type=ScenarioParam(), default="seed")
@click.option("--mode", type=click.Choice(["sim", "live", "both"]), default="sim", show_default=True,
              help="sim: simulate the sweep; live: run each point on real processes; both: each point "
                   "simulated and live, side by side with their differences.")
@_sweep_options("results/compare.png", "results/compare.json", 3)
def compare_command(scenario: Scenario, mode: str, strategies: list[str], loads: list[float], reps: int,
                    duration: float | None, workers: int | None, impl: str, plot: str | None,
                    json_path: str | None) -> None:
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
               title=f"{scenario.name}: {' vs '.join(strategies)}")
        return
    if click.get_current_context().get_parameter_source("loads") is click.core.ParameterSource.DEFAULT:
        loads = [scenario.workload.rate_per_s / scenario.capacity_per_s]  # the scenario as written
    _compare_live(scenario, mode, strategies, loads, reps, workers, impl, plot, json_path)


def _compare_live(scenario: Scenario, mode: str, strategies: list[str], loads: list[float], reps: int,
                  workers: int | None, impl: str, plot: str | None, json_path: str | None) -> None:
    from experiments.cli_live import run_live_scenario
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
