"""The property suites that grade the two exercises.

One suite per exercise, shared by ``pytest`` (``tests/solutions``) and by
``testbed check``: each :class:`Property` takes the implementation class to
grade, lets Hypothesis search for an input that breaks it, and on failure
raises :class:`Counterexample` whose message tells what happened in plain words
for the smallest such input Hypothesis found ("after 3 allowed requests at
t=0.000, request 4 was allowed too; the capacity is 3").

The token-bucket suite compares against an ideal bucket computed in exact
arithmetic (``fractions.Fraction``) on a millisecond grid. Floating point can
make a real bucket hold 0.9999999999 tokens where the ideal one holds exactly
1; a decision whose ideal token count lies within ``TOLERANCE`` of 1 is
therefore not judged, and the ideal bucket follows the implementation there.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from fractions import Fraction
from typing import Callable, Sequence

from hypothesis import given, settings as Settings
from hypothesis import strategies as st

from core.strategies import Backend, NoHealthyBackend

__all__ = [
    "Counterexample", "LEAST_CONNECTIONS_PROPERTIES", "Property", "RATE_LIMITER_PROPERTIES", "SUITES",
]

TOLERANCE = Fraction(1, 10**6)


class Counterexample(AssertionError):
    """A property does not hold; the message describes the smallest failing input found."""


@dataclass(frozen=True)
class Property:
    """``title`` says what must hold; ``check(cls, settings)`` raises Counterexample if it does not."""

    name: str
    title: str
    _body: Callable[[type], Callable[[], None]]

    def check(self, cls: type, settings: Settings | None = None) -> None:
        test = self._body(cls)
        if settings is not None and hasattr(test, "hypothesis"):
            test = settings(test)
        test()


# --------------------------------------------------------------------------
# Exercise 1: TokenBucket.is_allowed
# --------------------------------------------------------------------------
RATES = [Fraction(1, 2), Fraction(1), Fraction(2), Fraction(3), Fraction(5), Fraction(10), Fraction(100)]

rates = st.sampled_from(RATES)
capacities = st.one_of(st.none(), st.integers(1, 10).map(Fraction))
# Steps between requests in milliseconds: bursts (0), close calls, and long pauses.
steps_ms = st.one_of(st.just(0), st.integers(0, 50), st.integers(0, 3000))
# Mostly one client, so its bursts and pauses are long enough to matter.
clients = st.sampled_from(["a", "a", "a", "b", "c"])
traces = st.lists(st.tuples(clients, steps_ms), min_size=1, max_size=40)


def _capacity(rate: Fraction, capacity: Fraction | None) -> Fraction:
    return capacity if capacity is not None else max(Fraction(1), rate)


def _make(cls: type, rate: Fraction, capacity: Fraction | None):
    return cls(float(rate)) if capacity is None else cls(float(rate), float(capacity))


def _t(ms: int) -> str:
    return f"t={ms / 1000:.3f}"


def _n(x: Fraction) -> str:
    """A rate or capacity as a plain number: 0.5, 3, 100."""
    return f"{float(x):g}"


def _requests(n: int) -> str:
    return f"{n} allowed request{'' if n == 1 else 's'}"


class _IdealBucket:
    """One client's token bucket in exact arithmetic; times in milliseconds."""

    def __init__(self, rate: Fraction, capacity: Fraction) -> None:
        self.rate_per_ms = rate / 1000
        self.capacity = capacity
        self.tokens = capacity
        self.last_ms: int | None = None

    def refill(self, ms: int) -> Fraction:
        if self.last_ms is None:
            self.last_ms = ms
        elapsed = max(0, ms - self.last_ms)
        self.tokens = min(self.capacity, self.tokens + elapsed * self.rate_per_ms)
        self.last_ms = max(self.last_ms, ms)
        return self.tokens

    def take(self) -> None:
        self.tokens -= 1


