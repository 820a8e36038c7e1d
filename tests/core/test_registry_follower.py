"""Following a registry's member list: unchanged lists cost nothing, the cap, refusals, the balancer's own address."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from core.registry_follower import (DEFAULT_REFILL_S, MAX_WEIGHT, Listed, OwnAddress, Plan, RegistryFollower,
                                    Source, parse_listing, parse_source, weight)


def listing(*ids: str, port0: int = 6000) -> dict[str, Listed]:
    return {i: Listed(f"http://127.0.0.1:{port0 + n}") for n, i in enumerate(ids)}


def idle(_: str) -> bool:
    return False


def test_parse_listing_keeps_the_registry_order_and_skips_what_is_malformed() -> None:
    nodes = [{"id": "b", "address": "http://127.0.0.1:2/", "metadata": {"workers": 4}},
             {"id": "a", "address": "http://127.0.0.1:1"},
             {"id": 3, "address": "x"}, {"id": "c"}, "junk", {"id": "", "address": "http://x:1"},
             {"id": "d", "address": "http://127.0.0.1:4", "metadata": {"workers": True}},
             {"id": "e", "address": "http://127.0.0.1:5", "metadata": {"workers": 10**9}}]
    assert parse_listing(nodes) == {"b": Listed("http://127.0.0.1:2", 4), "a": Listed("http://127.0.0.1:1", 1),
                                    "d": Listed("http://127.0.0.1:4", 1),
                                    "e": Listed("http://127.0.0.1:5", MAX_WEIGHT)}  # a claim past the cap: the cap
    assert list(parse_listing(nodes)) == ["b", "a", "d", "e"]
    assert parse_listing(None) == {} and parse_listing({"nodes": []}) == {}


@pytest.mark.parametrize("workers, expected", [(1, 1), (8, 8), (10_000, 10_000), (10_001, 10_000),
                                               (1_000_000, 10_000), (10 ** 400, 10_000), (0, None), (-3, None),
                                               (True, None), (2.5, None), (8.0, None), ("8", None), (None, None),
                                               ([8], None)])
def test_a_claimed_weight_is_a_positive_integer_cut_to_the_cap(workers: object, expected: int | None) -> None:
    assert MAX_WEIGHT == 10_000  # testbed node --workers' maximum
    assert weight(workers) == expected


def test_an_unchanged_listing_plans_nothing() -> None:
    f = RegistryFollower(10)
    first = listing("a", "b")
    plan = f.plan(first, now=0.0, in_books=0, busy=idle)
    assert plan is not None and [i for i, _ in plan.check] == ["a", "b"] and plan.leave == ()
    for node_id, listed in plan.check:
        f.joined(node_id, listed)
    assert f.plan(listing("a", "b"), now=0.0, in_books=2, busy=idle) is None  # equal, not the same object
    plan = f.plan(listing("a", "b", "c"), now=0.0, in_books=2, busy=idle)
    assert plan is not None and [i for i, _ in plan.check] == ["c"]  # only what is new is checked


def test_members_that_leave_go_once_idle_and_moved_members_are_checked_again() -> None:
    f = RegistryFollower(10)
    for node_id, listed in listing("a", "b", "c").items():
        f.joined(node_id, listed)
    busy = {"b"}
    moved = {"a": Listed("http://127.0.0.1:7000")}
    plan = f.plan(moved, now=0.0, in_books=3, busy=lambda i: i in busy)
    assert plan is not None and plan.leave == ("c",) and plan.check == (("a", moved["a"]),)
    f.joined("a", moved["a"])
    assert f.plan(moved, now=0.0, in_books=2, busy=lambda i: i in busy) == plan.__class__((), (), 0)  # b still busy
    busy.clear()
    plan = f.plan(moved, now=0.0, in_books=2, busy=lambda i: i in busy)
    assert plan is not None and plan.leave == ("b",)
    assert f.plan(moved, now=0.0, in_books=1, busy=idle) is None  # nobody draining: back to the cheap path


def test_past_the_cap_newcomers_are_left_out_and_the_first_members_keep_their_place() -> None:
    f = RegistryFollower(3, static=["http://127.0.0.1:5001"])
    for node_id, listed in listing("real").items():
        f.joined(node_id, listed)
    flood = {**listing("real"), **listing(*(f"junk-{i}" for i in range(5000)), port0=10000),
             "http://127.0.0.1:5001": Listed("http://127.0.0.1:9")}  # a member claiming a static id
    plan = f.plan(flood, now=0.0, in_books=2, busy=idle)  # the static backend and "real"
    assert plan is not None and [i for i, _ in plan.check] == ["junk-0"] and plan.left_out == 4999
    assert f.left_out == 4999
    f.joined("junk-0", flood["junk-0"])
    del flood["real"]
    plan = f.plan(flood, now=0.0, in_books=3, busy=idle)  # "real" left: its place goes to the next in line
    assert plan is not None and plan.leave == ("real",) and [i for i, _ in plan.check] == ["junk-1"]
    assert plan.left_out == 4998


def test_a_refused_member_is_not_checked_again_until_it_moves() -> None:
    f = RegistryFollower(10)
    bad = {"meta": Listed("http://169.254.169.254:80")}
    plan = f.plan(bad, now=0.0, in_books=0, busy=idle)
    assert plan is not None and plan.check == (("meta", bad["meta"]),)
    f.refused_at("meta", bad["meta"])
    plan = f.plan({**bad, **listing("a")}, now=0.0, in_books=0, busy=idle)
    assert plan is not None and plan.check == (("a", Listed("http://127.0.0.1:6000")),)
    assert len(f.refused) == 1
    elsewhere = {"meta": Listed("http://127.0.0.1:6001")}
    plan = f.plan(elsewhere, now=0.0, in_books=0, busy=idle)
    assert plan is not None and plan.check == (("meta", elsewhere["meta"]),) and f.refused == {}


def test_the_cap_must_be_positive() -> None:
    with pytest.raises(ConfigError, match="max_backends"):
        RegistryFollower(0)


@pytest.mark.parametrize("bound, ip, port, itself", [
    ("127.0.0.1", "127.0.0.1", 8080, True),
    ("127.0.0.1", "127.0.0.1", 8081, False),
    ("127.0.0.1", "127.0.0.2", 8080, False),     # nothing listens there
    ("127.0.0.1", "::ffff:127.0.0.1", 8080, True),
    ("0.0.0.0", "127.0.0.5", 8080, True),        # bound to every address: loopback reaches it
    ("0.0.0.0", "0.0.0.0", 8080, True),
    ("0.0.0.0", "192.0.2.7", 8080, True),        # this machine's own address (listed by the driver)
    ("0.0.0.0", "192.0.2.8", 8080, False),
    ("::", "::1", 8080, True),
    ("10.1.2.3", "127.0.0.1", 8080, False),
    ("127.0.0.1", "not an ip", 8080, False),
])
def test_whether_an_address_is_the_balancers_own(bound: str, ip: str, port: int, itself: bool) -> None:
    own = OwnAddress(frozenset({bound, "192.0.2.7"} if bound in ("0.0.0.0", "::") else {bound}), 8080)
    assert own.reaches(ip, port) is itself


# -- a restarted registry: the refill window ---------------------------------------------------------------------
OLD, NEW = Source("old", ttl_s=5.0, heartbeat_interval_s=2.0), Source("new", ttl_s=5.0, heartbeat_interval_s=2.0)


def following(*ids: str, source: Source = OLD) -> RegistryFollower:
    """A follower that has joined ``ids`` from ``source``'s listing at t=0."""
    f = RegistryFollower(10)
    plan = f.plan(listing(*ids), now=0.0, in_books=0, busy=idle, source=source)
    assert plan is not None
    for node_id, listed in plan.check:
        f.joined(node_id, listed)
    return f


