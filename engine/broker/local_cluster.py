"""Local broker processes: `raftka cluster --nodes N`, and the one launcher
the CLI, the tests and the benchmarks share (`LocalBrokers`).

Each node is a `raftka serve --config <dir>/node-<i>/broker.toml` process:
Kafka listener on 127.0.0.1:<base_port + i - 1>, peer port chosen free at
start, data under <dir>/node-<i>/data. A node may instead have an address of
its own (`hosts`: Kafka listener, peer port and advertised address all on
it) and a command prefix (`command_prefixes`: `ip netns exec <ns>` runs it in
a network namespace, tests/netns.py). The cluster secret is made fresh for
each run and handed to the nodes in RAFTKA_CLUSTER_SECRET, never written to
disk. Processes are stopped by their PID (SIGTERM, then SIGKILL after a
grace period), never by name, and die with the process that started them
(PR_SET_PDEATHSIG). `raftka cluster` reports a node that dies (or is killed to
watch a failover); the others keep running.
"""
from __future__ import annotations

import ctypes
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Sequence

from raftka.ports import consecutive_free_ports, free_ports

READY_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1
LOOPBACK = "127.0.0.1"


def raftka_command(*args: str) -> list[str]:
    """The argv that runs `raftka <args>` in a new process with this interpreter.

    `-P` keeps the working directory off sys.path, so a folder there named
    like the package (a `raftka/` of the user's own) cannot shadow the
    installed one. Every process the CLI starts is started with this."""
    return [sys.executable, "-P", "-m", "raftka.cli", *args]


def write_configs(nodes: int, base_port: int, data_dir: Path, settings: dict[str, object] | None = None,
                  hosts: Sequence[str] | None = None, metrics_ports: Sequence[int] | None = None,
                  peer_tls_dir: Path | None = None) -> list[Path]:
    """One broker.toml per node under data_dir/node-<i>; `settings` adds Config fields to every node's.

    Every node listens on 127.0.0.1 unless `hosts` gives node i's address
    (hosts[i - 1]): its Kafka listener, its peer port and the address it
    advertises to clients are then all on that address, and its peers dial it there.
    With `peer_tls_dir`, brokers speak TLS to each other: node i's certificate
    and key are raftka-node-<i>.pem and raftka-node-<i>.key there, signed by
    peer-ca.pem (required when `hosts` are not loopback)."""
    own_hosts = hosts is not None
    hosts = _node_hosts(nodes, hosts)
    peer_ports = free_ports(nodes)
    paths = []
    for i in range(1, nodes + 1):
        node_dir = data_dir / f"node-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        host = hosts[i - 1]
        peers = "".join(f'\n  {{ id = {j}, host = "{hosts[j - 1]}", port = {peer_ports[j - 1]} }},'
                        for j in range(1, nodes + 1) if j != i)
        advertised = f'advertised_host = "{host}"\nadvertised_port = {base_port + i - 1}\n' if own_hosts else ""
        text = (f'# written by `raftka cluster`; the cluster secret comes from RAFTKA_CLUSTER_SECRET\n'
                f'node_id = {i}\nhost = "{host}"\nport = {base_port + i - 1}\n{advertised}'
                f'peer_host = "{host}"\npeer_port = {peer_ports[i - 1]}\n'
                f'data_dir = "{node_dir / "data"}"\n'
                f'default_replication_factor = {min(3, nodes)}\n'
                + (f'metrics_port = {metrics_ports[i - 1]}\n' if metrics_ports else "")
                + (_peer_tls_settings(Path(peer_tls_dir), i) if peer_tls_dir is not None else "")
                + "".join(f"{key} = {_toml_value(value)}\n" for key, value in (settings or {}).items())
                + f'peers = [{peers}\n]\n')
        path = node_dir / "broker.toml"
        path.write_text(text)
        paths.append(path)
    return paths


def _peer_tls_settings(directory: Path, node_id: int) -> str:
    paths = {"peer_tls_cert": f"raftka-node-{node_id}.pem", "peer_tls_key": f"raftka-node-{node_id}.key",
             "peer_tls_ca": "peer-ca.pem"}
    return "".join(f"{key} = {_toml_value(str(directory.resolve() / name))}\n" for key, name in paths.items())


