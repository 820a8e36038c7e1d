"""Load sweeps: every strategy at every offered load, repeated on distinct seeds.

Theory of operation
-------------------
A sweep is a grid of independent simulation runs (strategy x load x
repetition). Repetition ``r`` uses seed ``scenario.seed + r`` for *every*
strategy and load (common random numbers): the strategies see the very same
arrivals and service times, so their difference is not sampling noise.

Runs go through a ``concurrent.futures.Executor``: a local process pool by
default (one worker per core), any other executor (Dask's, opened by
:mod:`experiments.executors`) when a sweep outgrows one machine. Each run is a
picklable :class:`Job` and returns the plain results dict. While runs are
out, an optional ``check`` is called about every second (and after each
result): a cluster that lost every worker would otherwise be waited on for
ever, and ``check`` is how its executor says so, by raising.

Aggregation: for each (strategy, load), the mean over repetitions of each
metric with a 95% confidence half-width from Student's t, so a table says how
much of a difference is real.
"""

from __future__ import annotations

import math
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from core.scenario import Scenario

__all__ = ["FAILURE_KINDS", "Job", "aggregate", "failed_percent", "failures", "run_job", "sweep"]

# Two-sided 95% quantiles of Student's t for 1..30 degrees of freedom; 1.96 beyond.
_T95 = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042]


#: Seconds between two calls of a sweep's ``check`` while no result comes back.
CHECK_EVERY_S = 1.0


def t95(dof: int) -> float:
    return _T95[dof - 1] if 1 <= dof <= len(_T95) else 1.96


@dataclass(frozen=True)
class Job:
    scenario: Scenario
    strategy: str
    load: float
    rep: int
    impl: str = "auto"

    def scenario_to_run(self) -> Scenario:
        s = self.scenario.replace(strategy=self.strategy, seed=self.scenario.seed + self.rep)
        return s.with_load(self.load)


def run_job(job: Job) -> dict[str, Any]:
    """One simulation run (a top-level function, so process pools can pickle it)."""
    from solutions.impl import simulate
    result = simulate(job.scenario_to_run(), job.impl)
    result["rep"] = job.rep
    return result


def process_pool(workers: int | None = None) -> ProcessPoolExecutor:
    """This machine's pool, ``workers`` processes (default one per core), forked by a forkserver that
    holds the imports rather than by this process: CPython runs at-fork handlers in a process that
    forks, and a Ctrl-C landing in one (logging's lock release) is lost, so the sweep went on."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["experiments.compare", "solutions.impl", "sim.model"])
    return ProcessPoolExecutor(max_workers=workers or os.cpu_count(), mp_context=ctx)


def sweep(scenario: Scenario, strategies: Sequence[str], loads: Sequence[float], reps: int, *,
          impl: str = "auto", executor: Executor | None = None, workers: int | None = None,
          progress: Callable[[int], None] | None = None,
          check: Callable[[], None] | None = None) -> list[dict[str, Any]]:
    """Run the grid; results come back ordered by (strategy, load, rep) whatever the executor did.

    ``progress(n)`` is told as ``n`` more runs are done; ``check()`` is called while runs are out
    (after each result, and after :data:`CHECK_EVERY_S` without one) and stops the sweep by raising."""
    jobs = [Job(scenario, s, load, r, impl) for s in strategies for load in loads for r in range(reps)]
    if executor is None and (workers or os.cpu_count() or 1) <= 1:
        results = []
        for job in jobs:
            results.append(run_job(job))
            if progress:
                progress(1)
        return results
    own = executor is None
    pool = executor or process_pool(workers)
    try:
        futures: dict[Future, int] = {pool.submit(run_job, job): i for i, job in enumerate(jobs)}
        out: list[dict[str, Any] | None] = [None] * len(jobs)
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=CHECK_EVERY_S if check else None, return_when=FIRST_COMPLETED)
            for fut in done:
                out[futures[fut]] = fut.result()
                if progress:
                    progress(1)
            if check and pending:
                check()
    finally:
        if own:
            pool.shutdown(cancel_futures=True)
    return [r for r in out if r is not None]


def _mean_ci(values: Iterable[float | None]) -> dict[str, float | None]:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "ci95": None}
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return {"mean": m, "ci95": None}
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))
    return {"mean": m, "ci95": t95(len(xs) - 1) * sd / math.sqrt(len(xs))}


#: Every outcome but OK, as a results dict counts them: the nodes' refusals, then the errors by kind.
FAILURE_KINDS = ("rate_limited", "backpressure", "circuit_open", "server", "connect", "no_backend", "timeout",
                 "not_sent")


def failures(result: dict[str, Any]) -> dict[str, int]:
    """One run's failed requests (every outcome but OK) by kind, in :data:`FAILURE_KINDS` order."""
    q, e = result["requests"], result["errors_detail"]
    return {k: q[k] if k in q else e.get(k, 0) for k in FAILURE_KINDS}  # not_sent: live runs only


def failed_percent(result: dict[str, Any]) -> float:
    """The failed requests of one run as a percentage of those sent (0 when none were sent)."""
    q = result["requests"]
    return 100.0 * (q["sent"] - q["ok"]) / q["sent"] if q["sent"] else 0.0


def aggregate(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per (strategy, load): mean and 95% CI over repetitions of each metric.

    Latency covers OK requests only, so a row also counts the ones that failed (``failed``:
    count, percent of sent, and count by kind); ``share`` is of every request the balancer
    sent to a node, failed ones included."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for r in results:
        groups.setdefault((r["strategy"], round(r["load"], 6)), []).append(r)
    rows = []
    for (strategy, load), runs in groups.items():
        node_ids = list(runs[0]["nodes"])
        rows.append({
            "strategy": strategy,
            "load": load,
            "reps": len(runs),
            "latency_ms": {k: _mean_ci(r["latency_ms"][k] for r in runs) for k in ("mean", "p50", "p95", "p99")},
            "throughput_rps": _mean_ci(r["throughput_rps"] for r in runs),
            "failed": {"count": _mean_ci(r["requests"]["sent"] - r["requests"]["ok"] for r in runs),
                       "percent": _mean_ci(failed_percent(r) for r in runs),
                       "by_kind": {k: _mean_ci(failures(r)[k] for r in runs) for k in FAILURE_KINDS}},
            "requests": {k: _mean_ci(r["requests"][k] for r in runs)
                         for k in ("sent", "ok", "rate_limited", "backpressure", "circuit_open", "errors")},
            "share": {n: _mean_ci(r["nodes"][n]["share"] for r in runs) for n in node_ids},
            "utilization": {n: _mean_ci(r["nodes"][n]["utilization"] for r in runs) for n in node_ids},
        })
    return rows
