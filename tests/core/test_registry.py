"""Membership: registration, heartbeats, expiry after the TTL, removal, restarts."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core._validate import ConfigError
from core.registry import (HeartbeatResult, IdTaken, LeaseMismatch, Membership, MemberStatus, MetadataLimits,
                           MetadataRefused, RegistryFull, valid_node_id)


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
    lease = table.register("n", "a", now=0.0).lease
    for t in range(2, 21, 2):  # every 2 s, as the nodes do
        assert table.heartbeat("n", now=float(t), lease=lease) is HeartbeatResult.OK
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
    lease = table.register("n", "a", now=0.0).lease
    assert ids(table, 6.0) == []
    assert table.heartbeat("n", now=6.0, lease=lease) is HeartbeatResult.OK
    assert ids(table, 6.0) == ["n"]
    assert [e.kind for e in table.drain_events()] == ["joined", "died", "revived"]


def test_unknown_heartbeat_asks_to_register_again() -> None:
    table = Membership()
    assert table.heartbeat("ghost", now=0.0) is HeartbeatResult.UNKNOWN
    lease = table.register("n", "a", now=0.0).lease
    assert table.heartbeat("n", now=100.0, lease=lease) is HeartbeatResult.UNKNOWN  # forgotten meanwhile


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
    lease = table.register("n", "http://127.0.0.1:5001", now=0.0).lease
    again = table.register("n", "http://127.0.0.1:5001", now=1.0, lease=lease)
    assert again.incarnation == 2 and again.lease == lease
    assert len(table.members(now=1.0)) == 1


def test_deregister() -> None:
    table = Membership()
    lease = table.register("n", "a", now=0.0).lease
    assert table.deregister("n", now=1.0, lease=lease)
    assert not table.deregister("n", now=1.0, lease=lease)
    assert ids(table, 1.0, include_dead=True) == []


def test_heartbeat_can_update_metadata() -> None:
    table = Membership()
    lease = table.register("n", "a", {"active": 0}, now=0.0).lease
    table.heartbeat("n", now=1.0, metadata={"active": 7}, lease=lease)
    assert table.get("n", now=1.0).metadata == {"active": 7}


def test_backwards_clock_is_no_time_passing() -> None:
    table = Membership(ttl_s=5.0)
    lease = table.register("n", "a", now=100.0).lease
    table.heartbeat("n", now=50.0, lease=lease)  # treated as t=100
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


@pytest.mark.parametrize("bad", ["", "  ", None, 5, "a/b", "a b", ".", "..", "x" * 201, "caf\u00e9", "a\nb"])
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
    leases: dict[str, str] = {}
    now = 0.0
    for op, node, dt in ops:
        if op == "wait":
            now += dt
        # model: forget the long silent, then apply the op
        last = {n: t for n, t in last.items() if now < t + ttl + remove_after}
        if op == "register":
            leases[node] = table.register(node, "addr", now=now).lease
            last[node] = now
        elif op == "heartbeat":
            result = table.heartbeat(node, now=now, lease=leases.get(node))
            assert result is (HeartbeatResult.OK if node in last else HeartbeatResult.UNKNOWN)
            if node in last:
                last[node] = now
        elif op == "deregister":
            assert table.deregister(node, now=now, lease=leases.get(node)) == (node in last)
            last.pop(node, None)
        alive = sorted(n for n, t in last.items() if now < t + ttl)
        assert ids(table, now) == alive
        assert ids(table, now, include_dead=True) == sorted(last)


# -- ownership: a registration belongs to the instance that made it (issue 11, item 1) ----------------------
A, B = "http://127.0.0.1:5001", "http://127.0.0.1:6666"


def test_register_hands_out_a_lease_that_heartbeats_must_present() -> None:
    table = Membership(ttl_s=5.0)
    lease = table.register("n", A, now=0.0).lease
    assert lease and table.heartbeat("n", now=1.0, lease=lease) is HeartbeatResult.OK
    with pytest.raises(LeaseMismatch) as missing:
        table.heartbeat("n", now=2.0)
    assert missing.value.missing and missing.value.status == 409 and "'n'" in str(missing.value)
    with pytest.raises(LeaseMismatch) as wrong:
        table.heartbeat("n", now=2.0, lease="guess")
    assert not wrong.value.missing
    assert table.get("n", now=2.0).last_heartbeat == 1.0  # the refused beats kept nothing alive


def test_deregister_needs_the_lease_and_a_refusal_changes_nothing() -> None:
    table = Membership()
    lease = table.register("n", A, now=0.0).lease
    with pytest.raises(LeaseMismatch):
        table.deregister("n", now=1.0, lease="guess")
    assert ids(table, 1.0) == ["n"]
    assert table.deregister("n", now=1.0, lease=lease)


def test_the_hijack_another_address_without_the_lease_is_refused() -> None:
    """The issue's attack: register an existing id with another address."""
    table = Membership()
    lease = table.register("n", A, {"workers": 4}, now=0.0).lease
    table.drain_events()
    with pytest.raises(IdTaken) as info:
        table.register("n", B, {"workers": 100}, now=1.0)
    assert info.value.status == 409 and info.value.code == "conflict" and "'n'" in str(info.value)
    member = table.get("n", now=1.0)
    assert (member.address, dict(member.metadata), member.incarnation) == (A, {"workers": 4}, 1)
    assert table.heartbeat("n", now=1.5, lease=lease) is HeartbeatResult.OK  # the real node carries on
    assert table.drain_events() == []
    with pytest.raises(IdTaken):
        table.register("n", B, now=2.0, lease="guess")


