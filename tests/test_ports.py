"""Ports handed to brokers that start together: never ones an outgoing
connection could take first."""
from __future__ import annotations

import socket

from raftka.ports import EPHEMERAL_RANGE_FILE, consecutive_free_ports, free_ports


def ephemeral_range() -> tuple[int, int]:
    low, high = (int(x) for x in EPHEMERAL_RANGE_FILE.read_text().split())
    return low, high


def test_free_ports_lie_below_the_ephemeral_range_outgoing_connections_use():
    low, high = ephemeral_range()
    ports = free_ports(50)
    assert all(port < low for port in ports), (sorted(ports), low, high)
    with socket.create_server(("127.0.0.1", 0)) as server:   # what an outgoing connection may get
        assert low <= server.getsockname()[1] <= high


def test_consecutive_free_ports_lie_below_the_ephemeral_range_and_are_bindable():
    low, _ = ephemeral_range()
    base = consecutive_free_ports(3)
    assert base + 2 < low
    listeners = [socket.create_server(("127.0.0.1", port)) for port in range(base, base + 3)]
    for listener in listeners:
        listener.close()


def test_no_port_is_handed_out_twice_in_one_process():
    ports = free_ports(200) + free_ports(200)
    base = consecutive_free_ports(5)
    ports += list(range(base, base + 5))
    assert len(set(ports)) == len(ports)


def test_a_port_some_listener_holds_is_never_handed_out():
    low, _ = ephemeral_range()
    held = []
    for port in range(low - 400, low):
        try:
            held.append(socket.create_server(("127.0.0.1", port)))
        except OSError:             # another process listens there: just as good
            continue
    try:
        taken = {s.getsockname()[1] for s in held}
        assert not taken.intersection(free_ports(300))
    finally:
        for s in held:
            s.close()
