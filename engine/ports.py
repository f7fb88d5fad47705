"""Free local ports for the processes `raftka cluster`, the benches and the
tests start (127.0.0.1 only). Standard library only: any layer may use it.

Every port handed out lies below the kernel's ephemeral range
(net.ipv4.ip_local_port_range), the range outgoing connections take their
local ports from. A port the OS picks with bind(0) comes from that range, so
between the check and the listener's bind another node's outgoing peer
connection could take it (brokers that start together dial each other) and
the listener fails with EADDRINUSE. Below the range only a listener can.
A port is handed out at most once per process, so two calls never agree."""
from __future__ import annotations

import random
import socket
from pathlib import Path

LOWEST_PORT = 10000                 # below: well-known and registered services
EPHEMERAL_RANGE_FILE = Path("/proc/sys/net/ipv4/ip_local_port_range")
DEFAULT_EPHEMERAL_LOW = 32768       # Linux's default when the file cannot be read
ATTEMPTS_MAX = 1000

_handed_out: set[int] = set()


def _listen_range() -> tuple[int, int]:
    """[lo, hi) of ports that no outgoing connection takes a local port from."""
    try:
        ephemeral_low = int(EPHEMERAL_RANGE_FILE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        ephemeral_low = DEFAULT_EPHEMERAL_LOW
    if ephemeral_low - LOWEST_PORT < 1000:
        raise RuntimeError(f"the ephemeral port range starts at {ephemeral_low}: "
                           f"no room below it for listeners (need [{LOWEST_PORT}, {LOWEST_PORT + 1000}))")
    return LOWEST_PORT, ephemeral_low


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_ports(count: int) -> list[int]:
    """`count` distinct ports free on 127.0.0.1 right now, none handed out before by this process."""
    lo, hi = _listen_range()
    ports: list[int] = []
    for _ in range(ATTEMPTS_MAX):
        if len(ports) == count:
            return ports
        port = random.randrange(lo, hi)
        if port not in _handed_out and _bindable(port):
            _handed_out.add(port)
            ports.append(port)
    raise RuntimeError(f"no {count} free ports found in [{lo}, {hi}) after {ATTEMPTS_MAX} attempts")


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for `raftka cluster --base-port`)."""
    lo, hi = _listen_range()
    for _ in range(ATTEMPTS_MAX):
        base = random.randrange(lo, hi - count)
        block = range(base, base + count)
        if not _handed_out.intersection(block) and all(_bindable(port) for port in block):
            _handed_out.update(block)
            return base
    raise RuntimeError(f"no {count} consecutive free ports found in [{lo}, {hi})")
