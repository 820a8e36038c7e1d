"""Benchmark: a sweep's repetitions on a local Dask cluster against one after another.

    python -m experiments.bench_dask [--reps 4] [--workers 2] [--duration 300] [--rounds 3] [--json PATH]

Issue 12's target: a 4-repetition sweep on a 2-worker Dask cluster on this
machine runs at least 1.5x faster than the same repetitions one after another.
Both are :func:`experiments.compare.sweep` on the same grid (one strategy, one
load, ``reps`` seeds): "one after another" in this process, "dask" on a
``LocalCluster`` of ``workers`` processes with one thread each, through
:func:`experiments.executors.open_executor`, exactly as ``testbed sim compare
--executor dask`` runs them. The two alternate round by round (so a neighbour's
burst of CPU hurts both alike), the best round of each counts, and the figure
is their ratio; the two give the very same runs, which is checked too.

Starting the cluster (spawning its processes, importing the project there,
checking every worker's code) is paid once per sweep, not per repetition, so it
is timed apart and printed beside, and both sides are warmed up on a short run
first. The load average is printed too: on a machine shared with other work
the ratio falls below ``workers`` for want of free cores, not of Dask.

So a second figure does not depend on the neighbours: the CPU time each side
spent (this process, plus for Dask every process of the local cluster:
scheduler here, nannies, workers), summed over the rounds. Dask's extra CPU
is its whole cost; ``workers x`` (CPU one after another / CPU on Dask) is the
speed-up the sweep would have on ``workers`` free cores, its repetitions split
evenly (``reps`` a multiple of ``workers``).
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, Callable

import click

from experiments.compare import sweep
from experiments.executors import open_executor
from experiments.options import bench_json_option

__all__ = ["TARGET", "bench_dask_command", "run"]

#: The issue's target for the ratio (one after another / dask).
TARGET = 1.5


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
    """Measure and print; return the exit status (0, or 1 when the two ways gave different runs)."""
    from experiments.scenarios import load as load_scenario

    s = load_scenario(scenario).replace(duration_s=duration_s)
    grid = ([strategy], [load], reps)
    cores = os.cpu_count() or 1
    echo(f"bench dask: {reps} repetitions of {s.name} ({strategy}, load {load:.2f}, {duration_s:g} s simulated "
         f"each); one after another in this process, and on a {workers}-worker Dask LocalCluster "
         f"(1 thread each); load average {os.getloadavg()[0]:.1f} on {cores} cores")
    warm = s.replace(duration_s=min(duration_s, 5.0))
    sweep(warm, [strategy], [load], 1, workers=1)
    t0 = time.perf_counter()
    with open_executor("dask", workers=workers, echo=lambda text: echo("  " + text)) as pool:
        start_s = time.perf_counter() - t0
        sweep(warm, [strategy], [load], workers, executor=pool.executor, check=pool.check)
        times: dict[str, list[float]] = {"one after another": [], "dask": []}
        cpu = {name: 0.0 for name in times}
        runs: dict[str, Any] = {}
        for r in range(rounds):
            for name in times:
                t, c = time.perf_counter(), _cpu_s()
                runs[name] = sweep(s, *grid, workers=1) if name == "one after another" else \
                    sweep(s, *grid, executor=pool.executor, check=pool.check)
                times[name].append(time.perf_counter() - t)
                cpu[name] += _cpu_s() - c
            echo(f"  round {r + 1}: " + ", ".join(f"{name} {ts[-1]:.2f} s" for name, ts in times.items()))
    best = {name: min(ts) for name, ts in times.items()}
    ratio = best["one after another"] / best["dask"]
    on_free_cores = workers * cpu["one after another"] / cpu["dask"]
    same = json.dumps(runs["one after another"]) == json.dumps(runs["dask"])  # as written: NaN is NaN there
    echo(f"  cluster start-up {start_s:.1f} s (once per sweep)")
    echo(f"  => best of {rounds}: one after another {best['one after another']:.2f} s, dask {best['dask']:.2f} s: "
         f"{ratio:.2f}x faster on Dask (target >= {TARGET}x: {'met' if ratio >= TARGET else 'NOT met'}); "
         f"{'the same runs' if same else 'DIFFERENT runs'}")
    echo(f"  => CPU time over the rounds: one after another {cpu['one after another']:.2f} s, dask "
         f"{cpu['dask']:.2f} s in all its processes ({100 * (cpu['dask'] / cpu['one after another'] - 1):+.0f}%): "
         f"on {workers} free cores {on_free_cores:.2f}x faster")
    if json_path:
        p = pathlib.Path(json_path)
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(json.dumps({"reps": reps, "workers": workers, "duration_s": duration_s, "rounds": rounds,
                                 "scenario": s.name, "strategy": strategy, "load": load,
                                 "load_average": os.getloadavg()[0], "cores": cores, "cluster_start_s": start_s,
                                 "times_s": times, "best_s": best, "speedup": ratio, "target": TARGET,
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
