"""Start, kill and restart a cluster of replication node processes (control_node.py)
on 127.0.0.1: the real-process tests and the replication benchmark use it.

Processes are stopped by their PID (SIGTERM, then SIGKILL if they hang), never
by name; ports are picked free at start.
"""
from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raftka.ports import free_ports

READY_TIMEOUT_S = 60.0


@dataclass
class NodeProcess:
    node_id: int
    data_dir: Path
    peer_port: int
    control_port: int
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def cpu_seconds(self) -> float:
        """User + system CPU time of the process so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def peak_rss_bytes(self) -> int:
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0


@dataclass
class LocalCluster:
    """`nodes` replication processes sharing every partition (RF = nodes)."""

    root: Path
    nodes: int = 3
    partitions: int = 1
    raft_settings: dict[str, Any] = field(default_factory=dict)
    members: dict[int, NodeProcess] = field(default_factory=dict)
    secret: str = field(default_factory=lambda: secrets.token_hex(16))

    def __post_init__(self) -> None:
        ports = free_ports(2 * self.nodes)
        for i in range(self.nodes):
            node_id = i + 1
            self.members[node_id] = NodeProcess(node_id, self.root / f"node-{node_id}", ports[2 * i], ports[2 * i + 1])

    def start(self) -> None:
        for node_id in self.members:
            self.spawn(node_id)
        for node_id in self.members:
            self.wait_ready(node_id)

    def spawn(self, node_id: int) -> NodeProcess:
        member = self.members[node_id]
        peers = ",".join(f"{m.node_id}=127.0.0.1:{m.peer_port}" for m in self.members.values() if m.node_id != node_id)
        member.data_dir.mkdir(parents=True, exist_ok=True)
        member.log_path = self.root / f"node-{node_id}.log"
        command = [sys.executable, "-m", "raftka.replication.control_node",
                   "--node-id", str(node_id), "--data-dir", str(member.data_dir),
                   "--peer-port", str(member.peer_port), "--control-port", str(member.control_port),
                   "--peers", peers, "--partitions", str(self.partitions), "--raft", json.dumps(self.raft_settings)]
        env = dict(os.environ, RAFTKA_CLUSTER_SECRET=self.secret)
        with open(member.log_path, "ab") as log_file:
            member.process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, env=env)
        return member

    def wait_ready(self, node_id: int, timeout_s: float = READY_TIMEOUT_S) -> None:
        member = self.members[node_id]
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not member.alive:
                raise RuntimeError(f"node {node_id} exited: {self.log_tail(node_id)}")
            try:
                socket.create_connection(("127.0.0.1", member.control_port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise TimeoutError(f"node {node_id} not ready in {timeout_s} s: {self.log_tail(node_id)}")

    def kill(self, node_id: int) -> None:
        """SIGKILL: no cleanup, no flush, as a crash."""
        member = self.members[node_id]
        if member.alive:
            os.kill(member.pid, signal.SIGKILL)
            member.process.wait()

    def restart(self, node_id: int) -> None:
        self.spawn(node_id)
        self.wait_ready(node_id)

    def stop(self) -> None:
        for member in self.members.values():
            if member.alive:
                os.kill(member.pid, signal.SIGTERM)
        deadline = time.monotonic() + 15
        for member in self.members.values():
            if member.process is None:
                continue
            try:
                member.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                os.kill(member.pid, signal.SIGKILL)
                member.process.wait()

    def log_tail(self, node_id: int, lines: int = 20) -> str:
        path = self.members[node_id].log_path
        if path is None or not path.exists():
            return ""
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])

    def segment_files(self, node_id: int, partition: int) -> dict[str, bytes]:
        directory = self.members[node_id].data_dir / f"replicated-{partition}"
        return {p.name: p.read_bytes() for p in sorted(directory.glob("*.log"))}

    def __enter__(self) -> "LocalCluster":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
