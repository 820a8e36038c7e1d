"""``testbed live run``: a scenario on real processes (the servers' commands are in cli_node, cli_registry,
cli_balancer)."""

from __future__ import annotations

import pathlib
import sys
from typing import Any

import click

from core.scenario import Scenario
from experiments.options import (
    TESTBED_COMMAND, OutputPath, ScenarioParam, apply_overrides, check_interval, draw_run, echo_notices,
    report_options, run_options, write_json,
)
from live.limits import DEFAULT_MAX_IN_FLIGHT

__all__ = ["EXIT_GENERATOR_BEHIND", "compare_live", "live_group", "run_live_scenario", "timeline_path"]

#: ``testbed live run`` exit status when the load generator fell behind the asked load.
EXIT_GENERATOR_BEHIND = 4


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
    ``quiet`` leaves out the lines naming each process started; ``limits`` (``max_in_flight``, ``drain_s``,
    ``dashboard``, ``keep_requests``, ``interval_s``) go to :func:`live.run.run_live`."""
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
@click.option("--dashboard", is_flag=True, default=False,
              help="Print the URL of the balancer's live dashboard (GET /dashboard: open it in a browser) "
                   "before the load starts; it is served while the run lasts.")
@click.option("--keep-requests", type=OutputPath(), default=None,
              help="Also write every request (arrival, node, start, end, outcome) to this .npz; "
                   "numpy.load(PATH)['arrival'].")
@report_options
def live_run_command(scenario: Any, strategy: str | None, rate: float | None, load: float | None,
                     duration: float | None, seed: int | None, impl: str, json_path: str | None,
                     max_in_flight: int, drain_s: float | None, dashboard: bool, keep_requests: str | None,
                     interval: float | None, timeline_nodes: int, plot: str | None, report: str | None) -> None:
    """Run one scenario live: start its processes on free loopback ports, send its workload
    through the balancer, stop everything, and print the same summary as `testbed sim run`.

    The results (--json) hold the run's timeline, in the simulator's schema: per interval, the requests,
    outcomes, latency, in-flight, share and utilization, beside the state changes the processes recorded
    (each node's breaker, the balancer's health checks and ejector, the registry's membership) and the
    scenario's faults. --plot and --report draw it.

    Exit status 4 when the load generator could not offer the asked load (the summary says how far off it was).
    """
    from experiments.report import run_summary

    scenario = apply_overrides(scenario, strategy, rate, load, duration, seed)
    check_interval(interval, scenario.duration_s)
    echo_notices(impl, scenario)
    result = run_live_scenario(scenario, impl, max_in_flight=max_in_flight, drain_s=drain_s, dashboard=dashboard,
                               keep_requests=keep_requests, interval_s=interval,
                               timeline_nodes=timeline_nodes)
    result["impl"] = impl
    click.echo(run_summary(result))
    write_json(json_path, result)
    draw_run(result, plot, report)
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
        if mode == "both":
            _plot_timelines(scenario, plot, [(same[(r["strategy"], round(r["load"], 6))], r) for r in live_runs])
    write_json(json_path, {"mode": mode, "scenario": scenario.to_dict(), "strategies": strategies, "loads": loads,
                            "reps": reps if mode == "both" else 0, "impl": impl, "sim": {"summary": sim_rows,
                            "runs": sim_runs}, "live": live_runs, "differences": diffs})


def timeline_path(plot: str, strategy: str, load: float) -> pathlib.Path:
    """Where ``compare --mode both --plot PLOT`` draws one point's timelines: PLOT's name with
    ``-timeline-STRATEGY-LOAD`` before its suffix (``compare.png`` -> ``compare-timeline-round_robin-0.50.png``)."""
    path = pathlib.Path(plot)
    return path.with_name(f"{path.stem}-timeline-{strategy}-{load:.2f}{path.suffix or '.png'}")


def _plot_timelines(scenario: Scenario, plot: str, pairs: list[tuple[dict[str, Any], dict[str, Any]]]) -> None:
    """One figure per (strategy, load): the simulated run of the point's seed and its live run, overlaid."""
    from experiments.timeline_plot import plot_timeline

    for sim, live in pairs:
        path = timeline_path(plot, live["strategy"], live["load"])
        plot_timeline([sim, live], path, title=f"{scenario.name}: {live['strategy']} at load {live['load']:.2f}, "
                                               f"seed {live['seed']}, simulated and live")
        click.echo(f"wrote {path}")
