"""The node's request path: order of the middleware, FIFO workers, settling, crashes (literal times)."""

from __future__ import annotations

import pytest
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from core.circuit_breaker import State
from core.node_pipeline import NodePipeline, Rejected, Ticket, TicketSettled
from core.results import Outcome
from core.scenario import BreakerSpec, NodeSpec
from solutions.token_bucket_solution import TokenBucketSolution


def pipeline(**spec) -> NodePipeline:
    return NodePipeline(NodeSpec("n1", **spec), TokenBucketSolution)


def test_without_middleware_workers_serve_first_come_first_served() -> None:
    p = pipeline(workers=2)
    a, b, c, d = (p.admit(x, now=0.0) for x in "abcd")
    assert [t.started for t in (a, b, c, d)] == [True, True, False, False]
    assert (p.busy, p.waiting) == (2, 2)
    assert p.complete(b, failed=False, now=1.0) is c and c.started
    assert p.complete(a, failed=False, now=1.0) is d
    assert p.complete(c, failed=False, now=2.0) is None
    assert p.complete(d, failed=False, now=2.0) is None
    assert (p.busy, p.waiting) == (0, 0)


def test_the_rate_limiter_comes_first_with_its_headers() -> None:
    p = pipeline(rate_limit_per_s=1.0, rate_limit_burst=1.0, backpressure=1)
    first = p.admit("a", now=0.0)
    assert isinstance(first, Ticket) and first.headers["RateLimit-Remaining"] == "0"
    second = p.admit("a", now=0.0)
    assert isinstance(second, Rejected) and second.outcome is Outcome.RATE_LIMITED and second.status == 429
    assert second.headers["Retry-After"] == "1" and "1 requests/s" in second.message
    third = p.admit("b", now=0.0)  # another client, but the node is full
    assert isinstance(third, Rejected) and third.outcome is Outcome.BACKPRESSURE and third.code == "backpressure"
    assert p.gate.stats().rejected == 1  # the rate limiter's refusal never reached the gate


def test_a_breaker_refusal_gives_the_gate_place_back() -> None:
    p = pipeline(backpressure=2, circuit_breaker=BreakerSpec(failure_threshold=1, recovery_timeout_s=5.0))
    t = p.admit("a", now=0.0)
    p.complete(t, failed=True, now=0.1)
    assert p.breaker.state is State.OPEN
    for i in range(10):  # many refusals while it is open; none may keep a place
        refused = p.admit("a", now=0.5 + 0.4 * i)
        assert isinstance(refused, Rejected) and refused.outcome is Outcome.CIRCUIT_OPEN and refused.status == 503
    assert refused.headers["Retry-After"] == "1" and refused.retry_after_s == pytest.approx(5.1 - 4.1)
    assert p.gate.current == 0
    probe = p.admit("a", now=5.2)  # half-open: one probe, which closes it
    assert isinstance(probe, Ticket)
    p.complete(probe, failed=False, now=5.3)
    assert p.breaker.state is State.CLOSED and p.gate.current == 0


def test_abandoning_a_queued_ticket_leaves_the_queue_and_the_gate() -> None:
    p = pipeline(workers=1, backpressure=3)
    a, b, c = (p.admit(x, now=0.0) for x in "abc")
    assert p.abandon(b, now=0.5) is None
    assert p.waiting == 1 and p.gate.current == 2
    assert p.complete(a, failed=False, now=1.0) is c


def test_abandoning_in_service_hands_the_worker_on_and_says_nothing_to_the_breaker() -> None:
    p = pipeline(workers=1, circuit_breaker=BreakerSpec(failure_threshold=1))
    a, b = p.admit("a", now=0.0), p.admit("b", now=0.0)
    assert p.abandon(a, now=0.5) is b and b.started
    assert p.breaker.state is State.CLOSED
    p.complete(b, failed=False, now=1.0)
    assert p.breaker.status(now=1.0)["state"] == "CLOSED"


def test_settling_twice_is_a_driver_bug() -> None:
    p = pipeline()
    t = p.admit("a", now=0.0)
    p.complete(t, failed=False, now=1.0)
    with pytest.raises(TicketSettled):
        p.complete(t, failed=False, now=1.0)
    with pytest.raises(TicketSettled):
        p.abandon(t, now=1.0)


def test_a_crash_loses_what_is_inside_and_comes_back_fresh() -> None:
    p = pipeline(workers=1, rate_limit_per_s=1.0, backpressure=5, circuit_breaker=BreakerSpec(failure_threshold=1))
    a, b = p.admit("a", now=0.0), p.admit("b", now=0.0)
    lost = p.crash()
    assert set(lost) == {a, b}
    assert (p.busy, p.waiting, p.gate.current) == (0, 0, 0)
    assert p.complete(a, failed=True, now=1.0) is None  # void: from before the crash
    assert p.breaker.state is State.CLOSED
    assert isinstance(p.admit("a", now=0.0), Ticket)  # a fresh bucket too


class PipelineMachine(RuleBasedStateMachine):
    """The pipeline against a model of a FIFO queue with ``workers`` servers and a bound on places."""

    def __init__(self) -> None:
        super().__init__()
        self.p = pipeline(workers=2, backpressure=4)
        self.now = 0.0
        self.serving: list[Ticket] = []
        self.queued: list[Ticket] = []
        self.refused = 0

    @rule(client=st.sampled_from("abc"))
    def admit(self, client: str) -> None:
        got = self.p.admit(client, now=self.now)
        inside = len(self.serving) + len(self.queued)
        if inside >= 4:
            assert isinstance(got, Rejected) and got.outcome is Outcome.BACKPRESSURE
            return
        assert isinstance(got, Ticket)
        if len(self.serving) < 2:
            assert got.started
            self.serving.append(got)
        else:
            assert not got.started
            self.queued.append(got)

    def _started(self, following: Ticket | None) -> None:
        if self.queued:
            assert following is self.queued[0]  # first come, first served
            self.serving.append(self.queued.pop(0))
        else:
            assert following is None

    @precondition(lambda self: self.serving)
    @rule(i=st.integers(0, 1), failed=st.booleans())
    def complete(self, i: int, failed: bool) -> None:
        t = self.serving.pop(i % len(self.serving))
        self._started(self.p.complete(t, failed=failed, now=self.now))

    @precondition(lambda self: self.serving or self.queued)
    @rule(i=st.integers(0, 5))
    def abandon(self, i: int) -> None:
        everyone = self.serving + self.queued
        t = everyone[i % len(everyone)]
        following = self.p.abandon(t, now=self.now)
        if t in self.queued:
            self.queued.remove(t)
            assert following is None
        else:
            self.serving.remove(t)
            self._started(following)

    @rule()
    def crash(self) -> None:
        assert set(self.p.crash()) == set(self.serving + self.queued)
        self.serving, self.queued = [], []

    @rule(dt=st.floats(0, 2))
    def advance(self, dt: float) -> None:
        self.now += dt

    @invariant()
    def counts_agree(self) -> None:
        assert self.p.busy == len(self.serving) <= 2
        assert self.p.waiting == len(self.queued)
        assert self.p.gate.current == len(self.serving) + len(self.queued)


TestPipelineMachine = PipelineMachine.TestCase
