"""Following a registry's member list: unchanged lists cost nothing, the cap, refusals, the balancer's own address."""

from __future__ import annotations

import pytest

from core._validate import ConfigError
from core.registry_follower import Listed, OwnAddress, RegistryFollower, parse_listing


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
                                    "d": Listed("http://127.0.0.1:4", 1), "e": Listed("http://127.0.0.1:5", 1)}
    assert list(parse_listing(nodes)) == ["b", "a", "d", "e"]
    assert parse_listing(None) == {} and parse_listing({"nodes": []}) == {}


def test_an_unchanged_listing_plans_nothing() -> None:
    f = RegistryFollower(10)
    first = listing("a", "b")
    plan = f.plan(first, in_books=0, busy=idle)
    assert plan is not None and [i for i, _ in plan.check] == ["a", "b"] and plan.leave == ()
    for node_id, listed in plan.check:
        f.joined(node_id, listed)
    assert f.plan(listing("a", "b"), in_books=2, busy=idle) is None  # equal, not the same object
    plan = f.plan(listing("a", "b", "c"), in_books=2, busy=idle)
    assert plan is not None and [i for i, _ in plan.check] == ["c"]  # only what is new is checked


def test_members_that_leave_go_once_idle_and_moved_members_are_checked_again() -> None:
    f = RegistryFollower(10)
    for node_id, listed in listing("a", "b", "c").items():
        f.joined(node_id, listed)
    busy = {"b"}
    moved = {"a": Listed("http://127.0.0.1:7000")}
    plan = f.plan(moved, in_books=3, busy=lambda i: i in busy)
    assert plan is not None and plan.leave == ("c",) and plan.check == (("a", moved["a"]),)
    f.joined("a", moved["a"])
    assert f.plan(moved, in_books=2, busy=lambda i: i in busy) == plan.__class__((), (), 0)  # b still busy
    busy.clear()
    plan = f.plan(moved, in_books=2, busy=lambda i: i in busy)
    assert plan is not None and plan.leave == ("b",)
    assert f.plan(moved, in_books=1, busy=idle) is None  # nobody draining: back to the cheap path


def test_past_the_cap_newcomers_are_left_out_and_the_first_members_keep_their_place() -> None:
    f = RegistryFollower(3, static=["http://127.0.0.1:5001"])
    for node_id, listed in listing("real").items():
        f.joined(node_id, listed)
    flood = {**listing("real"), **listing(*(f"junk-{i}" for i in range(5000)), port0=10000),
             "http://127.0.0.1:5001": Listed("http://127.0.0.1:9")}  # a member claiming a static id
    plan = f.plan(flood, in_books=2, busy=idle)  # the static backend and "real"
    assert plan is not None and [i for i, _ in plan.check] == ["junk-0"] and plan.left_out == 4999
    assert f.left_out == 4999
    f.joined("junk-0", flood["junk-0"])
    del flood["real"]
    plan = f.plan(flood, in_books=3, busy=idle)  # "real" left: its place goes to the next in line
    assert plan is not None and plan.leave == ("real",) and [i for i, _ in plan.check] == ["junk-1"]
    assert plan.left_out == 4998


def test_a_refused_member_is_not_checked_again_until_it_moves() -> None:
    f = RegistryFollower(10)
    bad = {"meta": Listed("http://169.254.169.254:80")}
    plan = f.plan(bad, in_books=0, busy=idle)
    assert plan is not None and plan.check == (("meta", bad["meta"]),)
    f.refused_at("meta", bad["meta"])
    assert f.plan({**bad, **listing("a")}, in_books=0, busy=idle).check == (("a", Listed("http://127.0.0.1:6000")),)
    assert len(f.refused) == 1
    elsewhere = {"meta": Listed("http://127.0.0.1:6001")}
    plan = f.plan(elsewhere, in_books=0, busy=idle)
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