@dataclass
class _Step:
    client: str
    ms: int
    allowed: bool            # what the implementation said
    ideal_tokens: Fraction   # what the ideal bucket held before deciding
    clock_ms: int            # the latest time seen before this request

    @property
    def ideal(self) -> bool | None:
        """The ideal decision, or None where floating point may decide either way."""
        if abs(self.ideal_tokens - 1) < TOLERANCE:
            return None
        return self.ideal_tokens >= 1


def _replay(cls: type, rate: Fraction, capacity: Fraction | None, requests: Sequence[tuple[str, int]]) -> list[_Step]:
    """Feed (client, time in ms) requests to a fresh implementation and to ideal buckets."""
    bucket = _make(cls, rate, capacity)
    ideal: dict[str, _IdealBucket] = {}
    out: list[_Step] = []
    clock = requests[0][1] if requests else 0
    for client, ms in requests:
        got = bool(bucket.is_allowed(client, now=ms / 1000))
        ref = ideal.setdefault(client, _IdealBucket(rate, _capacity(rate, capacity)))
        step = _Step(client, ms, got, ref.refill(ms), clock)
        # Where the ideal decision is a floating-point coin toss, follow the implementation.
        if (step.ideal if step.ideal is not None else got):
            ref.take()
        out.append(step)
        clock = max(clock, ms)
    return out


@dataclass(frozen=True)
class _Mistake:
    """A token bucket with one thing done wrong, replayed in exact arithmetic to see whether it
    explains what the implementation decided. ``why`` is what a student would change."""

    why: str
    cap: bool = True          # refill stops at the capacity
    clamp: bool = True        # a step back in time adds nothing (elapsed = max(0, now - last))
    keep_latest: bool = True  # the bucket's time never moves back (last = max(last, now))
    threshold: int = 1        # tokens needed to allow a request
    refill: bool = True
    shared: bool = False      # one bucket for every client

    def decisions(self, rate: Fraction, capacity: Fraction, requests: Sequence[tuple[str, int]],
                  actual: Sequence[bool]) -> list[bool]:
        """What this bucket decides; where its count is a floating-point coin toss, what ``actual`` did."""
        rate_per_ms = rate / 1000 if self.refill else Fraction(0)
        state: dict[str, list] = {}
        out = []
        for (client, ms), got in zip(requests, actual):
            tokens, last = state.setdefault("*" if self.shared else client, [capacity, ms])
            elapsed = max(0, ms - last) if self.clamp else abs(ms - last)
            tokens = tokens + elapsed * rate_per_ms
            if self.cap:
                tokens = min(capacity, tokens)
            last = max(last, ms) if self.keep_latest else ms
            allowed = got if abs(tokens - self.threshold) < TOLERANCE else tokens >= self.threshold
            state["*" if self.shared else client] = [tokens - 1 if allowed else tokens, last]
            out.append(allowed)
        return out


MISTAKES = [
    _Mistake("tokens are not capped at the capacity: refill with min(capacity, tokens + elapsed * rate)",
             cap=False),
    _Mistake("a clock that went backwards added tokens: the elapsed time must be max(0, now - updated_at)",
             clamp=False),
    _Mistake("a clock that went backwards moved the bucket's time back, so that time was refilled twice: "
             "keep updated_at = max(updated_at, now)", keep_latest=False),
    _Mistake("a request was allowed with less than one token: allow only when tokens >= 1", threshold=0),
    _Mistake("the bucket never refills: add elapsed * rate_per_s before deciding", refill=False),
    _Mistake("all clients share one bucket: each client id needs its own (self._bucket(client_id, now=now))",
             shared=True),
]


def likely_causes(rate: Fraction, capacity: Fraction | None, steps: Sequence[_Step]) -> str:
    """Which of the usual mistakes reproduce every decision of ``steps``: one line for the report.

    Only what the trace can tell apart is named; when several mistakes decide alike on it, all
    of them are, since the grader cannot know which one was made.
    """
    cap = _capacity(rate, capacity)
    requests = [(s.client, s.ms) for s in steps]
    actual = [s.allowed for s in steps]
    fits = [m.why for m in MISTAKES if m.decisions(rate, cap, requests, actual) == actual]
    if not fits:
        return ""
    if len(fits) == 1:
        return f"\nlikely cause: {fits[0]}"
    return ("\nlikely causes (on this input they decide alike): "
            + "; or ".join(fits))


