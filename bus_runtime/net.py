"""Network helpers every part and test shares."""

from __future__ import annotations

import ipaddress
import random
import socket
from pathlib import Path

EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
LINUX_EPHEMERAL = (32768, 60999)  # the kernel's default local port range
LOWEST_SERVICE_PORT = 10000  # below this live well-known and registered services
_TRIES = 64


def bindable(port: int, host: str = "127.0.0.1") -> socket.socket:
    """A socket bound to (host, port), closed by the caller. SO_REUSEADDR, as every server here sets it: a port
    whose last connections linger in TIME-WAIT (a stack stopped a moment ago) is free for a new listener, and a
    test-bind without it would call it "in use" for up to a minute."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind((host, port))
    except OSError:
        s.close()
        raise
    return s


def ephemeral_range(path: Path = EPHEMERAL_RANGE_FILE) -> tuple[int, int]:
    """The ports the kernel hands out as the local end of outgoing connections (and to bind(0))."""
    try:
        low, high = (int(part) for part in path.read_text().split())
    except (OSError, ValueError):
        return LINUX_EPHEMERAL
    return low, high


def free_port() -> int:
    """A free port for a listener, chosen below the kernel's ephemeral range when there is room: a port from that
    range (what bind(0) gives) can be taken by any outgoing connection on the machine between this check and the
    listener's bind, or while a stopped part restarts on it (test_cli_stack.py saw a restarted stack's broker port
    taken so). Random, so concurrent callers rarely try the same one; the bind check skips ports in use."""
    low, _ = ephemeral_range()
    if low - LOWEST_SERVICE_PORT >= 1000:
        for _ in range(_TRIES):
            try:
                with bindable(random.randrange(LOWEST_SERVICE_PORT, low)) as s:
                    return s.getsockname()[1]
            except OSError:
                continue
    with bindable(0) as s:
        return s.getsockname()[1]


def is_loopback(host: str | None) -> bool:
    """Whether `host` is a loopback address (IPv4, IPv6 or IPv4-mapped IPv6). A name such as "localhost" is not
    resolved: servers see their peers as addresses."""
    try:
        address = ipaddress.ip_address(host or "")
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return (mapped or address).is_loopback
