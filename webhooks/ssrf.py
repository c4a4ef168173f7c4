"""Where a webhook may be sent: the SSRF policy, checked by the API at submit and by the webhook worker before every
attempt.

Only http(s); every address the host resolves to must be public (not loopback, private, link-local such as cloud
metadata at 169.254.169.254, multicast, reserved or unspecified) unless the allow-list (`RERANK_WEBHOOK_ALLOWLIST`:
hostnames or CIDRs) permits it. The delivery connects to the address checked here, so a DNS answer that changes
between the check and the connection (rebinding) cannot redirect it.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeURL(ValueError):
    """The URL is not http(s) or points at an address the policy refuses: retrying cannot help."""


class UnresolvableHost(UnsafeURL):
    """The host does not resolve now; it may later (a delivery retries)."""


def parse_allowlist(raw: str) -> tuple[set[str], list[IPNetwork]]:
    hosts: set[str] = set()
    networks: list[IPNetwork] = []
    for item in (x.strip() for x in raw.split(",")):
        if not item:
            continue
        try:
            networks.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            hosts.add(item.lower())
    return hosts, networks


def _is_public(ip: IPAddress) -> bool:
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _is_public(ip.ipv4_mapped)
    return ip.is_global and not (ip.is_multicast or ip.is_reserved or ip.is_unspecified)


def resolve_checked(url: str, allowlist: str) -> tuple[str, list[IPAddress]]:
    """The URL's host and the addresses it may be reached at; UnsafeURL (with the reason) otherwise."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UnsafeURL("webhook URLs must be http or https")
    if not parts.hostname:
        raise UnsafeURL("the webhook URL has no host")
    if parts.username or parts.password:
        raise UnsafeURL("the webhook URL must not carry credentials")
    host = parts.hostname.lower()
    hosts, networks = parse_allowlist(allowlist)
    try:
        port = parts.port or (443 if parts.scheme == "https" else 80)
    except ValueError as exc:
        raise UnsafeURL(f"the webhook URL has an invalid port: {exc}") from None
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnresolvableHost(f"the webhook host {host!r} does not resolve ({exc})") from None
    addresses: list[IPAddress] = []
    for info in infos:
        ip = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if ip not in addresses:
            addresses.append(ip)
    if host in hosts:
        return host, addresses
    for ip in addresses:
        if not _is_public(ip) and not any(ip in net for net in networks):
            raise UnsafeURL(
                f"the webhook host {host!r} resolves to {ip}, a non-public address; "
                "allow it with RERANK_WEBHOOK_ALLOWLIST if it is your own receiver"
            )
    return host, addresses