def test_a_node_restarted_at_the_same_address_takes_over_at_once() -> None:
    table = Membership()
    old = table.register("n", A, now=0.0).lease
    new = table.register("n", A, now=1.0)  # a new process, no lease, same place
    assert new.incarnation == 2 and new.lease != old
    with pytest.raises(LeaseMismatch):
        table.heartbeat("n", now=1.5, lease=old)  # the old instance's lease stops working
    assert table.heartbeat("n", now=1.5, lease=new.lease) is HeartbeatResult.OK


def test_the_same_instance_keeps_its_lease_when_it_registers_again() -> None:
    table = Membership(ttl_s=5.0)
    lease = table.register("n", A, now=0.0).lease
    again = table.register("n", A, now=1.0, lease=lease)
    assert again.lease == lease and again.address == A and again.incarnation == 2
    late = table.register("n", B, now=7.0, lease=lease)  # dead meanwhile: back with its lease, anywhere
    assert late.lease == lease and late.incarnation == 3 and late.address == B


def test_a_live_members_address_never_changes_through_register_even_with_its_lease() -> None:
    table = Membership(ttl_s=5.0)
    lease = table.register("n", A, now=0.0).lease
    with pytest.raises(IdTaken) as info:
        table.register("n", B, now=1.0, lease=lease)
    assert info.value.address == A and "deregister" in str(info.value)
    assert table.get("n", now=1.0).address == A


def test_the_two_step_hijack_leaves_the_traffic_with_the_real_node() -> None:
    """Follow-up attack: take the lease by naming the live node's own address, then move with that lease."""
    table = Membership(ttl_s=5.0)
    real = table.register("n", A, {"workers": 4}, now=0.0).lease
    stolen = table.register("n", A, {"workers": 1000}, now=1.0).lease  # step 1: "restarted in place"
    with pytest.raises(IdTaken):
        table.register("n", B, now=1.1, lease=stolen)  # step 2: refused, lease or not
    assert table.heartbeat("n", now=1.2, lease=stolen) is HeartbeatResult.OK
    assert table.get("n", now=1.2).address == A  # traffic never left the real node
    with pytest.raises(LeaseMismatch):
        table.heartbeat("n", now=2.0, lease=real)  # the real node's next beat: 409 ...
    back = table.register("n", A, {"workers": 4}, now=2.0)  # ... so it registers again, taking the lease back
    assert back.address == A and dict(back.metadata) == {"workers": 4}
    with pytest.raises(LeaseMismatch):
        table.heartbeat("n", now=2.1, lease=stolen)
    assert table.heartbeat("n", now=2.1, lease=back.lease) is HeartbeatResult.OK