def _absolute(trace: Sequence[tuple[str, int]], start_ms: int = 0) -> list[tuple[str, int]]:
    out, ms = [], start_ms
    for client, step in trace:
        ms += step
        out.append((client, ms))
    return out


def _window_bound(cls: type) -> Callable[[], None]:
    @given(rate=rates, capacity=capacities, trace=traces)
    def test(rate: Fraction, capacity: Fraction | None, trace: list[tuple[str, int]]) -> None:
        cap = _capacity(rate, capacity)
        steps = _replay(cls, rate, capacity, _absolute(trace))
        for client in {s.client for s in steps}:
            allowed = [s.ms for s in steps if s.client == client and s.allowed]
            for i, first in enumerate(allowed):
                for j in range(i, len(allowed)):
                    count = j - i + 1
                    bound = cap + rate * Fraction(allowed[j] - first, 1000)
                    if count > bound + TOLERANCE:
                        cause = likely_causes(rate, capacity, steps)
                        if allowed[j] == first:
                            raise Counterexample(
                                f"client {client!r}: after {_requests(count - 1)} at {_t(first)}, "
                                f"request {count} at the same instant was allowed too; the capacity is "
                                f"{_n(cap)}{cause}")
                        raise Counterexample(
                            f"client {client!r}: {count} requests were allowed between {_t(first)} and "
                            f"{_t(allowed[j])}; in {(allowed[j] - first) / 1000:.3f} s a bucket of capacity "
                            f"{_n(cap)} refilling at {_n(rate)}/s allows at most {math.floor(bound + TOLERANCE)}"
                            f"{cause}")
    return test


def _spaced_never_refused(cls: type) -> Callable[[], None]:
    @given(rate=rates, capacity=capacities, extra_ms=st.lists(st.integers(0, 2000), min_size=1, max_size=30))
    def test(rate: Fraction, capacity: Fraction | None, extra_ms: list[int]) -> None:
        min_gap = math.ceil(1000 / rate) + 1  # strictly more than 1/rate seconds
        bucket = _make(cls, rate, capacity)
        ms = 0
        for n, extra in enumerate(extra_ms, start=1):
            if not bucket.is_allowed("a", now=ms / 1000):
                raise Counterexample(
                    f"requests spaced at least {min_gap / 1000:.3f} s apart (more than 1/rate = "
                    f"{float(1 / rate):.3f} s) must never be refused, but request {n} at {_t(ms)} was")
            ms += min_gap + extra
    return test


def _matches_ideal(cls: type) -> Callable[[], None]:
    @given(rate=rates, capacity=capacities, trace=traces)
    def test(rate: Fraction, capacity: Fraction | None, trace: list[tuple[str, int]]) -> None:
        cap = _capacity(rate, capacity)
        steps = _replay(cls, rate, capacity, _absolute(trace))
        seen: dict[str, int] = {}
        for s in steps:
            seen[s.client] = seen.get(s.client, 0) + 1
            if s.ideal is not None and s.ideal != s.allowed:
                verdict = "allowed" if s.allowed else "refused"
                history = ", ".join(f"{x.client}@{x.ms / 1000:.3f}:{'ok' if x.allowed else 'no'}"
                                    for x in steps[:steps.index(s)]) or "none"
                raise Counterexample(
                    f"request {seen[s.client]} of client {s.client!r} at {_t(s.ms)} was {verdict}, but a "
                    f"token bucket (rate {_n(rate)}/s, capacity {_n(cap)}) held {float(s.ideal_tokens):.3f} tokens "
                    f"then, so it should have been {'allowed' if s.ideal else 'refused'}; "
                    f"earlier requests: {history}{likely_causes(rate, capacity, steps)}")
    return test


