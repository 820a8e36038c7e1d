"""Benchmark: simulated requests per second of wall time, beside Ciw and a minimal SimPy model.

    testbed bench sim [--requests N] [--rounds R] [--json PATH]

The queue is M/M/4 at 90% load (the shipped ``mm4`` scenario): four workers,
25 ms mean service, Poisson arrivals at 144/s. Three models simulate the same
number of arrivals, interleaved round by round, best round counted:

* **ours**: the full model: balancer with a strategy and snapshots, the node
  with its middleware hooks, per-request records, the results summary;
* **Ciw** (PyPI ``ciw``): the queueing-network library's M/M/4;
* **minimal SimPy**: the textbook model, a process per request on a
  ``simpy.Resource``, random numbers drawn up front, nothing else.

Each model's mean response time is printed beside Erlang C's exact value, so
a fast model that is wrong would show. Then the speed-up of running
repetitions on a process pool over running them one after another.
"""

from __future__ import annotations

import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from typing import Any, Callable

import numpy as np

from experiments.theory import erlang_c_response_s

__all__ = ["run"]

LAM, MU, C = 144.0, 40.0, 4


def ours(n: int, seed: int) -> float:
    from experiments.scenarios import load
    from sim.model import Simulation
    s = load("mm4")
    s = s.replace(duration_s=n / LAM, seed=seed)
    sim = Simulation(s).run()
    return sim.results()["latency_ms"]["mean"] / 1000.0


def minimal_simpy(n: int, seed: int) -> float:
    import simpy
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(1 / LAM, n).tolist()
    services = rng.exponential(1 / MU, n).tolist()
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=C)
    total = [0.0]

    def customer(service: float) -> Any:
        arrived = env.now
        with server.request() as req:
            yield req
            yield env.timeout(service)
        total[0] += env.now - arrived

    def source() -> Any:
        for gap, service in zip(gaps, services):
            yield env.timeout(gap)
            env.process(customer(service))

    env.process(source())
    env.run()
    return total[0] / n


def ciw_model(n: int, seed: int) -> float:
    import ciw
    network = ciw.create_network(arrival_distributions=[ciw.dists.Exponential(rate=LAM)],
                                 service_distributions=[ciw.dists.Exponential(rate=MU)],
                                 number_of_servers=[C])
    ciw.seed(seed)
    q = ciw.Simulation(network)
    q.simulate_until_max_customers(n, method="Arrive")
    recs = q.get_all_records()
    return sum(r.waiting_time + r.service_time for r in recs) / len(recs)


def _timed(fn: Callable[[int, int], float], n: int, seed: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    mean = fn(n, seed)
    return time.perf_counter() - t0, mean


def _rep(seed: int) -> float:
    from experiments.scenarios import load
    from solutions.impl import simulate
    return simulate(load("seed").with_load(0.7).replace(duration_s=60, seed=seed), "solution")["latency_ms"]["p95"]


def run(requests: int = 200_000, rounds: int = 3, json_path: str | None = None,
        echo: Callable[[str], None] = print) -> int:
    import importlib.util

    models: dict[str, Callable[[int, int], float]] = {"ours (full model)": ours, "minimal SimPy": minimal_simpy}
    if importlib.util.find_spec("ciw"):
        models["Ciw"] = ciw_model
    else:
        echo("Ciw not measured: it is not installed (pip install -e '.[bench]')")
    exact = erlang_c_response_s(C, LAM, MU)
    echo(f"M/M/4 at 90% load, {requests:,} arrivals, best of {rounds} interleaved rounds")
    best: dict[str, float] = {name: float("inf") for name in models}
    means: dict[str, float] = {}
    for r in range(rounds):
        for name, fn in models.items():
            seconds, mean = _timed(fn, requests, seed=r + 1)
            best[name] = min(best[name], seconds)
            means[name] = mean
    echo(f"  {'model':<22}{'requests/s':>12}{'mean ms':>10}{'Erlang C':>10}")
    for name in models:
        echo(f"  {name:<22}{requests / best[name]:>12,.0f}{means[name] * 1e3:>10.2f}{exact * 1e3:>10.2f}")
    speed = {name: requests / best[name] for name in models}
    results: dict[str, Any] = {"requests": requests, "rounds": rounds, "requests_per_s": speed,
                               "mean_response_ms": {k: v * 1e3 for k, v in means.items()},
                               "erlang_c_ms": exact * 1e3}
    mine = speed["ours (full model)"]
    if "Ciw" in speed:
        echo(f"  => ours is {mine / speed['Ciw']:.1f}x faster than Ciw (target >= 2x)")
        results["speedup_vs_ciw"] = mine / speed["Ciw"]
    ratio = speed["minimal SimPy"] / mine
    echo(f"  => the minimal SimPy model is {ratio:.2f}x as fast as ours (target <= 1.5x)")
    results["minimal_simpy_over_ours"] = ratio

    workers = os.cpu_count() or 1
    seeds = list(range(100, 100 + 4 * workers))
    _rep(99)  # imports and caches warm, so the serial time is not charged for them
    t0 = time.perf_counter()
    serial = [_rep(s) for s in seeds]
    t_serial = time.perf_counter() - t0
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers) as pool:
        parallel = list(pool.map(_rep, seeds))
    t_parallel = time.perf_counter() - t0
    assert parallel == serial, "a repetition gave a different result in another process"
    echo(f"Repetitions: {len(seeds)} runs of the seed scenario, {t_serial:.1f}s one after another, "
         f"{t_parallel:.1f}s on {workers} processes: {t_serial / t_parallel:.2f}x speed-up (same results)")
    results["parallel"] = {"runs": len(seeds), "workers": workers, "serial_s": t_serial,
                           "parallel_s": t_parallel, "speedup": t_serial / t_parallel}
    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)
        echo(f"wrote {json_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run())