def test_a_lease_taken_in_place_cannot_free_the_id_for_another_address() -> None:
    """Step 1 of the attack, then deregister with the stolen lease and register elsewhere: the id stays held."""
    table = Membership(ttl_s=5.0)
    table.register("n", A, now=0.0)
    stolen = table.register("n", A, now=1.0).lease
    assert table.deregister("n", now=1.5, lease=stolen)
    assert ids(table, 1.5, include_dead=True) == []
    with pytest.raises(IdTaken) as info:
        table.register("n", B, now=2.0)
    assert info.value.address == A
    assert table.heartbeat("n", now=2.0) is HeartbeatResult.UNKNOWN  # the real node registers again ...
    back = table.register("n", A, now=2.0)  # ... at its address, which the hold lets in
    with pytest.raises(IdTaken):
        table.register("n", B, now=2.1, lease=back.lease)
    # the hold passes on: a lease got over a held id is in place too; the hold lasts ttl_s from leaving
    assert table.deregister("n", now=3.0, lease=back.lease)
    with pytest.raises(IdTaken):
        table.register("n", B, now=7.9)
    assert table.register("n", B, now=8.0).address == B


def test_an_owner_that_really_moves_deregisters_then_registers_anew() -> None:
    table = Membership(ttl_s=5.0)
    lease = table.register("n", A, now=0.0).lease
    assert table.deregister("n", now=1.0, lease=lease)
    moved = table.register("n", B, now=1.0)
    assert moved.address == B and moved.incarnation == 1
    assert table.deregister("n", now=2.0, lease=moved.lease)  # a fresh registration's lease frees at once
    assert table.register("n", A, now=2.0).address == A


@pytest.mark.parametrize("wait_s, status", [(5.0, "dead"), (10.0, "forgotten")])
def test_a_dead_or_forgotten_id_may_be_taken_by_anyone(wait_s: float, status: str) -> None:
    table = Membership(ttl_s=5.0, remove_after_s=5.0)
    old = table.register("n", A, now=0.0).lease
    taken = table.register("n", B, now=wait_s)
    assert taken.address == B and taken.lease != old
    assert taken.incarnation == (2 if status == "dead" else 1)
    with pytest.raises(LeaseMismatch):
        table.heartbeat("n", now=wait_s, lease=old)


def test_check_register_refuses_as_register_would_and_changes_nothing() -> None:
    table = Membership(max_nodes=1)
    table.register("n", A, now=0.0)
    table.drain_events()
    with pytest.raises(IdTaken):
        table.check_register("n", B, now=1.0)
    with pytest.raises(RegistryFull):
        table.check_register("m", B, now=1.0)
    table.check_register("n", A, now=1.0)
    assert table.get("n", now=1.0).incarnation == 1 and table.drain_events() == []


# -- bounds (issue 11, item 4) ----------------------------------------------------------------------------
def test_a_full_table_refuses_new_ids_but_not_heartbeats_or_re_registrations() -> None:
    table = Membership(ttl_s=5.0, max_nodes=2)
    a = table.register("a", A, now=0.0).lease
    table.register("b", B, now=1.0)
    with pytest.raises(RegistryFull) as info:
        table.register("c", A, now=2.0)
    assert info.value.status == 503 and info.value.max_nodes == 2
    assert info.value.retry_after_s == 3.0  # a, the longest silent, could die at 5
    assert table.heartbeat("a", now=2.0, lease=a) is HeartbeatResult.OK
    assert table.register("b", B, now=2.0).incarnation == 2  # a restart at the same place
    assert ids(table, 2.0) == ["a", "b"]


def test_a_new_id_pushes_out_the_longest_dead_member() -> None:
    table = Membership(ttl_s=5.0, remove_after_s=100.0, max_nodes=2)
    table.register("a", A, now=0.0)
    b = table.register("b", B, now=3.0).lease
    table.heartbeat("b", now=6.0, lease=b)  # a died at 5
    table.drain_events()
    table.register("c", A, now=6.0)
    assert ids(table, 6.0, include_dead=True) == ["b", "c"]
    assert [(e.kind, e.node_id) for e in table.drain_events()] == [("removed", "a"), ("joined", "c")]