def _clients_independent(cls: type) -> Callable[[], None]:
    @given(rate=rates, capacity=capacities, trace=traces)
    def test(rate: Fraction, capacity: Fraction | None, trace: list[tuple[str, int]]) -> None:
        together = _replay(cls, rate, capacity, _absolute(trace))
        for client in {s.client for s in together}:
            mine = [s for s in together if s.client == client]
            alone = _replay(cls, rate, capacity, [(client, s.ms) for s in mine])
            for n, (a, b) in enumerate(zip(mine, alone), start=1):
                if a.allowed != b.allowed:
                    raise Counterexample(
                        f"request {n} of client {client!r} at {_t(a.ms)} was "
                        f"{'allowed' if b.allowed else 'refused'} when that client was alone but "
                        f"{'allowed' if a.allowed else 'refused'} when other clients sent requests too; "
                        "clients must not affect each other")
    return test


def _backwards_clock(cls: type) -> Callable[[], None]:
    back_steps = st.one_of(st.integers(-3000, -1), st.just(0), st.integers(0, 3000))

    @given(rate=rates, capacity=capacities, steps=st.lists(back_steps, min_size=2, max_size=30))
    def test(rate: Fraction, capacity: Fraction | None, steps: list[int]) -> None:
        cap = _capacity(rate, capacity)
        replayed = _replay(cls, rate, capacity, _absolute([("a", d) for d in steps], start_ms=10_000))
        for n, s in enumerate(replayed, start=1):
            if s.ideal is not None and s.ideal != s.allowed:
                times = ", ".join(_t(x.ms) for x in replayed[:n])
                went_back = any(x.ms < x.clock_ms for x in replayed[:n])
                raise Counterexample(
                    f"requests at {times}: the last was {'allowed' if s.allowed else 'refused'}, but a bucket of "
                    f"capacity {_n(cap)} at {_n(rate)}/s "
                    + ("(a clock going backwards counts as no time passing) " if went_back else "")
                    + f"held {float(s.ideal_tokens):.3f} tokens then and should have "
                    f"{'allowed' if s.ideal else 'refused'} it"
                    + (likely_causes(rate, capacity, replayed[:n])
                       or ("" if went_back else "; the clock had not gone backwards yet, so the cause is elsewhere "
                           "(the ideal-bucket property shows it too)")))
    return test


def _forgets_idle_clients(cls: type) -> Callable[[], None]:
    def test() -> None:
        # 20,000 one-off clients, 1 ms apart; a bucket refills in 0.1 s, so about 100 can be non-full
        # and the table is swept whenever it reaches max(1024, twice what survived the last sweep).
        bucket = cls(10.0)
        for i in range(20_000):
            bucket.is_allowed(f"client-{i}", now=i / 1000)
        if bucket.tracked_clients > 2 * bucket.MIN_SWEEP_MARK:
            raise Counterexample(
                f"after 20,000 one-off clients 1 ms apart (rate 10/s, so each bucket is full again after "
                f"0.1 s) {bucket.tracked_clients} buckets are still held; get buckets with "
                "self._bucket(client_id, now=now), which forgets the full ones")
    return test


RATE_LIMITER_PROPERTIES: list[Property] = [
    Property("window-bound", "in any window of t seconds, at most capacity + rate*t requests are allowed",
             _window_bound),
    Property("spaced-never-refused", "requests spaced more than 1/rate apart are never refused",
             _spaced_never_refused),
    Property("ideal-bucket", "every decision matches an exact token bucket", _matches_ideal),
    Property("clients-independent", "one client's requests never change another's decisions",
             _clients_independent),
    Property("backwards-clock", "a clock that steps backwards never mints tokens", _backwards_clock),
    Property("forgets-idle-clients", "buckets of idle clients are dropped, so memory stays bounded",
             _forgets_idle_clients),
]


# --------------------------------------------------------------------------
# Exercise 2: LeastConnectionsStrategy.select_node
# --------------------------------------------------------------------------
backend_lists = st.lists(st.tuples(st.integers(0, 6), st.booleans()), min_size=1, max_size=8).map(
    lambda specs: [Backend(f"node-{i + 1}", f"127.0.0.1:{5001 + i}", active, healthy=healthy)
                   for i, (active, healthy) in enumerate(specs)])
