"""Which destinations an audio URL may reach (the SSRF guard).

Default: only public unicast addresses. Loopback, private, link-local (169.254.169.254 included), CGNAT,
multicast, reserved, unspecified, documentation, NAT64 and 6to4 ranges are refused, for IPv4 and IPv6, with
IPv4-mapped IPv6 mapped back first. Host names are checked by what they resolve to: every address must pass
(mixed answers are refused), and the fetcher connects to the address checked here, never looking the name
up twice. Every odd spelling of an IPv4 literal that inet_aton accepts (2130706433, 0x7f000001, 0177.0.0.1,
127.1) is read as the address it names, so it cannot pass as a host name.

`--allow-media-hosts` opens named destinations: host names (matched exactly), IP addresses or CIDRs
(matched against the resolved address).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass

import httpx

from ting.errors import DestinationBlocked, MediaUrlError, UnsupportedScheme

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Ranges refused on top of what `ipaddress` calls private/reserved/loopback/link-local/multicast: those
# flags miss some of these depending on the Python version.
_BLOCKED = tuple(
    ipaddress.ip_network(n)
    for n in (
        "0.0.0.0/8",
        "10.0.0.0/8",
        "100.64.0.0/10",
        "127.0.0.0/8",
        "169.254.0.0/16",
        "172.16.0.0/12",
        "192.0.0.0/24",
        "192.0.2.0/24",
        "192.88.99.0/24",
        "192.168.0.0/16",
        "198.18.0.0/15",
        "198.51.100.0/24",
        "203.0.113.0/24",
        "224.0.0.0/4",
        "240.0.0.0/4",
        "::/96",  # IPv4-compatible (deprecated) and the unspecified / loopback addresses
        "64:ff9b::/96",
        "64:ff9b:1::/48",  # NAT64
        "100::/64",  # discard
        "2001::/23",  # IETF protocol assignments, Teredo included
        "2001:db8::/32",
        "3fff::/20",  # documentation
        "2002::/16",  # 6to4
        "fc00::/7",
        "fe80::/10",
        "fec0::/10",
        "ff00::/8",
    )
)

_FORBIDDEN_URL_CHARS = re.compile(r"[\x00-\x20\x7f\\]")
_IPV4_PART = re.compile(r"^(0[xX][0-9a-fA-F]*|0[0-7]*|[1-9][0-9]*)$")


@dataclass(frozen=True)
class Target:
    """A URL that passed the syntax checks, with its host split out."""

    url: httpx.URL
    host: str  # ASCII (IDNA) host name or IP literal, lower case
    port: int
    ip: IPAddress | None  # set when the host is an IP literal in any spelling


def parse_ipv4_loose(host: str) -> ipaddress.IPv4Address | None:
    """Read `host` the way inet_aton does: 1 to 4 parts, each decimal, 0-octal or 0x-hex.

    Returns None when `host` is not such a literal. Raises MediaUrlError when it looks like one but does not
    fit (an out-of-range part), since resolvers disagree about such names.
    """
    parts = host.split(".")
    if not 1 <= len(parts) <= 4 or not all(_IPV4_PART.match(p) for p in parts):
        return None
    values = []
    for p in parts:
        if p[:2] in ("0x", "0X"):
            values.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p[0] == "0":
            values.append(int(p, 8))
        else:
            values.append(int(p))
    *head, last = values
    if any(v > 255 for v in head) or last >= 256 ** (4 - len(head)):
        raise MediaUrlError()
    number = 0
    for v in head:
        number = number * 256 + v
    number = number * 256 ** (4 - len(head)) + last
    return ipaddress.IPv4Address(number)


def canonical(ip: IPAddress) -> IPAddress:
    """Map IPv4-mapped IPv6 (::ffff:a.b.c.d) back to IPv4."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def is_public(ip: IPAddress) -> bool:
    ip = canonical(ip)
    if any(ip in net for net in _BLOCKED if net.version == ip.version):
        return False
    return ip.is_global and not (
        ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_multicast or ip.is_reserved or ip.is_unspecified
    )


class MediaGuard:
    """Decides whether an audio URL may be fetched, and from which address."""

    def __init__(self, allow: Iterable[str] = ()) -> None:
        self.allowed_hosts: set[str] = set()
        self.allowed_networks: list[IPNetwork] = []
        for entry in allow:
            entry = entry.strip().lower()
            if not entry:
                continue
            try:
                self.allowed_networks.append(ipaddress.ip_network(entry.strip("[]"), strict=False))
            except ValueError:
                self.allowed_hosts.add(entry.rstrip("."))

    def check_url(self, url: str) -> Target:
        """Syntax and scheme checks; raises before anything is resolved or dialled."""
        if _FORBIDDEN_URL_CHARS.search(url):
            raise MediaUrlError()
        try:
            parsed = httpx.URL(url)
        except (httpx.InvalidURL, ValueError, TypeError):
            raise MediaUrlError() from None
        if parsed.scheme not in ("http", "https"):
            raise UnsupportedScheme()
        host = parsed.raw_host.decode("ascii").lower()
        if not host or parsed.userinfo or host.endswith("."):
            raise MediaUrlError()
        port = parsed.port if parsed.port is not None else (443 if parsed.scheme == "https" else 80)
        if not 0 < port < 65536:
            raise MediaUrlError()
        ip: IPAddress | None
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            ip = parse_ipv4_loose(host)
        return Target(url=parsed, host=host, port=port, ip=ip)

    def host_allowed(self, host: str) -> bool:
        return host in self.allowed_hosts

    def address_allowed(self, ip: IPAddress) -> bool:
        ip = canonical(ip)
        return is_public(ip) or any(ip in net for net in self.allowed_networks if net.version == ip.version)

    def pick_address(self, target: Target, resolved: list[IPAddress]) -> IPAddress:
        """The address to connect to, after checking every address `target`'s host resolved to."""
        if not resolved:
            raise DestinationBlocked()
        if not self.host_allowed(target.host) and not all(self.address_allowed(ip) for ip in resolved):
            raise DestinationBlocked()
        return canonical(resolved[0])
