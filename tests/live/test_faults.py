"""Fault tests under load (issue 11): what SIGKILL of a node, SIGSTOP of a node for 10 s, a registry restart
and a balancer restart cost the clients of a balancer, each asserted against its figure.

Every test starts a registry, three nodes registered with it (4 workers, 20 ms mean service: ~25% busy at
the load below) and a balancer following the registry, all real ``testbed`` processes on loopback with the
default flags that matter here (health checks every 1 s, out after 1 failed check, registry polled every
2 s, heartbeats every 2 s, request timeout 30 s), and drives an open-loop load through the balancer
(:mod:`tests.live.faultload`). The figures each test measures are printed (``pytest -rP``): they are the
README's "Limits and failure behaviour" rows. Assertions are on counts and on the order of stamped events
on one clock, never on how fast this machine is; where an assertion compares a time with a figure of the
issue (2 health intervals, 2 heartbeats, 1 registry refresh), the figure is the issue's and the margin,
when there is one, is stated beside it.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from typing import Any, AsyncIterator, Callable, Iterator

import aiohttp
import pytest

from tests.live.faultload import Cluster, OpenLoopLoad, Outcome, get_json, stopped, throttled
from tests.live.polling import until

RATE_PER_S = 150.0         # the issue's "steady load" (100-200 req/s), ~25% of the three nodes' capacity
HEALTH_INTERVAL_S = 1.0    # balancer --health-interval default
REFRESH_S = 2.0            # balancer --refresh-interval default
HEARTBEAT_S = 2.0          # node --heartbeat-interval default
STOP_S = 10.0              # how long the hung node stays stopped (the fault)
NODE_ARGS = ("--workers", "4", "--load-factor", "20")
VICTIM = "node-2"
POLL_STATS_S = 0.05        # how often a check may read /lb-stats or /nodes (see faultload.throttled)
# "Within 2 health intervals" with the machine's lateness allowed for: a health check is a timer, a
# timeout and a request in a balancer sharing 2 cores with other test runs. 0.5 s (a quarter of the
# figure) is that allowance; measured here: 1.5-1.6 s with active checks alone (a check's 1 s timeout after
# up to 1 s of wait), 0.7 s with passive outlier detection (printed by the test).
SCHEDULING_MARGIN_S = 0.5
TRACE_EVERY_S = 0.1        # sampling of /lb-stats while the node is stopped


@pytest.fixture
def cluster() -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(**kwargs: Any) -> Cluster:
        made.append(Cluster(**{"node_args": NODE_ARGS, **kwargs}))
        return made[-1]
    yield make
    for c in made:
        c.stop()


def now() -> float:
    return asyncio.get_running_loop().time()


def holds(predicate: Callable[[], bool]) -> Callable[[], Any]:
    """A plain predicate as an ``until`` check."""
    async def check() -> bool:
        return predicate()
    return check


@contextlib.asynccontextmanager
async def under_load(c: Cluster, ctl: aiohttp.ClientSession, *, max_duration_s: float,
                     request_timeout_s: float = 10.0) -> AsyncIterator[OpenLoopLoad]:
    """The balancer follows every node; the load runs and each node has served some of it; on the way
    out the load stops and every request it sent has ended."""
    async def all_in_rotation() -> bool:
        backends = (await get_json(ctl, c.balancer.url + "/lb-stats"))["backends"]
        return sorted(backends) == sorted(c.nodes) and all(b["healthy"] for b in backends.values())
    await until(throttled(all_in_rotation, POLL_STATS_S), timeout_s=15, what="the balancer to follow every node")
    load = OpenLoopLoad(c.balancer.url + "/work", rate_per_s=RATE_PER_S, max_duration_s=max_duration_s,
                        request_timeout_s=request_timeout_s)
    task = asyncio.create_task(load.run())
    try:
        await until(holds(lambda: all(load.answered_by(n) >= 20 for n in c.nodes)), timeout_s=15,
                    what="every node to serve 20 requests of the load")
        yield load
    finally:
        load.stop()
        await task


async def backend_stats(ctl: aiohttp.ClientSession, c: Cluster, backend: str) -> dict[str, Any] | None:
    return (await get_json(ctl, c.balancer.url + "/lb-stats"))["backends"].get(backend)


def report(what: str, **figures: Any) -> None:
    print(f"FIGURE {what}: " + ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                                          for k, v in figures.items()))


def describe(outcomes: list[Outcome], t0: float) -> list[tuple[float, int | None, str | None, str | None]]:
    """Outcomes for an assertion message: (sent after t0 in s, status, backend, error)."""
    return [(round(o.sent_at - t0, 3), o.status, o.backend, o.error) for o in outcomes][:20]


async def test_sigkill_of_a_node_loses_at_most_its_in_flight_requests(cluster) -> None:
    c = cluster()
    victim = c.nodes[VICTIM]
    async with aiohttp.ClientSession() as ctl, under_load(c, ctl, max_duration_s=20) as load:
        node_says = (await get_json(ctl, victim.url + "/stats"))["active_requests"] - 1  # not this /stats
        # Dying takes the kernel a moment (signal, exit, sockets closed): the node dies somewhere in
        # [t0, t1], t1 being when its exit was reaped, an upper bound.
        t0 = now()
        await stopped(victim, signal.SIGKILL)
        t1 = now()
        seen: dict[str, Any] = {}

        async def out_of_rotation() -> bool:
            seen["b"] = await backend_stats(ctl, c, VICTIM)
            return seen["b"] is None or not seen["b"]["healthy"] or seen["b"]["ejector"] == "OPEN"
        await until(throttled(out_of_rotation, POLL_STATS_S), timeout_s=10,
                    what="the balancer to take the killed node out")
        t_out, attempts_when_out = now(), seen["b"] and seen["b"]["requests"]
        # Two health intervals' worth of the load after that: time for a check-driven comeback, were
        # there one, to show up as attempts on the dead node.
        await until(holds(lambda: load.done_after(t_out) >= RATE_PER_S * 2 * HEALTH_INTERVAL_S), timeout_s=15,
                    what="more requests after the node was out")
        at_end = await backend_stats(ctl, c, VICTIM)
    failures = load.failures()
    in_flight = [o for o in load.outcomes if o.backend == VICTIM and o.in_flight_at(t0, t1)]
    after = [o for o in load.outcomes if o.sent_at > t1]
    report("SIGKILL of a node", rate_per_s=RATE_PER_S, requests=len(load.outcomes), lost=len(failures),
           in_flight_on_victim_client_side=len(in_flight), node_active_requests_just_before=node_says,
           dying_s=t1 - t0, out_of_rotation_after_s=t_out - t0, attempts_on_dead_node_after_out=(
               None if at_end is None or attempts_when_out is None else at_end["requests"] - attempts_when_out))
    # Lost <= in flight on the killed node, in its strongest form: every lost request is one the balancer
    # had sent to the victim before it was dead and that had not ended when the kill was sent.
    assert all(o in in_flight for o in failures), describe([o for o in failures if o not in in_flight], t0)
    assert len(failures) <= len(in_flight)
    # Everything sent after the kill was served, by the other nodes (refused connections retried elsewhere).
    assert all(o.ok and o.backend != VICTIM for o in after), describe([o for o in after if not o.ok], t0)
    # The balancer stopped sending to it: no attempt on it after it was out (or it left the books).
    assert at_end is None or at_end["requests"] == attempts_when_out, (attempts_when_out, at_end)


async def test_sigstop_of_a_node_takes_it_out_within_two_health_intervals(cluster) -> None:
    c = cluster()
    victim = c.nodes[VICTIM]
    trace: list[tuple[float, bool]] = []  # (s after the stop, in rotation per /lb-stats)
    async with aiohttp.ClientSession() as ctl:
        # Requests the hung node holds end when it resumes (balancer --timeout is 30 s): the client waits longer.
        async with under_load(c, ctl, max_duration_s=40, request_timeout_s=STOP_S + 15) as load:
            t_stop = now()
            victim.send(signal.SIGSTOP)
            try:
                # The fault lasts STOP_S; meanwhile, the balancer's view of the hung node, for the report.
                while now() < t_stop + STOP_S:
                    b = await backend_stats(ctl, c, VICTIM)
                    trace.append((now() - t_stop, b is not None and b["healthy"] and b["ejector"] != "OPEN"))
                    await asyncio.sleep(min(TRACE_EVERY_S, max(0.0, t_stop + STOP_S - now())))  # sampling
            finally:
                victim.send(signal.SIGCONT)
            t_cont = now()
            await until(holds(lambda: load.answered_by(VICTIM, sent_after=t_cont) >= 10), timeout_s=15,
                        what="the resumed node to serve again")
            t_back = min(o.sent_at for o in load.outcomes if o.ok and o.backend == VICTIM and o.sent_at > t_cont)
    during = [o for o in load.outcomes if t_stop <= o.sent_at < t_cont]
    to_victim = [o for o in during if o.backend == VICTIM]
    others = [o for o in during if o.backend != VICTIM]
    last_routed_s = max((o.sent_at - t_stop for o in to_victim), default=0.0)
    lb_out_s = next((t for t, in_rotation in trace if not in_rotation), None)
    report("SIGSTOP of a node for 10 s", rate_per_s=RATE_PER_S, sent_while_stopped=len(during),
           routed_to_hung_node=len(to_victim), last_routed_after_s=last_routed_s,
           lb_stats_out_after_s=lb_out_s, delayed_over_1s=sum(1 for o in to_victim if o.done_at - o.sent_at > 1),
           max_delay_s=max((o.done_at - o.sent_at for o in to_victim), default=0.0),
           failed=len(load.failures()), back_after_sigcont_s=t_back - t_cont)
    # The other nodes keep serving: every request the balancer did not give the hung node was a 200.
    assert all(o.ok for o in others), describe([o for o in others if not o.ok], t_stop)
    # Out of rotation within 2 health intervals: nothing sent later than that reached the hung node. Send
    # times are before routing times, so this errs toward passing by the client->balancer hop only.
    late = [o for o in to_victim if o.sent_at > t_stop + 2 * HEALTH_INTERVAL_S + SCHEDULING_MARGIN_S]
    assert not late, f"{len(late)} requests routed to the hung node more than 2 health intervals after SIGSTOP, " \
                     f"the last {last_routed_s:.2f} s after: {describe(late, t_stop)}"
    # And the balancer says so itself (its /lb-stats, sampled every TRACE_EVERY_S).
    assert lb_out_s is not None and lb_out_s <= 2 * HEALTH_INTERVAL_S + SCHEDULING_MARGIN_S + TRACE_EVERY_S, trace
    # It comes back after SIGCONT (the until above), and the requests it held were answered, not dropped.
    assert all(o.ok for o in to_victim), describe([o for o in to_victim if not o.ok], t_stop)


async def registry_restart(c: Cluster, refresh_s: float) -> dict[str, Any]:
    """SIGKILL the registry under load, start it again on its port once every node's heartbeat and the
    balancer's poll have failed against it, and wait for every node to be registered again and the balancer
    to follow all of them; what happened, for the tests' assertions."""
    members: list[tuple[float, int]] = []  # (s after the kill, backends the balancer follows)
    async with aiohttp.ClientSession() as ctl, under_load(c, ctl, max_duration_s=30) as load:
        port, failures_before = c.registry.port, {}
        for node_id, node in c.nodes.items():
            failures_before[node_id] = (await get_json(ctl, node.url + "/discovery-status"))["failures"]
        warnings_before = c.balancer.output().count("keeping the last membership")
        t_kill = now()
        await stopped(c.registry, signal.SIGKILL)

        async def membership() -> int:
            n = len((await get_json(ctl, c.balancer.url + "/lb-stats"))["backends"])
            members.append((now() - t_kill, n))
            return n

        async def down_noticed() -> bool:
            await membership()
            beats = [(await get_json(ctl, n.url + "/discovery-status"))["failures"] > failures_before[i]
                     for i, n in c.nodes.items()]
            return all(beats) and c.balancer.output().count("keeping the last membership") > warnings_before
        await until(throttled(down_noticed, POLL_STATS_S), timeout_s=3 * max(HEARTBEAT_S, refresh_s),
                    what="every node and the balancer to find the registry down")
        c.registry = await c.start_async("registry", "--port", str(port))
        t_up = now()

        async def all_registered() -> bool:
            await membership()
            return (await get_json(ctl, c.registry.url + "/nodes"))["count"] == len(c.nodes)
        await until(throttled(all_registered, POLL_STATS_S), timeout_s=5 * HEARTBEAT_S,
                    what="every node to register again")
        t_all = now()

        async def followed() -> bool:  # and a refresh's worth of the load after that
            return (await membership() == len(c.nodes)
                    and load.done_after(t_all) >= RATE_PER_S * max(refresh_s, HEALTH_INTERVAL_S))
        await until(throttled(followed, POLL_STATS_S), timeout_s=3 * refresh_s + 5,
                    what="the balancer to follow every node again")
        registrations = [(await get_json(ctl, n.url + "/discovery-status"))["registrations"]
                         for n in c.nodes.values()]
    failures = load.failures()
    report(f"registry restart (SIGKILL, same port), balancer --refresh-interval {refresh_s:g}",
           rate_per_s=RATE_PER_S, requests=len(load.outcomes), lost=len(failures), registry_down_s=t_up - t_kill,
           all_registered_after_up_s=t_all - t_up, heartbeat_s=HEARTBEAT_S,
           fewest_backends_followed=min(n for _, n in members), registrations=registrations)
    return {"failures": failures, "t_kill": t_kill, "reregistered_s": t_all - t_up, "members": members,
            "registrations": registrations}