seeds = st.integers(0, 2**32 - 1)


def _show(backends: Sequence[Backend]) -> str:
    return ", ".join(f"{b.id}(active={b.active_connections}{'' if b.healthy else ', unhealthy'})" for b in backends)


def _picks_a_minimum(cls: type) -> Callable[[], None]:
    @given(backends=backend_lists, seed=seeds)
    def test(backends: list[Backend], seed: int) -> None:
        healthy = [b for b in backends if b.healthy]
        if not healthy:
            return
        chosen = cls(rng=random.Random(seed)).select_node(backends)
        if chosen not in backends:
            raise Counterexample(f"with backends {_show(backends)} it returned {chosen!r}, which is not one of them")
        if not chosen.healthy:
            raise Counterexample(f"with backends {_show(backends)} it picked {chosen.id}, which is unhealthy")
        fewest = min(b.active_connections for b in healthy)
        if chosen.active_connections != fewest:
            best = next(b for b in healthy if b.active_connections == fewest)
            raise Counterexample(
                f"with backends {_show(backends)} it picked {chosen.id} ({chosen.active_connections} active), "
                f"but {best.id} had only {fewest}")
    return test


def _no_healthy_raises(cls: type) -> Callable[[], None]:
    @given(n=st.integers(0, 5), seed=seeds)
    def test(n: int, seed: int) -> None:
        backends = [Backend(f"node-{i + 1}", healthy=False) for i in range(n)]
        try:
            chosen = cls(rng=random.Random(seed)).select_node(backends)
        except NoHealthyBackend:
            return
        raise Counterexample(
            f"with {n} backends, none healthy ({_show(backends) or 'an empty list'}), it returned {chosen!r} "
            "instead of raising NoHealthyBackend (self.healthy(backends) raises it for you)")
    return test


def _ties_shared(cls: type) -> Callable[[], None]:
    @given(k=st.integers(2, 6), active=st.integers(0, 3), seed=seeds)
    def test(k: int, active: int, seed: int) -> None:
        backends = [Backend(f"node-{i + 1}", active_connections=active) for i in range(k)]
        strategy = cls(rng=random.Random(seed))
        picks = 25 * k
        counts = {b.id: 0 for b in backends}
        for _ in range(picks):
            counts[strategy.select_node(backends).id] += 1
        starved = [i for i, c in counts.items() if c == 0]
        if starved:
            raise Counterexample(
                f"{k} backends tied at {active} active each; over {picks} picks {', '.join(starved)} never got "
                f"one ({', '.join(f'{i}: {c}' for i, c in counts.items())}); ties must be shared "
                "(round robin or at random), not always given to the same backend")
    return test


def _keeps_balance(cls: type) -> Callable[[], None]:
    @given(k=st.integers(1, 6), picks=st.integers(1, 60), seed=seeds)
    def test(k: int, picks: int, seed: int) -> None:
        active = {f"node-{i + 1}": 0 for i in range(k)}
        strategy = cls(rng=random.Random(seed))
        for n in range(1, picks + 1):
            chosen = strategy.select_node([Backend(i, active_connections=a) for i, a in active.items()])
            active[chosen.id] += 1
            if max(active.values()) - min(active.values()) > 1:
                raise Counterexample(
                    f"starting from {k} idle backends and never finishing a request, after {n} picks the "
                    f"loads were {active}; least connections keeps them within one of each other")
    return test


LEAST_CONNECTIONS_PROPERTIES: list[Property] = [
    Property("picks-a-minimum", "always picks a healthy backend with the fewest active connections",
             _picks_a_minimum),
    Property("no-healthy-raises", "no healthy backend raises NoHealthyBackend", _no_healthy_raises),
    Property("ties-shared", "ties are shared, never always the first backend", _ties_shared),
    Property("keeps-balance", "with no completions, loads stay within one of each other", _keeps_balance),
]

SUITES: dict[str, list[Property]] = {
    "rate-limiter": RATE_LIMITER_PROPERTIES,
    "least-connections": LEAST_CONNECTIONS_PROPERTIES,
}
