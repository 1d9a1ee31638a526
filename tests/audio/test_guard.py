"""The destination guard: what an audio URL may reach. No test here opens a connection."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ting import errors
from ting.audio.guard import MediaGuard, is_public, parse_ipv4_loose

GUARD = MediaGuard()


def verdict(url: str, resolved: list[str] | None = None, guard: MediaGuard = GUARD) -> str:
    """'ok' or the name of the error the guard raises for `url` resolving to `resolved`."""
    try:
        target = guard.check_url(url)
        addresses = [target.ip] if target.ip is not None else [ipaddress.ip_address(a) for a in resolved or []]
        guard.pick_address(target, addresses)
    except errors.TingError as exc:
        return type(exc).__name__
    return "ok"


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/",
        "http://127.0.0.1:8000/a.wav",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.0.0.1/",
        "http://172.16.5.4/",
        "http://192.168.1.1/",
        "http://[::1]/",
        "http://[fd00:ec2::254]/",
        "http://[fe80::1]/",
        "http://0.0.0.0/",
        "http://[::]/",
        "http://100.64.0.1/",
        "http://224.0.0.1/",
        "http://255.255.255.255/",
        "http://240.0.0.1/",
        "http://198.18.0.1/",
        "http://192.0.2.1/",
        # odd spellings of internal addresses
        "http://2130706433/",
        "http://0x7f000001/",
        "http://0177.0.0.1/",
        "http://127.1/",
        "http://0x7f.1/",
        "http://017700000001/",
        "http://0251.0376.0251.0376/",
        "http://2852039166/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:a9fe:a9fe]/",
        "http://[::ffff:10.0.0.1]/",
        "http://[64:ff9b::a9fe:a9fe]/",
        "http://[2002:a9fe:a9fe::]/",
        "http://[::127.0.0.1]/",
        "http://[2001:db8::1]/",
        "http://[ff02::1]/",
    ],
)
def test_internal_addresses_are_refused_in_every_spelling(url: str) -> None:
    # Zero-padded dotted quads (0177.0.0.1) are already refused by the URL parser as ambiguous.
    assert verdict(url) in ("DestinationBlocked", "MediaUrlError")


@pytest.mark.parametrize(
    "resolved",
    [
        ["10.1.2.3"],
        ["127.0.0.1"],
        ["169.254.169.254"],
        ["::1"],
        ["93.184.216.34", "127.0.0.1"],
        ["2606:2800:220:1::1", "fd00::1"],
        ["::ffff:192.168.0.1"],
    ],
)
def test_host_names_are_judged_by_every_address_they_resolve_to(resolved: list[str]) -> None:
    assert verdict("https://media.example.com/a.mp3", resolved) == "DestinationBlocked"


def test_public_destinations_pass_and_the_checked_address_is_the_one_used() -> None:
    assert verdict("https://dashscope.oss-cn-beijing.aliyuncs.com/audios/welcome.mp3", ["47.93.243.20"]) == "ok"
    target = GUARD.check_url("http://media.example.com:8080/x.wav?sig=1")
    chosen = GUARD.pick_address(target, [ipaddress.ip_address("93.184.216.34"), ipaddress.ip_address("8.8.8.8")])
    assert str(chosen) == "93.184.216.34"
    assert verdict("http://8.8.8.8/a.wav") == "ok"
    assert verdict("http://134744072/a.wav") == "ok"  # 8.8.8.8 spelled as one number
    assert verdict("http://[2606:4700:4700::1111]/a.wav") == "ok"


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "ftp://example.com/a.mp3",
        "gopher://example.com/",
        "rtsp://example.com/a",
        "dict://example.com/",
        "jar:http://example.com!/",
        "ldap://example.com/",
    ],
)
def test_only_http_and_https_are_fetched(url: str) -> None:
    assert verdict(url, ["93.184.216.34"]) == "UnsupportedScheme"


@pytest.mark.parametrize(
    "url",
    [
        "http://allowed.example\\@127.0.0.1/",
        "http://allowed.example%5c@evil.example/",
        "http://a@b@c.example/",
        "http://user:pass@example.com/",
        "http://example.com./a.wav",
        "http://exa mple.com/",
        "http://example.com/\r\nX: y",
        "http://example.com/\ta",
        "http:///a.wav",
        "http://example.com:99999/",
        "http://example.com:0/",
        "http://",
        "http://1.2.3.256/",
        "http://999.1.1.1/",
        "http://0x100000000/",
        "http://256.0x1000000/",
    ],
)
def test_ambiguous_urls_are_refused(url: str) -> None:
    assert verdict(url, ["93.184.216.34"]) in ("MediaUrlError", "DestinationBlocked")
    assert verdict(url, ["93.184.216.34"]) != "ok"


def test_the_allow_list_opens_exactly_what_it_names() -> None:
    guard = MediaGuard(["127.0.0.1", "10.20.0.0/16", "intranet.corp", "[fd00::5]"])
    assert verdict("http://127.0.0.1:9000/a.wav", guard=guard) == "ok"
    assert verdict("http://127.0.0.2/a.wav", guard=guard) == "DestinationBlocked"
    assert verdict("http://10.20.3.4/a.wav", guard=guard) == "ok"
    assert verdict("http://10.21.3.4/a.wav", guard=guard) == "DestinationBlocked"
    assert verdict("http://intranet.corp/a.wav", ["192.168.7.7"], guard=guard) == "ok"
    assert verdict("http://other.corp/a.wav", ["192.168.7.7"], guard=guard) == "DestinationBlocked"
    assert verdict("http://[fd00::5]/a.wav", guard=guard) == "ok"
    assert verdict("http://169.254.169.254/", guard=guard) == "DestinationBlocked"


# --- properties -------------------------------------------------------------------------------------------------

BLOCKED_V4 = [
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "169.254.0.0/16",
        "100.64.0.0/10",
        "0.0.0.0/8",
        "224.0.0.0/4",
    )
]


@st.composite
def blocked_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    net = draw(st.sampled_from(BLOCKED_V4))
    return net[draw(st.integers(0, net.num_addresses - 1))]


@st.composite
def public_ipv4(draw: st.DrawFn) -> ipaddress.IPv4Address:
    ip = ipaddress.IPv4Address(draw(st.integers(0, 2**32 - 1)))
    if not is_public(ip):
        ip = ipaddress.IPv4Address("8.8.4.4")
    return ip


@st.composite
def spelled(draw: st.DrawFn, ip: ipaddress.IPv4Address) -> str:
    """One of the many ways inet_aton reads an IPv4 address."""
    n = int(ip)
    octets = [(n >> s) & 255 for s in (24, 16, 8, 0)]
    style = draw(st.sampled_from(["dotted", "number", "hex", "octal", "short2", "short3", "mixed"]))

    def part(v: int) -> str:
        return draw(st.sampled_from([str(v), hex(v), "0" + oct(v)[2:] if v else "0"]))

    if style == "dotted":
        return ".".join(map(str, octets))
    if style == "number":
        return str(n)
    if style == "hex":
        return hex(n)
    if style == "octal":
        return "0" + oct(n)[2:]
    if style == "short2":  # a.bcd
        return f"{part(octets[0])}.{part(n & 0xFFFFFF)}"
    if style == "short3":  # a.b.cd
        return f"{part(octets[0])}.{part(octets[1])}.{part(n & 0xFFFF)}"
    return ".".join(part(v) for v in octets)


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_property_internal_ipv4_is_refused_however_it_is_spelled(data: st.DataObject) -> None:
    ip = data.draw(blocked_ipv4())
    host = data.draw(spelled(ip))
    assert parse_ipv4_loose(host) == ip
    assert verdict(f"http://{host}/a.wav") in ("DestinationBlocked", "MediaUrlError")
    assert verdict(f"http://[::ffff:{ip}]/a.wav") == "DestinationBlocked"


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_property_public_ipv4_passes_however_it_is_spelled(data: st.DataObject) -> None:
    ip = data.draw(public_ipv4())
    host = data.draw(spelled(ip))
    assert parse_ipv4_loose(host) == ip
    outcome = verdict(f"http://{host}/a.wav")
    assert outcome in ("ok", "MediaUrlError")  # zero-padded dotted quads are refused as ambiguous
    if outcome == "ok":
        assert GUARD.check_url(f"http://{host}/a.wav").ip == ip  # read as the address it names, no other


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.sampled_from(
            ["93.184.216.34", "8.8.8.8", "10.0.0.1", "127.0.0.1", "::1", "2606:4700::1", "fe80::1", "169.254.169.254"]
        ),
        min_size=1,
        max_size=4,
    )
)
def test_property_a_name_passes_only_when_every_address_is_public(addresses: list[str]) -> None:
    expected = "ok" if all(is_public(ipaddress.ip_address(a)) for a in addresses) else "DestinationBlocked"
    assert verdict("http://media.example.com/a.wav", addresses) == expected
