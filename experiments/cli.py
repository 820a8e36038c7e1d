"""The ``testbed`` command line: one click group, one subcommand per job.

Subcommands live next to what they drive and are only assembled here.
Exit statuses: 0 success, 1 a check failed, 2 bad usage (click's), 3 an
exercise forced with ``--impl exercise`` is not implemented yet.
"""

from __future__ import annotations

import click

from solutions.impl import EXERCISES, Impl

EXIT_FAILED = 1
EXIT_NOT_IMPLEMENTED = 3

impl_option = click.option(
    "--impl", type=click.Choice([i.value for i in Impl]), default=Impl.AUTO.value, show_default=True,
    envvar="TESTBED_IMPL", show_envvar=True,
    help="Whose exercise code runs: auto (yours if implemented, else the reference solution), "
         "exercise (yours), solution (the reference).")


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="resilience-testbed")
def main() -> None:
    """resilience-testbed: rate limiting, backpressure, circuit breaking, discovery and
    load balancing, written once and run in simulation and for real."""


@main.command()
@click.argument("exercise", type=click.Choice(["all", *EXERCISES]), default="all")
@impl_option
@click.option("--max-examples", type=click.IntRange(1, 100_000), default=200, show_default=True,
              help="Hypothesis examples per property.")
def check(exercise: str, impl: str, max_examples: int) -> None:
    """Grade the exercises: run each property suite against the chosen implementation.

    Prints PASS/FAIL per property with the smallest counterexample found, in
    plain words. Exit status 0 only when every property holds; 3 when
    --impl exercise is forced on a method that is still the stub.
    """
    from hypothesis import settings as Settings

    from solutions.grading import CHECK_SETTINGS, grade, render

    settings = Settings(CHECK_SETTINGS, max_examples=max_examples)
    names = list(EXERCISES) if exercise == "all" else [exercise]
    reports = []
    for name in names:
        report = grade(name, impl, settings)
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
    click.echo("Result: all properties hold")


@main.group()
def bench() -> None:
    """Benchmarks: ratios against peers measured in the same run."""


@bench.command("core")
@click.option("--seconds", type=click.FloatRange(0.01, 60), default=0.3, show_default=True,
              help="Measuring time per case (each case takes the best of 5 rounds of this length).")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
              help="Also write the figures to this JSON file.")
def bench_core(seconds: float, json_path: str | None) -> None:
    """Cost per call of the core algorithms beside limits and pybreaker."""
    from experiments.bench_core import run

    raise SystemExit(run(seconds=seconds, json_path=json_path, echo=click.echo))


def _register() -> None:
    from experiments.cli_sim import compare_command, sim_group
    main.add_command(sim_group)
    main.add_command(compare_command)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()