def test_parse_source_reads_the_registry_object_and_drops_what_is_malformed() -> None:
    body = {"nodes": [], "registry": {"instance": "a1b2", "ttl_s": 5.0, "heartbeat_interval_s": 2}}
    assert parse_source(body) == Source("a1b2", 5.0, 2.0)
    assert parse_source({"nodes": []}) == Source() and parse_source([]) == Source() and parse_source(None) == Source()
    bad = {"registry": {"instance": "", "ttl_s": float("nan"), "heartbeat_interval_s": True}}
    assert parse_source(bad) == Source()
    assert parse_source({"registry": {"instance": 7, "ttl_s": -1, "heartbeat_interval_s": 10 ** 400}}) == Source()
    assert parse_source({"registry": {"instance": "x" * 201}}).instance is None
    assert Source("i").refill_s == DEFAULT_REFILL_S and Source("i", ttl_s=30.0).refill_s == 30.0


def test_a_new_instance_s_partial_listing_keeps_the_others_for_its_ttl_then_lets_go() -> None:
    f = following("a", "b", "c")
    # Restarted, the registry lists nobody at first: nobody leaves.
    plan = f.plan({}, now=10.0, in_books=3, busy=idle, source=NEW)
    assert plan == Plan((), (), 0, ("a", "b", "c"), True) and f.refill_until == 15.0
    # "a" registers again at its address: nothing to do for it; the listing is not new any more.
    plan = f.plan(listing("a"), now=11.0, in_books=3, busy=idle, source=NEW)
    assert plan == Plan((), (), 0, ("b", "c"), False)
    assert f.plan(listing("a"), now=12.0, in_books=3, busy=idle, source=NEW) is None  # unchanged: cheap
    # A newcomer joins as usual during the refill; "b" comes back too.
    plan = f.plan(listing("a", "b", "d"), now=13.0, in_books=3, busy=idle, source=NEW)
    assert plan is not None and [i for i, _ in plan.check] == ["d"] and plan.leave == () and plan.kept == ("c",)
    f.joined("d", listing("a", "b", "d")["d"])
    assert f.plan(listing("a", "b", "d"), now=14.999, in_books=4, busy=idle, source=NEW) is None
    # The TTL is over: the same listing is planned again, and "c", never heard of by the new one, goes.
    plan = f.plan(listing("a", "b", "d"), now=15.0, in_books=4, busy=idle, source=NEW)
    assert plan == Plan(("c",), (), 0, (), False) and f.refill_until is None
    assert f.plan(listing("a", "b", "d"), now=16.0, in_books=3, busy=idle, source=NEW) is None


