"""Backend addresses: the shape of a registrable URL, the numeric host forms, the allow-list."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from core.addresses import AddressError, AllowList, BackendAddress, numeric_host, parse_backend_url


@pytest.mark.parametrize("text, host, port, url", [
    ("http://127.0.0.1:5001", "127.0.0.1", 5001, "http://127.0.0.1:5001"),
    ("http://127.0.0.1:5001/", "127.0.0.1", 5001, "http://127.0.0.1:5001"),
    ("HTTP://Node-1.Example.COM", "node-1.example.com", 80, "http://node-1.example.com:80"),
    ("http://[::1]:8080", "::1", 8080, "http://[::1]:8080"),
    ("http://[0:0:0:0:0:0:0:1]/", "::1", 80, "http://[::1]:80"),
    ("http://2130706433:5001", "127.0.0.1", 5001, "http://127.0.0.1:5001"),  # numeric forms normalised
    ("http://127.1:7", "127.0.0.1", 7, "http://127.0.0.1:7"),
    ("http://h:0080", "h", 80, "http://h:80"),
])
def test_good_addresses_are_normalised(text: str, host: str, port: int, url: str) -> None:
    assert parse_backend_url(text) == BackendAddress(host, port, url)


@pytest.mark.parametrize("text, words", [
    ("https://127.0.0.1:5001", "only http:// backends are supported"),
    ("ftp://h", "only http:// backends are supported"),
    ("127.0.0.1:5001", "is not a URL"),
    ("http://h:99999", "port 99999 is out of range 1-65535"),
    ("http://h:0", "port 0 is out of range 1-65535"),
    ("http://h:" + "9" * 50, "out of range 1-65535"),
    ("http://h:" + "9" * 5000, "at most 2048 characters"),
    ("http://h:8o", "is not a number"),
    ("http://h:", "port after ':' is empty"),
    ("http://a:b@h/", "no user:password@ credentials"),
    ("http://h/@evil", "has no path"),
    ("http://h/x", "has no path"),
    ("http://h/?q=1", "no query string"),
    ("http://h#frag", "no fragment"),
    ("http://", "needs a host"),
    ("http://:80", "needs a host"),
    ("http://::1:80", "must be written in brackets"),
    ("http://[::1", "must close with ']'"),
    ("http://[nope]:1", "is not a valid IPv6 address"),
    ("http://[::1]x", "unexpected 'x'"),
    ("http://exa mple:1", "not a valid host name"),
    ("http://h\u00e9:1", "not a valid host name"),
    ("http://" + "a" * 300, "not a valid host name"),
    ("http://a..b:1", "not a valid host name"),
])
def test_bad_addresses_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(AddressError) as info:
        parse_backend_url(text)
    assert words in str(info.value), str(info.value)


def test_a_non_string_is_refused() -> None:
    with pytest.raises(AddressError, match="must be a string"):
        parse_backend_url(5)  # type: ignore[arg-type]


@pytest.mark.parametrize("host, ip", [
    ("2852039166", "169.254.169.254"),
    ("0xa9fea9fe", "169.254.169.254"),
    ("0XA9FEA9FE", "169.254.169.254"),
    ("0251.0376.0251.0376", "169.254.169.254"),
    ("169.254.43518", "169.254.169.254"),
    ("169.16689662", "169.254.169.254"),
    ("127.1", "127.0.0.1"),
    ("0", "0.0.0.0"),
    ("[::ffff:169.254.169.254]", "::ffff:a9fe:a9fe"),
    ("::1", "::1"),
    ("10.0.0.1", "10.0.0.1"),
])
def test_numeric_hosts_as_the_os_reads_them(host: str, ip: str) -> None:
    assert numeric_host(host) == ip


@pytest.mark.parametrize("host", ["localhost", "example.com", "1.2.3.4.5", "256.1.1.1", "4294967296", "08",
                                  "0x", "1..2", "", "[nope]", "1.2.3.", "１２７.0.0.1"])
def test_names_and_impossible_numbers_are_not_numeric(host: str) -> None:
    assert numeric_host(host) is None


@given(st.integers(0, 2**32 - 1))
def test_every_32_bit_number_is_its_address(n: int) -> None:
    dotted = ".".join(str((n >> s) & 255) for s in (24, 16, 8, 0))
    assert numeric_host(str(n)) == dotted == numeric_host(hex(n)) == numeric_host(dotted)


def test_loopback_bind_admits_only_loopback() -> None:
    for bind in ("127.0.0.1", "127.0.0.2", "localhost", "::1"):
        allow = AllowList.default_for(bind)
        assert allow.permits("127.0.0.1") and allow.permits("127.9.9.9") and allow.permits("::1")
        assert allow.permits("::ffff:127.0.0.1")
        assert not allow.permits("10.0.0.1") and not allow.permits("169.254.169.254")
        assert not allow.permits("192.168.1.1") and not allow.permits("2001:db8::1")


def test_other_binds_admit_all_but_link_local_metadata_and_unspecified() -> None:
    for bind in ("0.0.0.0", "10.1.2.3", "::", "node.example"):
        allow = AllowList.default_for(bind)
        assert allow.permits("10.0.0.1") and allow.permits("127.0.0.1") and allow.permits("2001:db8::1")
        for bad in ("169.254.169.254", "::ffff:169.254.169.254", "fe80::1", "fe80::1%eth0", "0.0.0.0", "::",
                    "fd00:ec2::254"):
            assert not allow.permits(bad), bad


def test_parse_cidrs_and_any() -> None:
    allow = AllowList.parse("10.0.0.0/8, ::1/128,192.168.1.7")
    assert allow.permits("10.200.0.1") and allow.permits("::1") and allow.permits("192.168.1.7")
    assert not allow.permits("192.168.1.8") and not allow.permits("127.0.0.1")
    assert allow.permits("::ffff:10.0.0.1")  # mapped IPv4 judged as IPv4
    assert str(allow) == "10.0.0.0/8,::1/128,192.168.1.7/32"
    anything = AllowList.parse("any")
    assert anything.permits("169.254.169.254") and str(anything) == "any"
    assert not anything.permits("not an ip")


@pytest.mark.parametrize("text, words", [
    ("", "allow-list is empty"),
    (" , ", "allow-list is empty"),
    ("10.0.0.0/33", "not a network in CIDR form"),
    ("banana", "not a network in CIDR form"),
    ("10.0.0.1/8", "did you mean 10.0.0.0/8"),
    ("any,10.0.0.0/8", "give it alone"),
])
def test_bad_allow_lists_name_the_problem(text: str, words: str) -> None:
    with pytest.raises(AddressError) as info:
        AllowList.parse(text)
    assert words in str(info.value)


def test_default_lists_print_what_they_admit() -> None:
    assert str(AllowList.default_for("127.0.0.1")) == "127.0.0.0/8,::1/128"
    assert str(AllowList.default_for("0.0.0.0")).startswith("any except 0.0.0.0/8,::/128,169.254.0.0/16,fe80::/10")
