"""Progress bars for long work (sweeps, long simulations), drawn only for a person watching.

Theory of operation
-------------------
A bar goes to stderr, so stdout keeps only the tables and "wrote" lines a
script reads, and it is drawn only when stderr is a terminal and the command
was not given ``--quiet``: a pipe, a log file or a test runner gets nothing
at all. The bar is click's (``click.progressbar``): click is already what the
command line is built on, and its bar has what a sweep needs (position, ETA,
redrawn in place); tqdm or rich would be a new dependency for the same line.
Left to itself click's bar prints its label once when the stream is not a
terminal; deciding here instead keeps non-TTY output free of it.

Work reports progress through plain callbacks, so nothing below ``experiments``
knows about terminals: a sweep calls ``update(n_done)``, a simulation calls
``update(now_s, duration_s)`` with simulated time.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

import click

__all__ = ["counting", "over_time", "visible"]

#: Resolution of a bar over simulated time: a redraw at most every 0.1% of the run.
TIME_STEPS = 1000


def visible(quiet: bool) -> bool:
    """Whether to draw a bar: not ``quiet`` and stderr is a terminal."""
    return not quiet and sys.stderr.isatty()


@contextmanager
def counting(length: int, label: str, *, quiet: bool = False) -> Iterator[Callable[[int], None]]:
    """A bar over ``length`` items; yields ``update(n)`` to call as ``n`` more are done."""
    if not visible(quiet):
        yield lambda n: None
        return
    with click.progressbar(length=length, label=label, show_pos=True, file=sys.stderr) as bar:
        yield bar.update


@contextmanager
def over_time(label: str, *, quiet: bool = False) -> Iterator[Callable[[float, float], None]]:
    """A bar over a run's simulated time; yields ``update(now_s, duration_s)`` (seconds simulated so far,
    of the run's total), which may be called as often as the caller likes: it redraws only on a new step."""
    if not visible(quiet):
        yield lambda now_s, duration_s: None
        return
    shown = 0
    with click.progressbar(length=TIME_STEPS, label=label, file=sys.stderr) as bar:
        def update(now_s: float, duration_s: float) -> None:
            nonlocal shown
            step = TIME_STEPS if duration_s <= 0 else max(0, min(TIME_STEPS, int(TIME_STEPS * now_s / duration_s)))
            if step > shown:
                bar.update(step - shown)
                shown = step
        yield update
