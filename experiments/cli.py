"""The ``testbed`` command line: one click group, one subcommand per job.

Subcommands live next to what they drive and are only assembled here.
Exit statuses: 0 success, 1 a check failed (or a live run's process failed),
2 bad usage (click's), 3 an exercise forced with ``--impl exercise`` is not
implemented yet, 4 the live load generator could not offer the asked load,
130 interrupted (Ctrl-C; every process started was stopped).
"""

from __future__ import annotations

from typing import Any

import click

from experiments.cli_sim import CommaList
from experiments.options import EXIT_NOT_IMPLEMENTED, bench_json_option, impl_option
from solutions.impl import EXERCISES

EXIT_FAILED = 1
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it), for every subcommand.
EXIT_INTERRUPTED = 130


class TestbedGroup(click.Group):
    """The ``testbed`` group: how every subcommand ends when it does not end normally.

    * An exercise forced with ``--impl exercise`` that is still the stub: the stub's
      own message (what to write, where) and exit status 3, wherever it was met.
    * Ctrl-C: one line and exit status 130 (click's default is "Aborted!" and 1).
    """

    def invoke(self, ctx: click.Context) -> Any:
        from core.exercise import ExerciseNotImplemented
        try:
            return super().invoke(ctx)
        except ExerciseNotImplemented as exc:
            click.echo(f"Error: {exc}", err=True)
            ctx.exit(EXIT_NOT_IMPLEMENTED)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(EXIT_INTERRUPTED)


@click.group(cls=TestbedGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="resilience-testbed")
def main() -> None:
    """resilience-testbed: rate limiting, backpressure, circuit breaking, discovery and
    load balancing, written once and run in simulation and for real."""


@main.command()
@click.argument("exercise", type=click.Choice(["all", *EXERCISES]), default="all")
@impl_option
@click.option("--max-examples", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Hypothesis examples per property.")
@click.option("--no-sim", is_flag=True, help="Skip the simulation step.")
@click.option("--no-live", is_flag=True, help="Skip the live step (a 12 s run on real processes per exercise).")
def check(exercise: str, impl: str, max_examples: int, no_sim: bool, no_live: bool) -> None:
    """Grade the exercises: property suites, then a simulation, then a live run.

    Prints PASS/FAIL per property with the smallest counterexample found, in
    plain words; once every property holds, runs the implementation in the
    simulator beside the reference solution; once that passes, runs it for real
    (least connections in a balancer, the rate limiter in nodes) for a few
    seconds on loopback. Exit status 0 only when all pass; 3 when --impl
    exercise is forced on a method that is still the stub.
    """
    from hypothesis import settings as Settings

    from solutions.grading import CHECK_SETTINGS, grade, render

    settings = Settings(CHECK_SETTINGS, max_examples=max_examples)
    names = list(EXERCISES) if exercise == "all" else [exercise]
    reports = []
    for name in names:
        report = grade(name, impl, settings, simulate=not no_sim, live=not no_live,
                       say=lambda text: click.echo(text, err=True))
        reports.append(report)
        click.echo(render(report))
        click.echo()
    if any(r.not_implemented is not None for r in reports):
        click.echo("Result: not implemented yet (see above); --impl solution runs the reference solution.")
        raise SystemExit(EXIT_NOT_IMPLEMENTED)
    failed = [r.exercise for r in reports if not r.passed]
    if failed:
        click.echo(f"Result: FAILED ({', '.join(failed)})")
        raise SystemExit(EXIT_FAILED)
    click.echo("Result: every check passes")


@main.group()
def bench() -> None:
    """Benchmarks: ratios against peers measured in the same run."""


@bench.command("core")
@click.option("--seconds", type=click.FloatRange(0.01, 60), default=0.3, show_default=True,
              help="Measuring time per case (each case takes the best of 5 rounds of this length).")
@bench_json_option
def bench_core(seconds: float, json_path: str | None) -> None:
    """Cost per call of the core algorithms beside limits and pybreaker."""
    from experiments.bench_core import run

    raise SystemExit(run(seconds=seconds, json_path=json_path, echo=click.echo))


def _node_counts(ctx: click.Context, param: click.Parameter, value: str | None) -> list[int] | None:
    """``--nodes 3,100,1000`` -> [3, 100, 1000]; a bad list is a usage error naming the item."""
    from experiments.bench_sim import parse_node_counts
    try:
        return None if value is None else parse_node_counts(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc), ctx, param) from None


