"""Listener ports (bus_runtime/net.py): outside the kernel's ephemeral range, where no outgoing connection can take
them between the check and the bind; loopback addresses, and the gateway's one decision made from a client's."""

from __future__ import annotations

from pathlib import Path

import pytest

from bus_gateway.config import GatewayConfig
from bus_runtime.net import LINUX_EPHEMERAL, LOWEST_SERVICE_PORT, bindable, ephemeral_range, free_port, is_loopback


def test_free_ports_are_bindable_and_below_the_ephemeral_range():
    low, _ = ephemeral_range()
    room = low - LOWEST_SERVICE_PORT >= 1000  # else free_port falls back to bind(0)
    ports = {free_port() for _ in range(20)}
    for port in ports:
        assert LOWEST_SERVICE_PORT <= port < low or not room, (port, low)
        bindable(port).close()
    assert len(ports) > 1  # random picks, not one port for every caller


def test_the_ephemeral_range_is_read_from_the_kernel_or_defaults(tmp_path: Path):
    (tmp_path / "range").write_text("40000\t50000\n")
    assert ephemeral_range(tmp_path / "range") == (40000, 50000)
    (tmp_path / "bad").write_text("not ports")
    assert ephemeral_range(tmp_path / "bad") == LINUX_EPHEMERAL
    assert ephemeral_range(tmp_path / "missing") == LINUX_EPHEMERAL


@pytest.mark.parametrize(("host", "loopback"), [
    ("127.0.0.1", True), ("127.3.2.1", True), ("::1", True), ("::ffff:127.0.0.1", True),
    ("10.0.0.5", False), ("::ffff:10.0.0.5", False), ("2001:db8::1", False), ("localhost", False),
    ("testclient", False), ("", False), (None, False),
])
def test_is_loopback_reads_addresses_only(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(("setting", "host", "compress"), [
    (None, "127.0.0.1", False), (None, "::1", False), (None, "10.0.0.5", True), (None, None, True),
    (True, "127.0.0.1", True), (False, "10.0.0.5", False),
])
def test_the_sdk_compresses_unless_auto_and_on_this_host(setting, host, compress):
    assert GatewayConfig(compress_fwdbwd=setting).compresses_fwdbwd_for(host) is compress
    assert GatewayConfig.from_env({"TINKER_BUS_GATEWAY_COMPRESS_FWDBWD": "auto"}).compress_fwdbwd is None
