"""Benchmark: a sweep's repetitions on a local Dask cluster against one after another.

    python -m experiments.bench_dask [--reps 4] [--workers 2] [--duration 300] [--rounds 3] [--json PATH]

Issue 12's target: a 4-repetition sweep on a 2-worker Dask cluster on this
machine runs at least 1.5x faster than the same repetitions one after another.
Every side is :func:`experiments.compare.sweep` on the same grid (one strategy,
one load, ``reps`` seeds):

* **one after another**, in this process;
* **process pool**: ``workers`` processes of the local pool (the default
  executor), started before the clock: what the machine gives that many
  plain processes right now, the baseline for Dask's own cost;
* **dask**: a ``LocalCluster`` of ``workers`` processes with one thread each,
  through :func:`experiments.executors.open_executor`, exactly as ``testbed
  sim compare --executor dask`` runs them.

The sides alternate round by round (so a neighbour's burst of CPU hurts all
alike), the best round of each counts, and the figures are ratios to one after
another; all sides give the very same runs, which is checked too. Starting the
cluster (spawning its processes, importing the project there, checking every
worker's code) is paid once per sweep, not per repetition, so it is timed
apart, and every side is warmed up on a short run first.

On a machine shared with other work, two processes do not get two cores: the
process pool's ratio says what they got, and Dask's ratio is to be read beside
it. A last figure does not depend on the neighbours at all: the CPU time each
side spent (this process and all its descendants: the pool's, the cluster's
nannies and workers), summed over the rounds. ``workers x`` (CPU one after
another / CPU on Dask) is the speed-up the sweep would have on ``workers`` free
cores, its repetitions split evenly (``reps`` a multiple of ``workers``).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

import click

from experiments.compare import process_pool, sweep
from experiments.executors import open_executor
from experiments.options import bench_json_option

__all__ = ["TARGET", "bench_dask_command", "run"]

#: The issue's target for the ratio (one after another / dask).
TARGET = 1.5

SIDES = ("one after another", "process pool", "dask")


def _cpu_s() -> float:
    """CPU seconds (user + system) of this process and of its live descendants."""
    import psutil  # type: ignore[import-untyped]  # a dependency of distributed, without type stubs

    me = psutil.Process()
    total = 0.0
    for proc in [me, *me.children(recursive=True)]:
        try:
            cpu = proc.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += cpu.user + cpu.system
    return total


def run(*, reps: int = 4, workers: int = 2, duration_s: float = 300.0, rounds: int = 3, scenario: str = "seed",
        strategy: str = "least_connections", load: float = 0.9, json_path: str | None = None,
        echo: Callable[[str], None] = print) -> int:
    """Measure and print; return the exit status (0, or 1 when the sides gave different runs)."""
    from experiments.scenarios import load as load_scenario

    s = load_scenario(scenario).replace(duration_s=duration_s)
    grid = ([strategy], [load], reps)
    cores = os.cpu_count() or 1
    echo(f"bench dask: {reps} repetitions of {s.name} ({strategy}, load {load:.2f}, {duration_s:g} s simulated "
         f"each): one after another in this process, on a {workers}-process pool, and on a {workers}-worker Dask "
         f"LocalCluster (1 thread each); load average {os.getloadavg()[0]:.1f} on {cores} cores")
    warm = ([strategy], [load], workers)
    sweep(s.replace(duration_s=min(duration_s, 5.0)), [strategy], [load], 1, workers=1)
    t0 = time.perf_counter()
    with process_pool(workers) as local, open_executor("dask", workers=workers,
                                                       echo=lambda text: echo("  " + text)) as pool:
        start_s = time.perf_counter() - t0
        ways: dict[str, Callable[[Any], list[dict[str, Any]]]] = {
            "one after another": lambda sc: sweep(sc, *grid, workers=1),
            "process pool": lambda sc: sweep(sc, *grid, executor=local),
            "dask": lambda sc: sweep(sc, *grid, executor=pool.executor, check=pool.check),
        }
        for name in SIDES[1:]:
            sweep(s.replace(duration_s=min(duration_s, 5.0)), *warm,
                  executor=local if name == "process pool" else pool.executor)
        times: dict[str, list[float]] = {name: [] for name in SIDES}
        cpu = {name: 0.0 for name in SIDES}
        runs: dict[str, str] = {}
        for r in range(rounds):
            for name in SIDES:
                t, c = time.perf_counter(), _cpu_s()
                result = ways[name](s)
                times[name].append(time.perf_counter() - t)
                cpu[name] += _cpu_s() - c
                runs[name] = json.dumps(result)  # as written: a NaN equals a NaN there
            echo(f"  round {r + 1}: " + ", ".join(f"{name} {ts[-1]:.2f} s" for name, ts in times.items()))
    best = {name: min(ts) for name, ts in times.items()}
    speedup = {name: best["one after another"] / best[name] for name in SIDES[1:]}
    on_free_cores = workers * cpu["one after another"] / cpu["dask"]
    same = len(set(runs.values())) == 1
    echo(f"  pool and cluster start-up {start_s:.1f} s (once per sweep)")
    echo(f"  => best of {rounds}: " + ", ".join(f"{name} {best[name]:.2f} s" for name in SIDES)
         + f"; {'the same runs' if same else 'DIFFERENT runs'}")
    echo(f"  => dask {speedup['dask']:.2f}x faster than one after another (target >= {TARGET}x: "
         f"{'met' if speedup['dask'] >= TARGET else 'NOT met'}); {workers} plain processes got "
         f"{speedup['process pool']:.2f}x on this machine now, so Dask reached "
         f"{100 * speedup['dask'] / speedup['process pool']:.0f}% of what it could")
    echo(f"  => CPU time over the rounds: one after another {cpu['one after another']:.2f} s, dask "
         f"{cpu['dask']:.2f} s in all its processes ({100 * (cpu['dask'] / cpu['one after another'] - 1):+.0f}%): "
         f"on {workers} free cores {on_free_cores:.2f}x faster")
    if json_path:
        p = pathlib.Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"reps": reps, "workers": workers, "duration_s": duration_s, "rounds": rounds,
                                 "scenario": s.name, "strategy": strategy, "load": load,
                                 "load_average": os.getloadavg()[0], "cores": cores, "start_s": start_s,
                                 "times_s": times, "best_s": best, "speedup": speedup["dask"],
                                 "speedup_process_pool": speedup["process pool"], "target": TARGET,
                                 "cpu_s": cpu, "speedup_on_free_cores": on_free_cores,
                                 "same_runs": same}, indent=2) + "\n")
        echo(f"wrote {p}")
    return 0 if same else 1


@click.command("dask")
@click.option("--reps", type=click.IntRange(1, 100), default=4, show_default=True, help="Repetitions in the sweep.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True,
              help="Worker processes of the local Dask cluster.")
@click.option("--duration", "duration_s", type=click.FloatRange(1, 100_000), default=300.0, show_default=True,
              help="Simulated seconds per repetition (seed scenario, least connections at 90% load).")
@click.option("--rounds", type=click.IntRange(1, 20), default=3, show_default=True,
              help="Interleaved rounds; the best of each side counts.")
@bench_json_option
def bench_dask_command(reps: int, workers: int, duration_s: float, rounds: int, json_path: str | None) -> None:
    """A sweep's repetitions on a local Dask cluster against one after another (ratio, same run)."""
    raise SystemExit(run(reps=reps, workers=workers, duration_s=duration_s, rounds=rounds, json_path=json_path,
                         echo=click.echo))


if __name__ == "__main__":  # pragma: no cover
    bench_dask_command()
