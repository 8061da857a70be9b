"""free_port: rendezvous ports come from outside the kernel's ephemeral range, where an outgoing
connection cannot take them between the pick and the rank's bind."""
from __future__ import annotations

import socket

import pytest

from rlsys import cluster


def test_ports_are_free_and_outside_the_ephemeral_range():
    lo, hi = cluster.ephemeral_port_range()
    ports = {cluster.free_port() for _ in range(20)}
    for port in ports:
        assert cluster.RENDEZVOUS_PORTS_FROM <= port < 65536 and not lo <= port <= hi, (port, lo, hi)
        with socket.socket() as s:
            s.bind(("", port))   # free when returned
    assert len(ports) > 1


def test_a_taken_port_is_not_returned(monkeypatch):
    with socket.socket() as held:
        held.bind(("", 0))
        taken = held.getsockname()[1]
        monkeypatch.setattr(cluster, "RENDEZVOUS_PORTS_FROM", taken)
        monkeypatch.setattr(cluster, "ephemeral_port_range", lambda: (taken + 1000, 65535))
        # The only room outside the range is [taken, taken + 1000); `taken` is bound.
        for _ in range(50):
            assert cluster.free_port() != taken


@pytest.mark.parametrize("kernel_range", [(1024, 65535), (20500, 65000)])
def test_no_room_outside_the_range_falls_back_to_the_kernels_pick(monkeypatch, kernel_range):
    real_lo, real_hi = cluster.ephemeral_port_range()
    monkeypatch.setattr(cluster, "ephemeral_port_range", lambda: kernel_range)   # < 1000 ports outside
    port = cluster.free_port()
    with socket.socket() as s:
        s.bind(("", port))
    assert real_lo <= port <= real_hi, port   # the kernel's own pick
