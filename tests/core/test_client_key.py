"""Who the client is: the X-Forwarded-For walk from the right, X-Client-ID from trusted peers only, key limits."""

from __future__ import annotations

import pytest

from core.client_key import MAX_CLIENT_ID_BYTES, BadClientId, TrustedProxies, canonical_ip

LOCAL = TrustedProxies.parse("127.0.0.1")
CHAIN = TrustedProxies.parse("127.0.0.1,10.0.0.0/8,::1,fd00::/8")


@pytest.mark.parametrize("trusted, peer, xff, client", [
    # the peer is not trusted: its headers say nothing
    (LOCAL, "192.0.2.7", ["6.6.6.6"], "192.0.2.7"),
    (TrustedProxies(), "127.0.0.1", ["6.6.6.6"], "127.0.0.1"),
    # a trusted peer without a chain is the client itself
    (LOCAL, "127.0.0.1", [], "127.0.0.1"),
    (LOCAL, "127.0.0.1", [""], "127.0.0.1"),
    # one hop: the address the trusted proxy saw
    (LOCAL, "127.0.0.1", ["203.0.113.9"], "203.0.113.9"),
    # spoofed leftmost entries: the client wrote them, the proxy appended the truth
    (LOCAL, "127.0.0.1", ["6.6.6.6, 203.0.113.9"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["127.0.0.1, 6.6.6.6, 203.0.113.9"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["10.1.1.1, 203.0.113.9"], "203.0.113.9"),  # 10/8 not trusted here
    # trusted chains: skip every trusted hop from the right
    (CHAIN, "127.0.0.1", ["6.6.6.6, 203.0.113.9, 10.0.0.5, 10.9.9.9"], "203.0.113.9"),
    (CHAIN, "10.0.0.2", ["203.0.113.9,10.0.0.5"], "203.0.113.9"),
    # every hop trusted: the leftmost
    (CHAIN, "127.0.0.1", ["10.0.0.5, 10.0.0.6, 127.0.0.1"], "10.0.0.5"),
    # several X-Forwarded-For fields are one list, in order
    (LOCAL, "127.0.0.1", ["6.6.6.6", "203.0.113.9"], "203.0.113.9"),
    (CHAIN, "127.0.0.1", ["203.0.113.9", "10.0.0.5"], "203.0.113.9"),
    # garbage: believe nothing to its left; the last address vouched for is the client
    (LOCAL, "127.0.0.1", ["garbage, 203.0.113.9"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["203.0.113.9, garbage"], "127.0.0.1"),
    (LOCAL, "127.0.0.1", ["203.0.113.9, unknown"], "127.0.0.1"),
    (CHAIN, "127.0.0.1", ["203.0.113.9, garbage, 10.0.0.5"], "10.0.0.5"),
    (LOCAL, "127.0.0.1", ["1.2.3.4.5"], "127.0.0.1"),
    (LOCAL, "127.0.0.1", ["01.2.3.4"], "127.0.0.1"),  # octal-looking: not an address ipaddress reads
    (LOCAL, "127.0.0.1", ["x" * 5000 + ", 203.0.113.9"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["203.0.113.9, " + "9" * 5000], "127.0.0.1"),
    (LOCAL, "127.0.0.1", ["\udcff\udcfe"], "127.0.0.1"),  # bytes that were not UTF-8
    # empty entries are skipped; whitespace is not part of an address
    (LOCAL, "127.0.0.1", [" 203.0.113.9 ,, "], "203.0.113.9"),
    # ports and brackets are dropped, so one client is one key however a proxy writes it
    (LOCAL, "127.0.0.1", ["203.0.113.9:51234"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["[2001:db8::1]:443"], "2001:db8::1"),
    (LOCAL, "127.0.0.1", ["[2001:db8::1]"], "2001:db8::1"),
    (LOCAL, "127.0.0.1", ["[2001:db8::1]x"], "127.0.0.1"),
    (LOCAL, "127.0.0.1", ["[2001:db8::1"], "127.0.0.1"),
    # IPv6: canonical text, v4-mapped as v4, zone ids dropped
    (LOCAL, "127.0.0.1", ["2001:DB8:0:0::1"], "2001:db8::1"),
    (LOCAL, "127.0.0.1", ["::ffff:203.0.113.9"], "203.0.113.9"),
    (LOCAL, "127.0.0.1", ["fe80::1%eth0"], "fe80::1"),
    (CHAIN, "::1", ["2001:db8::7, fd00::1"], "2001:db8::7"),
    (CHAIN, "::1", ["fd12::1, ::1"], "fd12::1"),
    (CHAIN, "::ffff:127.0.0.1", ["203.0.113.9"], "203.0.113.9"),  # a dual-stack socket's v4 peer
])
def test_the_chain_is_walked_from_the_right(trusted, peer, xff, client) -> None:
    assert trusted.client(peer, forwarded_for=xff) == client


def test_x_client_id_counts_only_from_a_trusted_peer_and_beats_the_chain() -> None:
    assert LOCAL.client("127.0.0.1", client_id=["alice"], forwarded_for=["203.0.113.9"]) == "alice"
    assert LOCAL.client("192.0.2.7", client_id=["alice"], forwarded_for=["203.0.113.9"]) == "192.0.2.7"
    assert LOCAL.client("127.0.0.1", client_id=[""], forwarded_for=["203.0.113.9"]) == "203.0.113.9"


@pytest.mark.parametrize("value, words", [
    ("a" * (MAX_CLIENT_ID_BYTES + 1), "257 bytes; the limit is 256 bytes"),
    ("é" * 129, "258 bytes"),                     # 129 characters, 258 bytes
    ("x" * 8192, "8192 bytes"),
    ("tab\there", "printable"),
    ("nul\x00", "printable"),
    ("\udcff\udcfe", "printable"),                 # not UTF-8 on the wire
    ("zero\u200bwidth", "printable"),
])
def test_a_client_id_that_cannot_be_a_key_is_refused(value, words) -> None:
    with pytest.raises(BadClientId, match=words):
        LOCAL.client("127.0.0.1", client_id=[value])


def test_a_client_id_of_exactly_the_limit_is_a_key() -> None:
    for value in ("a" * MAX_CLIENT_ID_BYTES, "é" * (MAX_CLIENT_ID_BYTES // 2), "client 7 (load generator)"):
        assert LOCAL.client("127.0.0.1", client_id=[value]) == value


def test_two_client_ids_are_refused() -> None:
    with pytest.raises(BadClientId, match="2 times"):
        LOCAL.client("127.0.0.1", client_id=["alice", "bob"])


@pytest.mark.parametrize("text, trusted, untrusted", [
    ("127.0.0.1", ["127.0.0.1", "::ffff:127.0.0.1"], ["127.0.0.2", "::1", "garbage", ""]),
    ("10.0.0.0/8, ::1", ["10.255.0.1", "::1", "[::1]:80"], ["11.0.0.1", "::2"]),
    ("127.0.0.1/32", ["127.0.0.1"], ["127.0.0.2"]),
    ("", [], ["127.0.0.1"]),
])
def test_trust_by_address_and_network(text, trusted, untrusted) -> None:
    proxies = TrustedProxies.parse(text)
    assert all(proxies.trusts(a) for a in trusted) and not any(proxies.trusts(a) for a in untrusted)
    assert bool(proxies) == bool(text)


@pytest.mark.parametrize("text, words", [
    ("127.0.0.1,nonsense", "'nonsense' is not an IP address or a CIDR network"),
    ("10.0.0.1/8", "'10.0.0.1/8' has host bits set; did you mean 10.0.0.0/8"),
    ("127.0.0.1/33", "'127.0.0.1/33'"),
    ("localhost", "'localhost'"),
])
def test_bad_entries_are_named(text, words) -> None:
    with pytest.raises(ValueError, match=words):
        TrustedProxies.parse(text)


def test_canonical_ip() -> None:
    assert canonical_ip(" 2001:0DB8::0001 ") == "2001:db8::1"
    assert canonical_ip("[::ffff:10.0.0.1]:8080") == "10.0.0.1"
    assert canonical_ip("1.2.3.4:99999") is None and canonical_ip("1.2.3.4:") is None
    assert canonical_ip("") is None and canonical_ip("a" * 100) is None


def test_the_client_id_limit_is_configurable() -> None:
    short = TrustedProxies.parse("127.0.0.1", max_client_id_bytes=8)
    assert short.client("127.0.0.1", client_id=["12345678"]) == "12345678"
    with pytest.raises(BadClientId, match="9 bytes; the limit is 8 bytes") as info:
        short.client("127.0.0.1", client_id=["123456789"])
    assert info.value.limit_bytes == 8
    with pytest.raises(BadClientId, match="3 bytes"):  # one character, three bytes
        TrustedProxies.parse("127.0.0.1", max_client_id_bytes=2).client("127.0.0.1", client_id=["€"])