def test_a_member_deregistered_from_the_same_instance_leaves_at_once() -> None:
    f = following("a", "b")
    plan = f.plan(listing("a"), now=1.0, in_books=2, busy=idle, source=OLD)
    assert plan == Plan(("b",), (), 0, (), False) and f.refill_until is None


def test_a_busy_member_still_unlisted_after_the_refill_drains_first() -> None:
    f = following("a", "b")
    busy = {"b"}
    assert f.plan(listing("a"), now=10.0, in_books=2, busy=lambda i: i in busy, source=NEW).kept == ("b",)
    assert f.plan(listing("a"), now=15.0, in_books=2, busy=lambda i: i in busy, source=NEW) == Plan((), (), 0)
    busy.clear()
    assert f.plan(listing("a"), now=15.5, in_books=2, busy=idle, source=NEW) == Plan(("b",), (), 0)


def test_another_restart_during_the_refill_starts_the_window_again_with_its_own_ttl() -> None:
    f = following("a", "b")
    f.plan({}, now=10.0, in_books=2, busy=idle, source=NEW)
    newer = Source("newer", ttl_s=30.0)
    plan = f.plan(listing("a"), now=12.0, in_books=2, busy=idle, source=newer)
    assert plan is not None and plan.new_instance and plan.kept == ("b",) and f.refill_until == 42.0
    assert f.plan(listing("a"), now=20.0, in_books=2, busy=idle, source=newer) is None  # past NEW's window
    assert f.plan(listing("a"), now=42.0, in_books=2, busy=idle, source=newer).leave == ("b",)


def test_the_refill_window_counts_time_going_back_as_none_passing() -> None:
    f = following("a", "b")
    f.plan({}, now=10.0, in_books=2, busy=idle, source=NEW)
    assert f.plan({}, now=3.0, in_books=2, busy=idle, source=NEW) is None  # back in time: still refilling
    assert f.refill_until == 15.0
    assert f.plan({}, now=15.0, in_books=2, busy=idle, source=NEW).leave == ("a", "b")


def test_the_first_listing_and_a_registry_that_names_no_instance_start_no_window() -> None:
    f = following("a", "b", source=NEW)  # the first listing the balancer sees: nothing to keep
    assert f.refill_until is None
    g = following("a", "b", source=Source())
    assert g.plan(listing("a"), now=1.0, in_books=2, busy=idle, source=Source()).leave == ("b",)


def test_a_plan_cut_short_is_planned_again() -> None:
    f = RegistryFollower(10)
    plan = f.plan(listing("a", "b"), now=0.0, in_books=0, busy=idle)
    assert plan is not None
    f.joined("a", plan.check[0][1])  # the driver was cancelled before it joined "b"
    assert f.plan(listing("a", "b"), now=1.0, in_books=1, busy=idle) is None  # as far as the follower knows
    f.replan()
    plan = f.plan(listing("a", "b"), now=2.0, in_books=1, busy=idle)
    assert plan is not None and [i for i, _ in plan.check] == ["b"]


def test_members_at_the_balancers_port_learnt_late_are_dropped_and_checked_again() -> None:
    f = RegistryFollower(10)
    members = {"a": Listed("http://127.0.0.1:6000"), "me": Listed("http://127.0.0.1:8080"),
               "other-host": Listed("http://127.0.0.2:8080")}
    for node_id, listed in members.items():
        f.joined(node_id, listed)
    own = OwnAddress(frozenset({"127.0.0.1"}), 8080)
    assert f.own_known(own) == ["me", "other-host"] and f.own is own and list(f.followed) == ["a"]
    plan = f.plan(members, now=0.0, in_books=1, busy=idle)  # the same listing: checked again, own known
    assert plan is not None and [i for i, _ in plan.check] == ["me", "other-host"]
    assert f.own_known(own) == []
