"""Free local ports for the processes `raftka cluster`, the benches and the
tests start (127.0.0.1 only). Standard library only: any layer may use it."""
from __future__ import annotations

import random
import socket


def free_ports(count: int) -> list[int]:
    """`count` ports free on 127.0.0.1 right now (the OS picks them)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def consecutive_free_ports(count: int) -> int:
    """The first of `count` consecutive free ports (for `raftka cluster --base-port`)."""
    for _ in range(100):
        base = random.randint(20000, 60000 - count)
        sockets = []
        try:
            for port in range(base, base + count):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError(f"no {count} consecutive free ports found")
