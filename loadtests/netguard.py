"""Loopback guard: load is only ever sent to this machine unless the caller says otherwise."""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit


class NonLoopbackError(ValueError):
    """A host that does not resolve only to loopback addresses, without ``allow_remote``."""


def is_loopback_host(host: str) -> bool:
    """True when ``host`` (an IP literal or a name) resolves only to loopback addresses."""
    host = host.strip().strip("[]")
    if not host:
        return False
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError):
        return False
    addrs = {info[4][0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a.split("%")[0]).is_loopback for a in addrs)


def check_host(host: str, allow_remote: bool = False) -> str:
    """Return ``host`` if it is loopback (or ``allow_remote``); raise NonLoopbackError otherwise."""
    if not allow_remote and not is_loopback_host(host):
        raise NonLoopbackError(
            f"refusing non-loopback host {host!r}: load tests only target 127.0.0.1/::1 "
            "unless --allow-remote is given"
        )
    return host


def check_url(url: str, allow_remote: bool = False) -> str:
    """Check the host part of an http(s) URL with :func:`check_host`; return the URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL with a host: {url!r}")
    check_host(parts.hostname, allow_remote)
    return url


def parse_replicas(spec: str, allow_remote: bool = False) -> list[str]:
    """``"127.0.0.1:8001,127.0.0.1:8002"`` (or full URLs) -> checked base URLs."""
    urls = []
    for item in (s.strip() for s in spec.split(",")):
        if not item:
            continue
        url = item if "://" in item else f"http://{item}"
        parts = urlsplit(url)
        if parts.port is None:
            raise ValueError(f"replica {item!r} has no port")
        urls.append(check_url(url.rstrip("/"), allow_remote))
    if not urls:
        raise ValueError(f"no replicas in {spec!r}")
    return urls
