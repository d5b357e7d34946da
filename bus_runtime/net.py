"""Network helpers every part and test shares."""

from __future__ import annotations

import socket


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


def free_port() -> int:
    with bindable(0) as s:
        return s.getsockname()[1]
