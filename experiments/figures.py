"""``testbed figures``: regenerate every figure the README shows.

Theory of operation
-------------------
Each figure is the ``--plot`` of one ``testbed`` command, written down here once
(:data:`FIGURES`) with the arguments that drew the shipped PNG. ``testbed figures``
runs those commands through the same click group a user types them into, so a
figure cannot drift from its command: if the command stops working, so does this.
``--quick`` appends smaller sizes to the same arguments (click keeps the last
value of an option), which is how the tests check that every figure can still be
made in seconds; it must write elsewhere (``--out``), never over the shipped PNGs.
"""

from __future__ import annotations

import pathlib
import shlex
from dataclasses import dataclass

import click

__all__ = ["FIGURES", "FIGURES_DIR", "Figure", "figures_command"]

#: Where the README's figures live (``experiments/figures/`` in the repository).
FIGURES_DIR = pathlib.Path(__file__).resolve().parent / "figures"


@dataclass(frozen=True)
class Figure:
    """One README figure: the file name, the ``testbed`` arguments that draw it (``--plot``
    is added), the arguments ``--quick`` appends, and about how long the full size takes."""

    name: str
    args: tuple[str, ...]
    quick: tuple[str, ...]
    takes: str
    #: The file the README shows, when the command draws it beside ``--plot`` rather than at it (the
    #: overlaid timelines ``testbed compare --mode both --plot`` writes next to its sweep figure).
    shows: str = ""

    @property
    def shown(self) -> str:
        return self.shows or self.name

    def command(self, out: pathlib.Path, data: pathlib.Path, quick: bool = False) -> list[str]:
        return [*self.args, *(self.quick if quick else ()), "--plot", str(out / self.name),
                "--json", str(data / pathlib.Path(self.name).with_suffix(".json"))]


FIGURES = {f.name: f for f in (
    Figure("seed-compare.png", ("compare", "seed"),
           ("--loads", "0.5,0.9", "--reps", "2", "--duration", "8"), "about 10 s"),
    Figure("seed-sim-vs-live.png",
           ("compare", "seed", "--mode", "both", "--loads", "0.3,0.5,0.7", "--duration", "60", "--reps", "3",
            "--strategies", "round_robin,least_connections,weighted_least_connections"),
           ("--loads", "0.5", "--duration", "3", "--reps", "2", "--strategies", "round_robin,least_connections"),
           "about 10 minutes: nine live runs of 60 s"),
    Figure("supermarket.png",
           ("sim", "compare", "supermarket", "--strategies", "random,power_of_two,least_connections",
            "--loads", "0.5,0.7,0.9,0.95,0.99"),
           ("--strategies", "random,power_of_two", "--loads", "0.5,0.9", "--reps", "2", "--duration", "1"),
           "about 1 h 40 min on 2 cores: 75 runs, 291 million simulated requests"),
    Figure("faults-timeline.png", ("sim", "run", "faults"), ("--duration", "30"), "about 5 s"),
    Figure("faults-live.png", ("compare", "faults", "--mode", "both", "--strategies", "least_connections",
                               "--reps", "1"),
           ("--duration", "8"), "about 2 minutes: one live run of 90 s",
           shows="faults-live-timeline-least_connections-0.50.png"),
)}


def _pick(names: tuple[str, ...]) -> list[Figure]:
    picked = []
    for name in names:
        figure = (FIGURES.get(name) or FIGURES.get(f"{name}.png")
                  or next((f for f in FIGURES.values() if name in (f.shown, f.shown.removesuffix(".png"))), None))
        if figure is None:
            raise click.BadParameter(f"no figure {name!r}; the README's figures are: {', '.join(FIGURES)}",
                                     param_hint="NAME")
        picked.append(figure)
    return list(dict.fromkeys(picked)) or list(FIGURES.values())


@click.command("figures")
@click.argument("names", nargs=-1, metavar="[NAME]...")
@click.option("--out", type=click.Path(file_okay=False, path_type=pathlib.Path), default=FIGURES_DIR,
              show_default="experiments/figures", help="Directory to write the PNGs to.")
@click.option("--data", type=click.Path(file_okay=False, path_type=pathlib.Path),
              default=pathlib.Path("results/figures"), show_default=True,
              help="Directory to write each figure's numbers to (NAME.json: every run and the summary).")
@click.option("--quick", is_flag=True,
              help="Small sizes (seconds, not minutes), to check that every figure's command still runs; "
                   "needs --out elsewhere than the shipped figures.")
@click.option("--list", "list_only", is_flag=True, help="Print each figure's command and stop.")
def figures_command(names: tuple[str, ...], out: pathlib.Path, data: pathlib.Path, quick: bool,
                    list_only: bool) -> None:
    """Regenerate the README's figures (all of them, or the NAMEs given), each with the
    testbed command that draws it: seed-compare.png (a simulated sweep, about 10 s),
    seed-sim-vs-live.png (simulated and live, about 10 minutes of live runs),
    supermarket.png (1,000 nodes against queueing theory, about 1 h 40 min) and
    faults-timeline.png (one simulated run of the faults scenario over time, about 5 s)."""
    main = click.get_current_context().find_root().command  # the testbed group, without importing it back
    figures = _pick(names)
    if quick and out.resolve() == FIGURES_DIR:
        raise click.UsageError("--quick draws small figures; give --out DIR so the shipped ones stay as they are")
    for figure in figures:
        args = figure.command(out, data, quick)
        click.echo(f"{figure.name} ({'quick' if quick else figure.takes}): testbed {shlex.join(args)}")
        if not list_only:
            main.main(args, prog_name="testbed", standalone_mode=False)
