"""Benchmark: cost per call of the core algorithms, beside peer libraries, in one run.

    testbed bench core [--seconds S] [--json PATH]
    python -m experiments.bench_core [--seconds S]

Every figure is a ratio against something measured in the same process a
moment earlier or later, never an absolute target: machines differ, ratios
travel. Each case runs in rounds of about ``seconds``; the best round counts
(the least disturbed by the rest of the machine).

Peers (the ``bench`` extra: ``pip install -e '.[bench]'``):
  * ``limits``: ``hit()`` of its in-memory fixed-window, moving-window and
    sliding-window-counter limiters (it has no token bucket), the same per-client
    work as ``TokenBucket.is_allowed``;
  * ``pybreaker``: ``CircuitBreaker.call()`` of a trivial function, the same work
    as our ``try_acquire`` + ``record_success`` around that call.
A missing peer is reported, not fatal: the core figures are still printed.
"""

from __future__ import annotations

import json
import random
import sys
import time
from typing import Any, Callable

from core.circuit_breaker import CircuitBreaker
from core.strategies import STRATEGIES, Backend
from solutions.impl import rate_limiter_class, strategy_class

__all__ = ["measure", "run"]

ROUNDS = 7
CLIENTS = 1000  # distinct client ids cycled through, so lookups are not all cache hits


def _calibrate(make_loop: Callable[[int], Callable[[], None]], seconds: float) -> int:
    """How many calls make one round of about ``seconds``."""
    n = 1000
    while True:
        loop = make_loop(n)
        t0 = time.perf_counter_ns()
        loop()
        elapsed = time.perf_counter_ns() - t0
        if elapsed >= seconds * 1e9 / 4 or n >= 10_000_000:
            return max(1000, int(n * seconds * 1e9 / max(elapsed, 1)))
        n *= 4


def measure(*make_loops: Callable[[int], Callable[[], None]], seconds: float) -> list[float]:
    """Nanoseconds per call of each case: the best of ROUNDS rounds of about ``seconds``.

    ``make_loop(n)`` returns a function that performs n calls. The cases' rounds
    are interleaved (A B A B ...), so a slow spell of the machine hits all of
    them alike and their ratios stay honest.
    """
    sizes = [_calibrate(make, seconds) for make in make_loops]
    best = [float("inf")] * len(make_loops)
    for _ in range(ROUNDS):
        for i, (make, n) in enumerate(zip(make_loops, sizes)):
            loop = make(n)
            t0 = time.perf_counter_ns()
            loop()
            best[i] = min(best[i], (time.perf_counter_ns() - t0) / n)
    return best


def _bucket_loop(n: int) -> Callable[[], None]:
    bucket = rate_limiter_class("auto")(50.0)
    ids = [f"client-{i}" for i in range(CLIENTS)]
    calls = [(ids[i % CLIENTS], i * 1e-5) for i in range(n)]
    allowed = bucket.is_allowed

    def loop() -> None:
        for client, now in calls:
            allowed(client, now=now)
    return loop


def _limits_loop(strategy_name: str) -> Callable[[int], Callable[[], None]]:
    import limits
    from limits import strategies as lstrategies
    from limits.storage import MemoryStorage

    def make(n: int) -> Callable[[], None]:
        limiter = getattr(lstrategies, strategy_name)(MemoryStorage())
        item = limits.RateLimitItemPerSecond(100)
        ids = [f"client-{i}" for i in range(CLIENTS)]
        seq = [ids[i % CLIENTS] for i in range(n)]
        hit = limiter.hit

        def loop() -> None:
            for client in seq:
                hit(item, client)
        return loop
    return make


def _breaker_loop(n: int) -> Callable[[], None]:
    cb = CircuitBreaker(failure_threshold=5, recovery_timeout_s=60.0)
    acquire, success = cb.try_acquire, cb.record_success
    nows = [i * 1e-5 for i in range(n)]

    def work() -> int:
        return 1

    def loop() -> None:
        for now in nows:
            permit = acquire(now=now)
            if permit is not None:
                work()
                success(permit, now=now)
    return loop


def _pybreaker_loop(n: int) -> Callable[[], None]:
    import pybreaker

    cb = pybreaker.CircuitBreaker(fail_max=5, reset_timeout=60)
    call = cb.call

    def work() -> int:
        return 1

    def loop() -> None:
        for _ in range(n):
            call(work)
    return loop