def _node_hosts(nodes: int, hosts: Sequence[str] | None) -> list[str]:
    if hosts is None:
        return [LOOPBACK] * nodes
    if len(hosts) != nodes:
        raise ValueError(f"{nodes} nodes need {nodes} hosts, got {list(hosts)}")
    return [str(host) for host in hosts]


def _toml_value(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'


class BrokerStartError(RuntimeError):
    """A broker process exited, or did not print its ready line in time."""


class LocalBrokers:
    """`nodes` `raftka serve` processes forming one cluster, on 127.0.0.1 unless `hosts` says otherwise.

    Node i (1-based) listens for Kafka clients on base_port + i - 1 and keeps
    its data in root/node-<i>/data. `kill` and `restart` crash and revive one
    node (the same config, data and ports), for failover tests and benches.

    On several hosts (network namespaces, tests/netns.py): `hosts[i - 1]` is
    node i's own address (see write_configs) and `command_prefixes[i - 1]` is
    put before its `raftka serve` command (`["ip", "netns", "exec", ns]`). The
    prefix must exec the broker in place (as `ip netns exec` does), so the
    PID started is the broker's and kill, stop and the /proc readings reach it.
    """

    def __init__(self, root: Path, nodes: int = 3, base_port: int | None = None,
                 settings: dict[str, object] | None = None, *, hosts: Sequence[str] | None = None,
                 command_prefixes: Sequence[Sequence[str]] | None = None, metrics: bool = False,
                 peer_tls_dir: Path | None = None) -> None:
        self.root = Path(root).resolve()
        self.nodes = nodes
        self.hosts = _node_hosts(nodes, hosts)
        if command_prefixes is not None and len(command_prefixes) != nodes:
            raise ValueError(f"{nodes} nodes need {nodes} command prefixes, got {len(command_prefixes)}")
        self.command_prefixes = [list(prefix) for prefix in command_prefixes or [[]] * nodes]
        self.base_port = base_port if base_port is not None else consecutive_free_ports(nodes)
        # `metrics`: each node serves Prometheus metrics on a port of its own (metric())
        self.metrics_ports = free_ports(nodes) if metrics else []
        self.configs = write_configs(nodes, self.base_port, self.root, settings, hosts, self.metrics_ports,
                                     peer_tls_dir)
        self.env = dict(os.environ, RAFTKA_CLUSTER_SECRET=secrets.token_hex(16))
        self.processes: dict[int, subprocess.Popen] = {}
        self.ready_lines: dict[int, str] = {}

    @property
    def node_ids(self) -> list[int]:
        return list(range(1, self.nodes + 1))

    def host(self, node_id: int) -> str:
        return self.hosts[node_id - 1]

    def port(self, node_id: int) -> int:
        return self.base_port + node_id - 1

    def bootstrap(self, node_ids: list[int] | None = None) -> str:
        return ",".join(f"{self.host(n)}:{self.port(n)}" for n in (node_ids or self.node_ids))

    def node_dir(self, node_id: int) -> Path:
        return self.configs[node_id - 1].parent

    def log_path(self, node_id: int) -> Path:
        return self.node_dir(node_id) / "broker.log"

    def pid(self, node_id: int) -> int:
        return self.processes[node_id].pid

    def alive(self, node_id: int) -> bool:
        process = self.processes.get(node_id)
        return process is not None and process.poll() is None

    def command(self, node_id: int) -> list[str]:
        """The argv that runs node `node_id`: its prefix, then `raftka serve --config <its broker.toml>`."""
        return [*self.command_prefixes[node_id - 1], *raftka_command("serve", "--config", str(self.configs[node_id - 1]))]

    def spawn(self, node_id: int) -> subprocess.Popen:
        """Start node `node_id` without waiting for it (see wait_ready)."""
        with open(self.log_path(node_id), "ab") as log:
            process = subprocess.Popen(self.command(node_id), stdout=subprocess.PIPE, stderr=log, env=self.env,
                                       preexec_fn=die_with_parent)
        self.processes[node_id] = process
        return process

    def wait_ready(self, node_id: int, timeout_s: float = READY_TIMEOUT_S) -> str:
        """The node's ready line, once it can serve (it needs a majority of its peers up)."""
        line = _ready_line(self.processes[node_id], timeout_s)
        if line is None:
            raise BrokerStartError(f"node {node_id} did not start; see {self.log_path(node_id)}:\n"
                                   + self.log_tail(node_id))
        self.ready_lines[node_id] = line
        return line

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> "LocalBrokers":
        for node_id in self.node_ids:
            self.spawn(node_id)
        for node_id in self.node_ids:
            self.wait_ready(node_id, timeout_s)
        return self

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Signal one node by PID; SIGKILL (the default) is a crash: no flush, no goodbye."""
        process = self.processes[node_id]
        if process.poll() is None:
            os.kill(process.pid, sig)
            if sig == signal.SIGKILL:
                process.wait()

    def restart(self, node_id: int, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Start a killed or stopped node again on its own data; returns its ready line."""
        if self.alive(node_id):
            raise BrokerStartError(f"node {node_id} is still running")
        self.spawn(node_id)
        return self.wait_ready(node_id, timeout_s)

    def stop(self, grace_s: float = 15.0) -> None:
        stop_processes(list(self.processes.values()), grace_s)

    def log_tail(self, node_id: int, lines: int = 20) -> str:
        path = self.log_path(node_id)
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def segment_files(self, node_id: int, topic: str, partition: int) -> dict[str, bytes]:
        """Name -> bytes of every segment file of one partition replica on node_id."""
        directory = self.node_dir(node_id) / "data" / f"{topic}-{partition}"
        return {path.name: path.read_bytes() for path in sorted(directory.glob("*.log"))}

    def cpu_seconds(self, node_id: int) -> float:
        """User + system CPU time of the node's process so far."""
        fields = Path(f"/proc/{self.pid(node_id)}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def write_bytes(self, node_id: int) -> int:
        """Bytes the node's process has sent (or dirtied for) storage so far (/proc/PID/io)."""
        for line in Path(f"/proc/{self.pid(node_id)}/io").read_text().splitlines():
            if line.startswith("write_bytes:"):
                return int(line.split()[1])
        return 0

    def metric(self, node_id: int, name: str) -> float:
        """The sum of a metric's samples as the node serves them now (started with metrics=True)."""
        url = f"http://{self.hosts[node_id - 1]}:{self.metrics_ports[node_id - 1]}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name) and (line[len(name):len(name) + 1] in (" ", "{")))

    def peak_rss_bytes(self, node_id: int) -> int:
        for line in Path(f"/proc/{self.pid(node_id)}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
        return 0

    def __enter__(self) -> "LocalBrokers":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_cluster(nodes: int, base_port: int, data_dir: Path, peer_tls_dir: Path | None = None) -> int:
    """`raftka cluster`: start, report, and on Ctrl-C/SIGTERM stop every node."""
    brokers = LocalBrokers(data_dir, nodes, base_port, peer_tls_dir=peer_tls_dir)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        for node_id in brokers.node_ids:
            brokers.spawn(node_id)
        for node_id in brokers.node_ids:
            try:
                print(brokers.wait_ready(node_id), flush=True)
            except BrokerStartError:
                print(f"node {node_id} did not start; see {brokers.log_path(node_id)}", file=sys.stderr)
                return 1
        print(f"cluster of {nodes} ready: bootstrap.servers={brokers.bootstrap()} (Ctrl-C stops it)", flush=True)
        reported: set[int] = set()
        while not stop.is_set():
            for node_id in brokers.node_ids:
                if not brokers.alive(node_id) and node_id not in reported:
                    reported.add(node_id)   # killed on purpose, perhaps: the others carry on
                    print(f"node {node_id} exited with {brokers.processes[node_id].returncode}; "
                          "the others keep running", flush=True)
            if len(reported) == nodes:
                return 1
            stop.wait(0.5)
        return 0
    finally:
        brokers.stop()


def die_with_parent() -> None:
    """In the child: SIGTERM when `raftka cluster` dies, even by SIGKILL (Linux
    PR_SET_PDEATHSIG), so no broker outlives its cluster."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass   # not Linux: Ctrl-C and SIGTERM still stop every node


def _ready_line(process: subprocess.Popen, timeout_s: float) -> str | None:
    assert process.stdout is not None
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(process.stdout.readline().decode().strip()), daemon=True)
    reader.start()
    reader.join(timeout_s)
    return result[0] if result and "ready" in result[0] else None


def stop_processes(processes: list[subprocess.Popen], grace_s: float = 15.0) -> None:
    """SIGTERM each by PID; SIGKILL whatever still runs after `grace_s`."""
    for process in processes:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    for process in processes:
        try:
            process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()
