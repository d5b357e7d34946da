"""Listener ports (bus_runtime/net.py): outside the kernel's ephemeral range, where no outgoing connection can take
them between the check and the bind."""

from __future__ import annotations

from pathlib import Path

from bus_runtime.net import LINUX_EPHEMERAL, LOWEST_SERVICE_PORT, bindable, ephemeral_range, free_port


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
