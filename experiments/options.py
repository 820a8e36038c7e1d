"""Command-line options and helpers shared by several ``testbed`` commands (sim, live, compare, check)."""

from __future__ import annotations

import json
import math
import pathlib
import sys
from typing import Any, Sequence

import click

from core.scenario import Scenario, ScenarioError
from core.strategies import STRATEGIES
from core.timeline import MAX_INTERVALS, TIMELINE_NODES, check_interval_s
from solutions.impl import Impl

__all__ = ["EXIT_NOT_IMPLEMENTED", "Interval", "OutputPath", "ScenarioParam", "TESTBED_COMMAND", "apply_overrides",
           "bench_json_option", "check_interval", "draw_run", "echo_notice", "echo_notices", "impl_option",
           "report_options", "run_options", "write_json"]

#: How a live run starts its ``testbed`` processes: this Python and this tree (a copy on PYTHONPATH
#: runs its own code, which is how the grader's live step grades what is on disk).
TESTBED_COMMAND = (sys.executable, "-m", "experiments.cli")

#: Exit status of a command that was told to run an exercise (``--impl exercise``) that is still the stub.
EXIT_NOT_IMPLEMENTED = 3

impl_option = click.option(
    "--impl", type=click.Choice([i.value for i in Impl]), default=Impl.AUTO.value, show_default=True,
    envvar="TESTBED_IMPL", show_envvar=True,
    help="Whose exercise code runs: auto (yours if implemented, else the reference solution), "
         "exercise (yours), solution (the reference).")

class OutputPath(click.ParamType):
    """A file the command will write (``--json``, ``--plot``), checked before any work starts.

    Parent folders are created; the file is opened for appending once (and removed again if
    that created it), so an unwritable place ends the command at once with the reason, not
    after a long run whose results would then be lost.
    """

    name = "PATH"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> str | None:
        if value is None or str(value) == "":
            return None  # "--plot ''": no output
        path = pathlib.Path(value)
        if path.is_dir():
            self.fail(f"{value} is a folder; give a file name", param, ctx)
        existed = path.exists()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with path.open("a"):
                pass
            if not existed:
                path.unlink()
        except OSError as exc:
            self.fail(f"cannot write {value}: {exc.strerror or exc}", param, ctx)
        return str(value)


bench_json_option = click.option(
    "--json", "json_path", type=OutputPath(), default=None,
    help="Also write the figures to this JSON file.")


def echo_notice(exercise: str, impl: str) -> type:
    """Resolve ``exercise`` under ``impl``, say whose code runs (on stderr, so a process's first
    line on stdout stays its "listening on" line) and return the class to run.

    Forcing ``--impl exercise`` on the stub raises ExerciseNotImplemented, which the ``testbed``
    group turns into the stub's own message (what to write, where) and exit status 3.
    """
    from solutions.impl import resolve
    resolution = resolve(exercise, impl)
    click.echo(resolution.notice, err=True)
    return resolution.cls


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


def echo_notices(impl: str, scenario: Scenario, strategies: Sequence[str] = ()) -> None:
    """Say whose exercise code runs, for the exercises that ``scenario`` (under each of
    ``strategies``, or its own) uses; a stub forced with ``--impl exercise`` ends the command (exit 3)."""
    from solutions.impl import uses
    used = {name for strategy in (strategies or [scenario.balancer.strategy])
            for name in uses(scenario.replace(strategy=strategy))}
    for name in sorted(used):
        echo_notice(name, impl)


class Interval(click.ParamType):
    """A timeline's interval: a finite number of seconds above 0."""

    name = "SECONDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        try:
            seconds = float(value)
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"{value} is not a timeline interval: give a number of seconds above 0, like 1 or 0.5",
                      param, ctx)
        return seconds


def check_interval(interval_s: float | None, duration_s: float) -> None:
    """A usage error, before the run, for an interval core's timeline refuses
    (:func:`core.timeline.check_interval_s`: its message names the smallest interval that works). None (the
    default interval, :func:`core.timeline.default_interval_s`) always fits."""
    if interval_s is None:
        return
    try:
        check_interval_s(interval_s, duration_s)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--interval") from None


def report_options(f: Any) -> Any:
    """``--interval``, ``--timeline-nodes``, ``--plot`` and ``--report``: a run's timeline, drawn and reported
    (``testbed sim run`` and ``testbed live run`` alike)."""
    for option in reversed([
        click.option("--interval", type=Interval(), default=None,
                     help="Seconds per interval of the run's timeline (the \"timeline\" in --json, --plot and "
                          f"--report); at most {MAX_INTERVALS:,} intervals a run. [default: 1, or for a run "
                          f"longer than {MAX_INTERVALS:,} s the first of 2, 5, 10, 20, 50, ... that fits]"),
        click.option("--timeline-nodes", type=click.IntRange(0, 100_000), default=TIMELINE_NODES, show_default=True,
                     help="Keep per-node timeline series for runs of at most this many nodes; a run over more keeps "
                          "the overall series only (\"nodes_omitted\" says how many)."),
        click.option("--plot", type=OutputPath(), default=None,
                     help="Draw the run's timeline to this PNG: latency, throughput, failures by kind, each "
                          "node's share, in-flight and utilization over time, with faults and state changes."),
        click.option("--report", type=OutputPath(), default=None,
                     help="Write one self-contained HTML file here (opens offline): the summary tables, the "
                          "timeline figure and every state change."),
    ]):
        f = option(f)
    return f


def draw_run(result: dict[str, Any], plot: str | None, report: str | None) -> None:
    """Write one run's ``--plot`` and ``--report`` (either may be None) and say so."""
    title = (f"{result['scenario']}: {result['strategy']}, seed {result['seed']}, "
             f"{'simulated' if result.get('mode') == 'sim' else result.get('mode', 'run')}")
    if plot:
        from experiments.timeline_plot import plot_timeline
        plot_timeline([result], plot, title=title)
        click.echo(f"wrote {plot}")
    if report:
        from experiments.html_report import write_report
        write_report(report, [result], title=title)
        click.echo(f"wrote {report}")
