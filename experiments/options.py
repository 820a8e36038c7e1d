"""Command-line options shared by several ``testbed`` commands."""

from __future__ import annotations

import pathlib
from typing import Any

import click

from solutions.impl import Impl

__all__ = ["EXIT_NOT_IMPLEMENTED", "OutputPath", "bench_json_option", "echo_notice", "impl_option"]

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