def _strategy_loop(name: str, size: int) -> Callable[[int], Callable[[], None]]:
    def make(n: int) -> Callable[[], None]:
        rng = random.Random(42)
        strategy = strategy_class(name, "auto")(rng=rng)
        # A few snapshot sets with varied loads and latencies, reused in turn.
        sets = [[Backend(f"node-{i}", f"127.0.0.1:{5000 + i}", rng.randrange(0, 8), rng.choice([1, 2, 4]),
                         True, rng.uniform(0.005, 0.05)) for i in range(size)] for _ in range(8)]
        seq = [sets[i % 8] for i in range(n)]
        select = strategy.select_node

        def loop() -> None:
            for backends in seq:
                select(backends)
        return loop
    return make


def _peers_available(*modules: str, echo: Callable[[str], None]) -> bool:
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        echo(f"  peers not measured: {', '.join(missing)} not installed (pip install -e '.[bench]')")
    return not missing


def run(seconds: float = 0.3, json_path: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Run every case, print a report, optionally write JSON; return an exit status."""
    results: dict[str, Any] = {"seconds_per_round": seconds, "rounds": ROUNDS, "python": sys.version.split()[0]}

    echo("Rate limiting: ns per call (lower is better)")
    names = ["FixedWindowRateLimiter", "MovingWindowRateLimiter", "SlidingWindowCounterRateLimiter"]
    have_limits = _peers_available("limits", echo=echo)
    cases = [_bucket_loop] + ([_limits_loop(n) for n in names] if have_limits else [])
    ours, *theirs = measure(*cases, seconds=seconds)
    peers = dict(zip(names, theirs))
    echo(f"  {'TokenBucket.is_allowed':<44} {ours:9.0f}")
    for name, ns in peers.items():
        echo(f"  {'limits ' + name + '.hit':<44} {ns:9.0f}   {ns / ours:6.1f}x ours")
    results["rate_limiter"] = {"is_allowed_ns": ours, "limits_ns": peers}
    if peers:
        fastest = min(peers.values())
        results["rate_limiter"]["speedup_vs_fastest_peer"] = fastest / ours
        echo(f"  => is_allowed is {fastest / ours:.1f}x cheaper than the fastest limits strategy (target >= 5x)")

    echo("Circuit breaking: ns per guarded call (lower is better)")
    have_pybreaker = _peers_available("pybreaker", echo=echo)
    ours_cb, *py = measure(_breaker_loop, *([_pybreaker_loop] if have_pybreaker else []), seconds=seconds)
    echo(f"  {'CircuitBreaker try_acquire + record_success':<44} {ours_cb:9.0f}")
    results["circuit_breaker"] = {"admit_record_ns": ours_cb, "pybreaker_call_ns": py[0] if py else None}
    if py:
        echo(f"  {'pybreaker CircuitBreaker.call':<44} {py[0]:9.0f}   {py[0] / ours_cb:6.1f}x ours")
        results["circuit_breaker"]["speedup_vs_pybreaker"] = py[0] / ours_cb
        echo(f"  => admit+record is {py[0] / ours_cb:.1f}x cheaper than pybreaker (target >= 5x)")

    sizes = (3, 100, 1000)
    echo("Strategies: ns per pick at " + ", ".join(map(str, sizes)) + " backends (and per backend at 1000)")
    table: dict[str, dict[int, float]] = {}
    for name in STRATEGIES:
        row_ns = measure(*[_strategy_loop(name, size) for size in sizes], seconds=seconds / 3)
        table[name] = dict(zip(sizes, row_ns))
        row = "".join(f"{ns:10.0f}" for ns in row_ns)
        echo(f"  {name:<28}{row}   {table[name][1000] / 1000:6.1f} ns/backend")
    results["strategies_ns"] = {name: {str(k): v for k, v in row.items()} for name, row in table.items()}

    if json_path:
        with open(json_path, "w") as fh:
            json.dump(results, fh, indent=2)
        echo(f"wrote {json_path}")
    return 0


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=0.3)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)
    if not 0.01 <= args.seconds <= 60:
        parser.error("--seconds must be between 0.01 and 60")
    return run(args.seconds, args.json_path)


if __name__ == "__main__":
    raise SystemExit(main())