async def test_registry_restart_loses_nothing_and_nodes_reregister_within_two_heartbeats(cluster) -> None:
    c = cluster()
    got = await registry_restart(c, REFRESH_S)
    assert all(r >= 2 for r in got["registrations"]), got["registrations"]
    # Every node registered again within 2 heartbeats of the registry being up (the figure; the
    # mechanism needs at most one: the next heartbeat's 404 re-registers at once).
    assert got["reregistered_s"] <= 2 * HEARTBEAT_S, got["reregistered_s"]
    # Clients saw nothing.
    assert not got["failures"], describe(got["failures"], got["t_kill"])


async def test_registry_restart_keeps_the_membership_while_the_registry_is_refilling(cluster) -> None:
    # Failed from 388152f until the refill window (core/registry_follower.py): the balancer followed a freshly
    # restarted registry's partial listing, so the nodes
    # that had not heartbeated since the restart were dropped (once idle), all of them while the registry
    # was still empty, and clients got 503 no_healthy_backend until a refresh after they were back (31-218
    # requests here). Now the registry's listing names its instance and the balancer keeps the members a
    # new instance does not list yet for its TTL.
    # The test above leaves to chance whether the balancer polls the new registry before the nodes are back
    # in it (a matter of phase: the window is up to one heartbeat in every refresh; it happens in some runs)
    # and whether the missing nodes are idle then. Polling every 0.1 s makes that poll certain, and 2 ms
    # work (instead of 20) leaves the nodes idle most of the time, as they are at light load.
    c = cluster(balancer_args=("--refresh-interval", "0.1"), node_args=("--workers", "4", "--load-factor", "2"))
    got = await registry_restart(c, 0.1)
    assert not got["failures"], describe(got["failures"], got["t_kill"])
    assert min(n for _, n in got["members"]) == len(c.nodes), got["members"]