@bench.command("sim")
@click.option("--requests", type=click.IntRange(1000, 10_000_000), default=None,
              help="Arrivals each model simulates per round  [default: 200,000; with --nodes, 60,000 per run].")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Interleaved rounds; the best counts.")
@click.option("--nodes", "sizes", callback=_node_counts, metavar="N,N,...", default=None,
              help="Instead of M/M/4: one-worker nodes at these sizes (e.g. 3,100,1000), every strategy and Ciw's "
                   "routers, requests/s, peak RSS and the ratio to the smallest size.")
@click.option("--strategies", type=CommaList("strategies"), default=None,
              help="With --nodes or --memory: these strategies only  [default: all seven; power_of_two for --memory].")
@click.option("--budget-s", type=click.FloatRange(0.1, 3600), default=None,
              help="With --nodes: wall time one run may take; a run stopped there counts the arrivals it simulated  "
                   "[default: 3].")
@click.option("--memory", "memory_requests", type=click.IntRange(1000, 100_000_000), default=None, metavar="N",
              help="Instead: one run of N arrivals per --nodes size (default 100 nodes) and strategy, in a fresh "
                   "process; prints its peak RSS and requests/s.")
@bench_json_option
@click.pass_context
def bench_sim(ctx: click.Context, requests: int | None, rounds: int, sizes: list[int] | None,
              strategies: list[str] | None, budget_s: float | None, memory_requests: int | None,
              json_path: str | None) -> None:
    """Simulated requests per second of wall time: our model, Ciw, minimal SimPy (M/M/4 at 90%);
    with --nodes, every strategy at every size; with --memory, the peak RSS of one long run."""
    from click.core import ParameterSource

    from experiments.bench_sim import run, run_memory, run_scale

    given = {name for name in ("requests", "rounds", "strategies", "budget_s")
             if ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE}
    if memory_requests is not None:
        if given & {"requests", "rounds", "budget_s"}:
            raise click.UsageError("--memory N runs N arrivals once, to the end: drop --requests, --rounds and "
                                   "--budget-s")
        raise SystemExit(run_memory(memory_requests, sizes, strategies, json_path=json_path, echo=click.echo))
    if sizes is not None:
        raise SystemExit(run_scale(sizes, strategies, requests, rounds=rounds, budget_s=budget_s,
                                   json_path=json_path, echo=click.echo))
    if given & {"strategies", "budget_s"}:
        raise click.UsageError("--strategies and --budget-s apply with --nodes or --memory")
    raise SystemExit(run(requests=requests or 200_000, rounds=rounds, json_path=json_path, echo=click.echo))


@bench.command("live")
@click.option("--seconds", type=click.FloatRange(1, 120), default=5.0, show_default=True,
              help="Length of each wrk run.")
@click.option("--connections", type=click.IntRange(1, 1000), default=32, show_default=True,
              help="wrk connections for the throughput runs.")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Interleaved rounds per case; the best counts.")
@bench_json_option
def bench_live(seconds: float, connections: int, rounds: int, json_path: str | None) -> None:
    """Node middleware vs a bare app, and the balancer vs direct vs nginx, under wrk on loopback."""
    from experiments.bench_live import run

    raise SystemExit(run(seconds=seconds, connections=connections, json_path=json_path, echo=click.echo,
                         rounds=rounds))


def _register() -> None:
    from experiments.cli_balancer import balancer_command
    from experiments.cli_live import live_group
    from experiments.cli_node import node_command
    from experiments.cli_registry import registry_command
    from experiments.bench_dask import bench_dask_command
    from experiments.cli_sim import compare_command, sim_group
    from experiments.figures import figures_command
    bench.add_command(bench_dask_command)
    main.add_command(sim_group)
    main.add_command(live_group)
    main.add_command(compare_command)
    main.add_command(figures_command)
    main.add_command(node_command)
    main.add_command(registry_command)
    main.add_command(balancer_command)
    main.add_command(balancer_command, name="load-balancer")


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
