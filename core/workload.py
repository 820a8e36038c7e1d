"""The offered load as numbers: arrival gaps, client ids and think times, for both drivers.

Theory of operation
-------------------
A scenario's workload is drawn from numpy generators seeded from the
scenario's seed, in one place, so the simulator and the live load generator
offer *the same* requests: the same gaps between open-loop arrivals and the
same client on each, for the same seed. A difference between a simulated and a
live run of one scenario is then the system's, not the dice's.

``SeedSequence(seed).spawn(k)`` hands out independent child streams by index;
the workload takes children 0 (arrival gaps and think times) and 1 (clients),
whatever else a driver spawns after them.

Draws are fetched from numpy in chunks (:func:`chunks`): one numpy call per
few thousand numbers instead of one per request.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import numpy as np

from core.scenario import Workload

__all__ = ["ARRIVAL_STREAM", "CLIENT_STREAM", "chunks", "client_ids", "open_loop", "streams", "think_times"]

ARRIVAL_STREAM, CLIENT_STREAM = 0, 1


def chunks(draw: Callable[[int], np.ndarray], size: int = 4096) -> Iterator[float]:
    """An endless iterator over numpy draws, fetched ``size`` at a time."""
    while True:
        yield from draw(size).tolist()


def streams(seed: int, n: int) -> list[np.random.Generator]:
    """``n`` independent generators for a run with ``seed``; 0 and 1 are the workload's."""
    return [np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(n)]


def client_ids(workload: Workload) -> list[str]:
    """The client ids a workload sends: ``client-0`` ... ``client-{clients-1}``."""
    return [f"client-{i}" for i in range(workload.clients)]


def open_loop(workload: Workload, arrivals: np.random.Generator,
              clients: np.random.Generator) -> Iterator[tuple[float, str]]:
    """Endless ``(gap_s, client_id)`` pairs of an open-loop workload: exponential gaps
    (Poisson arrivals) or constant ones, each request from a client picked uniformly."""
    if workload.arrival not in ("poisson", "constant"):
        raise ValueError(f"open_loop needs poisson or constant arrivals, not {workload.arrival!r}")
    mean = 1.0 / workload.rate_per_s
    gaps = (chunks(lambda n: arrivals.exponential(mean, n)) if workload.arrival == "poisson"
            else itertools.repeat(mean))
    ids = client_ids(workload)
    who = (itertools.repeat(ids[0]) if workload.clients == 1
           else (ids[k] for k in chunks(lambda n: clients.integers(0, workload.clients, n))))
    return zip(gaps, who)


def think_times(workload: Workload, arrivals: np.random.Generator) -> Iterator[float]:
    """Endless exponential think times (seconds) with mean ``think_time_ms``, for closed loops."""
    mean = workload.think_time_ms / 1000.0
    return chunks(lambda n: arrivals.exponential(mean, n)) if mean > 0 else itertools.repeat(0.0)