async def test_balancer_restart_fails_requests_only_while_it_is_down(cluster) -> None:
    # Failed at 388152f in about 2 runs of 3 (1-3 requests), and every run once new members waited for
    # their first health check (14-16 requests): the new balancer accepted connections before it knew a
    # healthy backend, and answered 503 no_healthy_backend meanwhile. Now it listens once warm (first
    # registry poll and first checks done, at most --warmup-timeout), as Envoy starts listeners after its
    # clusters' initial fetch.
    c = cluster()
    async with aiohttp.ClientSession() as ctl, under_load(c, ctl, max_duration_s=20) as load:
        port = c.balancer.port
        t_term = now()
        await stopped(c.balancer, signal.SIGTERM)
        t_exit = now()
        c.balancer = await c.start_async(*c.balancer_command(port=port))
        t_up = now()
        await until(holds(lambda: all(load.answered_by(n, sent_after=t_up) >= 10 for n in c.nodes)),
                    timeout_s=10, what="the restarted balancer to serve through every node")
    failures = load.failures()
    first_ok = min(o.sent_at for o in load.outcomes if o.ok and o.sent_at > t_up)
    after_up = [o for o in failures if o.sent_at > t_up]
    report("balancer restart (SIGTERM, same port)", rate_per_s=RATE_PER_S, requests=len(load.outcomes),
           lost=len(failures), refused=sum(o.error == "refused" for o in failures),
           cut=sum(o.error in ("disconnected", "reset") for o in failures),
           other=sorted({o.error for o in failures} - {"refused", "disconnected", "reset"}),
           drain_s=t_exit - t_term, down_s=t_up - t_term, lost_after_up=len(after_up),
           serves_after_up_s=first_ok - t_up, refresh_s=REFRESH_S)
    # Requests fail only while it is down: each failed one was out between the SIGTERM and the new
    # "listening on" line, and failed at the connection (refused, or cut by the old balancer's shutdown),
    # never with an HTTP error.
    assert all(o.in_flight_at(t_term, t_up) for o in failures), describe(
        [o for o in failures if not o.in_flight_at(t_term, t_up)], t_term)
    assert all(o.status is None for o in failures), describe([o for o in failures if o.status is not None], t_term)
    # Up again, it serves within one registry refresh.
    assert first_ok - t_up <= REFRESH_S, first_ok - t_up


