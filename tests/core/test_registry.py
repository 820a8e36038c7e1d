"""Membership: registration, heartbeats, expiry after the TTL, removal, restarts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core._validate import ConfigError
from core.registry import HeartbeatResult, Membership, MemberStatus


def ids(table: Membership, now: float, **kw) -> list[str]:
    return [m.id for m in table.members(now=now, **kw)]


def test_register_and_list() -> None:
    table = Membership()
    member = table.register("node-2", "http://127.0.0.1:5002", {"workers": 4}, now=0.0)
    table.register("node-1", "http://127.0.0.1:5001", now=0.5)
    assert member.status is MemberStatus.ALIVE and member.incarnation == 1
    assert member.metadata["workers"] == 4
    assert ids(table, 1.0) == ["node-1", "node-2"]


def test_heartbeats_keep_a_node_alive() -> None:
    table = Membership(ttl_s=5.0)
    table.register("n", "a", now=0.0)
    for t in range(2, 21, 2):  # every 2 s, as the nodes do
        assert table.heartbeat("n", now=float(t)) is HeartbeatResult.OK
    assert ids(table, 24.9) == ["n"]


def test_silent_node_dies_after_ttl_then_is_removed() -> None:
    table = Membership(ttl_s=5.0, remove_after_s=10.0)
    table.register("n", "a", now=0.0)
    assert ids(table, 4.999) == ["n"]
    assert ids(table, 5.0) == []
    assert ids(table, 5.0, include_dead=True) == ["n"]
    assert table.get("n", now=5.0).status is MemberStatus.DEAD
    assert table.get("n", now=15.0) is None
    assert [(e.kind, e.at) for e in table.drain_events()] == [("joined", 0.0), ("died", 5.0), ("removed", 15.0)]


def test_a_late_heartbeat_revives_a_dead_node() -> None:
    table = Membership(ttl_s=5.0)
    table.register("n", "a", now=0.0)
    assert ids(table, 6.0) == []
    assert table.heartbeat("n", now=6.0) is HeartbeatResult.OK
    assert ids(table, 6.0) == ["n"]
    assert [e.kind for e in table.drain_events()] == ["joined", "died", "revived"]


def test_unknown_heartbeat_asks_to_register_again() -> None:
    table = Membership()
    assert table.heartbeat("ghost", now=0.0) is HeartbeatResult.UNKNOWN
    table.register("n", "a", now=0.0)
    assert table.heartbeat("n", now=100.0) is HeartbeatResult.UNKNOWN  # forgotten meanwhile


def test_registry_restart_gets_every_node_back_within_one_interval() -> None:
    before = Membership()
    for i in range(3):
        before.register(f"n{i}", f"addr{i}", now=0.0)
    restarted = Membership()  # a new process knows nothing
    for i in range(3):       # each node's next heartbeat ...
        if restarted.heartbeat(f"n{i}", now=2.0) is HeartbeatResult.UNKNOWN:
            restarted.register(f"n{i}", f"addr{i}", now=2.0)  # ... makes it register again
    assert ids(restarted, 2.0) == ids(before, 2.0)


def test_re_registering_starts_a_new_incarnation() -> None:
    table = Membership()
    table.register("n", "http://127.0.0.1:5001", now=0.0)
    again = table.register("n", "http://127.0.0.1:6001", now=1.0)
    assert again.incarnation == 2 and again.address.endswith("6001")
    assert len(table.members(now=1.0)) == 1


def test_deregister() -> None:
    table = Membership()
    table.register("n", "a", now=0.0)
    assert table.deregister("n", now=1.0)
    assert not table.deregister("n", now=1.0)
    assert ids(table, 1.0, include_dead=True) == []


def test_heartbeat_can_update_metadata() -> None:
    table = Membership()
    table.register("n", "a", {"active": 0}, now=0.0)
    table.heartbeat("n", now=1.0, metadata={"active": 7})
    assert table.get("n", now=1.0).metadata == {"active": 7}


def test_backwards_clock_is_no_time_passing() -> None:
    table = Membership(ttl_s=5.0)
    table.register("n", "a", now=100.0)
    table.heartbeat("n", now=50.0)  # treated as t=100
    assert ids(table, 104.9) == ["n"]
    assert ids(table, 105.0) == []


def test_next_deadline() -> None:
    table = Membership(ttl_s=5.0, remove_after_s=3.0)
    assert table.next_deadline() is None
    table.register("a", "x", now=0.0)
    table.register("b", "x", now=1.0)
    assert table.next_deadline() == 5.0
    table.members(now=5.0)
    assert table.next_deadline() == 6.0   # b dies at 6 (a is removed at 8)


@pytest.mark.parametrize("kwargs, field", [
    ({"ttl_s": 0}, "ttl_s"), ({"remove_after_s": -1}, "remove_after_s"),
    ({"ttl_s": 1, "heartbeat_interval_s": 2}, "heartbeat_interval_s"),
])
def test_bad_configuration_names_the_field(kwargs, field) -> None:
    with pytest.raises(ConfigError, match=field):
        Membership(**kwargs)


@pytest.mark.parametrize("bad", ["", "  ", None, 5])
def test_bad_node_id_is_refused(bad) -> None:
    with pytest.raises(ConfigError, match="node_id"):
        Membership().register(bad, "a", now=0.0)


@given(ops=st.lists(st.tuples(st.sampled_from(["register", "heartbeat", "deregister", "wait"]),
                              st.sampled_from(["a", "b", "c"]), st.sampled_from([0.0, 0.5, 2.0, 4.0, 7.0])),
                    max_size=60))
def test_matches_a_full_scan_model(ops) -> None:
    """The lazy, ordered expiry agrees with scanning every member at every step."""
    ttl, remove_after = 5.0, 3.0
    table = Membership(ttl_s=ttl, remove_after_s=remove_after)
    last: dict[str, float] = {}
    now = 0.0
    for op, node, dt in ops:
        if op == "wait":
            now += dt
        # model: forget the long silent, then apply the op
        last = {n: t for n, t in last.items() if now < t + ttl + remove_after}
        if op == "register":
            table.register(node, "addr", now=now)
            last[node] = now
        elif op == "heartbeat":
            result = table.heartbeat(node, now=now)
            assert result is (HeartbeatResult.OK if node in last else HeartbeatResult.UNKNOWN)
            if node in last:
                last[node] = now
        elif op == "deregister":
            assert table.deregister(node, now=now) == (node in last)
            last.pop(node, None)
        alive = sorted(n for n, t in last.items() if now < t + ttl)
        assert ids(table, now) == alive
        assert ids(table, now, include_dead=True) == sorted(last)