@pytest.mark.parametrize("metadata, limit", [
    ({f"k{i}": i for i in range(33)}, "max_keys"),
    ({"k" * 65: 1}, "max_key_chars"),
    ({"": 1}, "max_key_chars"),
    ({"blob": "x" * 5000}, "max_bytes"),
    ({"w": float("nan")}, "values"),
    ({"w": float("inf")}, "values"),
    ({"w": [1]}, "values"),
    ({"w": {"x": 1}}, "values"),
])
def test_metadata_over_a_limit_is_refused_naming_it(metadata: dict, limit: str) -> None:
    table = Membership()
    with pytest.raises(MetadataRefused) as info:
        table.register("n", A, metadata, now=0.0)
    assert info.value.limit == limit and info.value.status == 400
    assert table.get("n", now=0.0) is None
    lease = table.register("n", A, {"workers": 1}, now=0.0).lease
    with pytest.raises(MetadataRefused):
        table.heartbeat("n", now=1.0, metadata=metadata, lease=lease)
    assert dict(table.get("n", now=1.0).metadata) == {"workers": 1}


def test_metadata_within_the_limits_is_kept() -> None:
    ok = {"workers": 4, "load_factor_ms": 25.0, "zone": "a", "on": True, "x": None, "y": -1e300, "z": "é" * 100,
          "k" * 64: 10**30, **{f"f{i}": i for i in range(24)}}
    assert len(ok) == 32
    assert Membership().register("n", A, ok, now=0.0).metadata == ok


def test_limits_are_validated() -> None:
    with pytest.raises(ConfigError, match="max_nodes"):
        Membership(max_nodes=0)
    with pytest.raises(ConfigError, match="max_bytes"):
        MetadataLimits(max_bytes=0)


def test_node_id_rule() -> None:
    assert all(valid_node_id(i) for i in ("node-1", "a.b_c:d", "N" * 200, "10.0.0.1:5001"))
    assert not any(valid_node_id(i) for i in ("", "a/b", "%2F", ".", "..", "N" * 201, "é", None))


# -- a cacheable listing -----------------------------------------------------------------------------------
def test_generation_moves_with_the_listing_and_only_then() -> None:
    table = Membership(ttl_s=5.0, remove_after_s=5.0)
    g0 = table.generation(now=0.0)
    lease = table.register("n", A, {"w": 1}, now=0.0).lease
    g1 = table.generation(now=0.0)
    assert g1 != g0
    table.heartbeat("n", now=1.0, lease=lease)
    table.heartbeat("n", now=2.0, metadata={"w": 1}, lease=lease)  # the same metadata: no change
    assert table.generation(now=2.0) == g1
    table.heartbeat("n", now=3.0, metadata={"w": 2}, lease=lease)
    g2 = table.generation(now=3.0)
    assert g2 != g1
    assert table.generation(now=8.0) != g2  # died at 8
    g3 = table.generation(now=8.0)
    assert table.generation(now=13.0) != g3  # forgotten at 13


def test_the_lease_never_appears_in_a_listing() -> None:
    member = Membership().register("n", A, now=0.0)
    assert member.lease not in repr(member)
    assert "lease" not in member.as_dict(now=1.0) and "lease" not in member.summary()
    assert set(member.as_dict(now=1.0)) - set(member.summary()) == {"last_heartbeat", "seconds_since_heartbeat"}


def test_alive_json_is_the_summaries_of_the_alive_members() -> None:
    import json
    table = Membership(ttl_s=5.0)
    lease = table.register("b", A, {"workers": 4, "zone": "é\"\\"}, now=0.0).lease
    table.register("a", B, now=1.0)
    table.register("c", B, now=1.0)
    table.heartbeat("b", now=2.0, metadata={"workers": 2}, lease=lease)  # a changed entry is made again
    assert json.loads(table.alive_json(now=5.5)) == [m.summary() for m in table.members(now=5.5)]
    assert [m["id"] for m in json.loads(table.alive_json(now=5.5))] == ["a", "b", "c"]
    assert json.loads(table.alive_json(now=6.0)) == [table.get("b", now=6.0).summary()]