async def test_the_cluster_s_balancer_lets_the_load_generator_name_its_clients(cluster) -> None:
    # Fails at 93f7d9d: the cluster's balancer had no --trust-clients, so it dropped every X-Client-ID and
    # the node saw one client (the balancer's address) where the runner's cluster (live/cluster.py
    # balancer_args) shows it each client the load generator names.
    c = cluster(node_ids=("node-1",), node_args=(*NODE_ARGS, "--trust-proxy", "127.0.0.1", "--rate-limit", "1000"))
    names = [f"client-{i}" for i in range(5)]
    async with aiohttp.ClientSession() as ctl:
        async def followed() -> bool:
            backends = (await get_json(ctl, c.balancer.url + "/lb-stats"))["backends"]
            return "node-1" in backends and backends["node-1"]["healthy"]
        await until(throttled(followed, POLL_STATS_S), timeout_s=15, what="the balancer to follow the node")
        before = (await get_json(ctl, c.nodes["node-1"].url + "/stats"))["rate_limiter"]["clients"]
        for name in names:
            async with ctl.get(c.balancer.url + "/work", headers={"X-Client-ID": name}) as resp:
                assert resp.status == 200, await resp.text()
        after = (await get_json(ctl, c.nodes["node-1"].url + "/stats"))["rate_limiter"]["clients"]
    # Each name is a new client to the node (its bucket table grew by 5); untrusted, all five would have
    # been the balancer's address, at most one new entry.
    assert after - before == len(names), (before, after)
