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
from typing import Callable

from core.circuit_breaker import CircuitBreaker
from core.strategies import STRATEGIES, Backend
from solutions.impl import rate_limiter_class, strategy_class

__all__ = ["measure", "run"]

ROUNDS = 5
CLIENTS = 1000  # distinct client ids cycled through, so lookups are not all cache hits


def measure(make_loop: Callable[[int], Callable[[], None]], seconds: float) -> float:
    """Nanoseconds per call: the best of ROUNDS rounds of about ``seconds`` each.

    ``make_loop(n)`` returns a function that performs n calls.
    """
    n = 1000
    while True:  # calibrate n so one round lasts about `seconds`
        loop = make_loop(n)
        t0 = time.perf_counter_ns()
        loop()
        elapsed = time.perf_counter_ns() - t0
        if elapsed >= seconds * 1e9 / 4 or n >= 10_000_000:
            break
        n *= 4
    n = max(1000, int(n * seconds * 1e9 / max(elapsed, 1)))
    best = float("inf")
    for _ in range(ROUNDS):
        loop = make_loop(n)
        t0 = time.perf_counter_ns()
        loop()
        best = min(best, (time.perf_counter_ns() - t0) / n)
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


def _peer(label: str, fn: Callable[[], float], echo: Callable[[str], None]) -> float | None:
    try:
        return fn()
    except ImportError as exc:
        echo(f"  {label:<44} not measured: {exc.name} is not installed (pip install -e '.[bench]')")
        return None


def run(seconds: float = 0.3, json_path: str | None = None, echo: Callable[[str], None] = print) -> int:
    """Run every case, print a report, optionally write JSON; return an exit status."""
    results: dict[str, object] = {"seconds_per_round": seconds, "rounds": ROUNDS, "python": sys.version.split()[0]}

    echo("Rate limiting: ns per call (lower is better)")
    ours = measure(_bucket_loop, seconds)
    echo(f"  {'TokenBucket.is_allowed':<44} {ours:9.0f}")
    peers = {}
    for strat in ("FixedWindowRateLimiter", "MovingWindowRateLimiter", "SlidingWindowCounterRateLimiter"):
        ns = _peer(f"limits {strat}.hit", lambda s=strat: measure(_limits_loop(s), seconds), echo)
        if ns is not None:
            peers[strat] = ns
            echo(f"  {'limits ' + strat + '.hit':<44} {ns:9.0f}   {ns / ours:6.1f}x ours")
    results["rate_limiter"] = {"is_allowed_ns": ours, "limits_ns": peers}
    if peers:
        fastest = min(peers.values())
        results["rate_limiter"]["speedup_vs_fastest_peer"] = fastest / ours
        echo(f"  => is_allowed is {fastest / ours:.1f}x cheaper than the fastest limits strategy (target >= 5x)")

    echo("Circuit breaking: ns per guarded call (lower is better)")
    ours_cb = measure(_breaker_loop, seconds)
    echo(f"  {'CircuitBreaker try_acquire + record_success':<44} {ours_cb:9.0f}")
    py = _peer("pybreaker CircuitBreaker.call", lambda: measure(_pybreaker_loop, seconds), echo)
    results["circuit_breaker"] = {"admit_record_ns": ours_cb, "pybreaker_call_ns": py}
    if py is not None:
        echo(f"  {'pybreaker CircuitBreaker.call':<44} {py:9.0f}   {py / ours_cb:6.1f}x ours")
        results["circuit_breaker"]["speedup_vs_pybreaker"] = py / ours_cb
        echo(f"  => admit+record is {py / ours_cb:.1f}x cheaper than pybreaker (target >= 5x)")

    sizes = (3, 100, 1000)
    echo("Strategies: ns per pick at " + ", ".join(map(str, sizes)) + " backends (and per backend at 1000)")
    table: dict[str, dict[int, float]] = {}
    for name in STRATEGIES:
        table[name] = {size: measure(_strategy_loop(name, size), seconds / 3) for size in sizes}
        row = "".join(f"{table[name][s]:10.0f}" for s in sizes)
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
