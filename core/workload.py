"""The offered load as numbers: arrival gaps, client ids and think times, for both drivers.

Theory of operation
-------------------
A scenario's workload is drawn from numpy generators seeded from the
scenario's seed, in one place, so the simulator and the live load generator
offer *the same* requests: the same gaps between open-loop arrivals and the
same client on each, for the same seed. A difference between a simulated and a
live run of one scenario is then the system's, not the dice's.

A run's random numbers come from independent child streams of
``SeedSequence(seed)``, by index: 0 arrival gaps and think times, 1 clients,
2 the balancer's strategy, ``3 + i`` node ``i``'s service times and injected
errors. A live node started with ``--seed S --stream K`` draws from child ``K``
of seed ``S``, so ``testbed live run`` gives every node the very stream its
simulated twin uses: the same arrivals *and* (in the order served) the same
service times.

Draws are fetched from numpy in chunks (:func:`chunks`): one numpy call per
few thousand numbers instead of one per request.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator

import numpy as np

from core.scenario import Workload

__all__ = ["ARRIVAL_STREAM", "CLIENT_STREAM", "NODE_STREAM", "STRATEGY_STREAM", "chunks", "client_ids", "open_loop",
           "service_times", "stream", "strategy_seed", "streams", "think_times"]

ARRIVAL_STREAM, CLIENT_STREAM, STRATEGY_STREAM, NODE_STREAM = 0, 1, 2, 3  # node i: NODE_STREAM + i


#: Draws fetched at once per stream; every node's streams together hold at most about
#: :data:`DRAWS_BUFFERED` values (see :func:`node_chunk_size`).
CHUNK_SIZE = 4096
DRAWS_BUFFERED = 65_536


def node_chunk_size(nodes: int) -> int:
    """How many draws each of ``nodes`` nodes fetches at once: :data:`CHUNK_SIZE` up to 16 nodes (every
    live node, every shipped scenario but the supermarket), smaller beyond, down to 256, so that 1,000
    nodes' fetches fit in the processor's caches as 3 nodes' do (a pick touches one node's stream, and a
    fetch is cheap beside a request). Only the fetch size changes: a stream's values are the same; where
    one node draws from two streams of one generator (service times, and fault error draws), which
    values each gets depends on it."""
    return max(256, min(CHUNK_SIZE, DRAWS_BUFFERED // max(1, nodes)))


def chunks(draw: Callable[[int], np.ndarray], size: int = CHUNK_SIZE, unboxed: int = 256) -> Iterator[float]:
    """An endless iterator over numpy draws, fetched ``size`` at a time.

    A fetch stays a numpy array (8 bytes a value) and becomes Python floats ``unboxed`` at a time
    (a list of floats costs 32 bytes a value): a simulation of 1,000 nodes holds one fetch per node,
    40 KB each instead of 128 KB. The values, and when each fetch happens, are the same either way."""
    while True:
        block = draw(size)
        for start in range(0, size, unboxed):
            yield from block[start:start + unboxed].tolist()


def stream(seed: int, index: int) -> np.random.Generator:
    """Child stream ``index`` of ``seed``: what ``SeedSequence(seed).spawn(n)[index]`` seeds, for any n > index."""
    return np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(index,)))


def streams(seed: int, n: int) -> list[np.random.Generator]:
    """Child streams 0 .. n-1 of ``seed`` (see the module docstring for who uses which)."""
    return [stream(seed, i) for i in range(n)]


def strategy_seed(seed: int) -> int:
    """The seed of the balancer strategy's ``random.Random`` in a run with ``seed``."""
    return int(stream(seed, STRATEGY_STREAM).integers(2**63))


def service_times(service: str, mean_s: float, rng: np.random.Generator, *,
                  chunk_size: int = CHUNK_SIZE) -> Iterator[float]:
    """Endless service times (seconds) with mean ``mean_s``: exponential, or the mean itself (deterministic)."""
    if service == "exponential" and mean_s > 0:
        return chunks(lambda n: rng.exponential(mean_s, n), chunk_size)
    return itertools.repeat(mean_s)


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
           else (ids[int(k)] for k in chunks(lambda n: clients.integers(0, workload.clients, n))))
    return zip(gaps, who)


def think_times(workload: Workload, arrivals: np.random.Generator) -> Iterator[float]:
    """Endless exponential think times (seconds) with mean ``think_time_ms``, for closed loops."""
    mean = workload.think_time_ms / 1000.0
    return chunks(lambda n: arrivals.exponential(mean, n)) if mean > 0 else itertools.repeat(0.0)
