"""Command-line options shared by several ``testbed`` commands."""

from __future__ import annotations

import click

from solutions.impl import Impl

__all__ = ["bench_json_option", "impl_option"]

impl_option = click.option(
    "--impl", type=click.Choice([i.value for i in Impl]), default=Impl.AUTO.value, show_default=True,
    envvar="TESTBED_IMPL", show_envvar=True,
    help="Whose exercise code runs: auto (yours if implemented, else the reference solution), "
         "exercise (yours), solution (the reference).")

bench_json_option = click.option(
    "--json", "json_path", type=click.Path(dir_okay=False, writable=True), default=None,
    help="Also write the figures to this JSON file.")
