"""One real broker process for integration tests: LocalBrokers (the launcher
`raftka cluster`, the benchmarks and the failover tests share) with one node."""
from __future__ import annotations

from pathlib import Path

from raftka.broker.local_cluster import LocalBrokers


class BrokerProcess:
    """`raftka serve` on a free 127.0.0.1 port with its data under `root`; `settings` are Config fields."""

    def __init__(self, root: Path, **settings: object) -> None:
        self.brokers = LocalBrokers(root, nodes=1, settings=settings)
        self.port = self.brokers.port(1)
        self.ready_line = ""

    @property
    def bootstrap(self) -> str:
        return self.brokers.bootstrap()

    def start(self, timeout_s: float = 30.0) -> "BrokerProcess":
        self.brokers.start(timeout_s)
        self.ready_line = self.brokers.ready_lines[1]
        return self

    def log_text(self) -> str:
        return self.brokers.log_path(1).read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.brokers.alive(1)

    def stop(self) -> None:
        self.brokers.stop()
