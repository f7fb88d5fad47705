"""`raftka cluster --nodes N`: a local multi-process cluster in one command.

Each node is a `raftka serve --config <dir>/node-<i>/broker.toml` process:
Kafka listener on 127.0.0.1:<base_port + i - 1>, peer port chosen free at
start, data under <dir>/node-<i>. The cluster secret is made fresh for each
run and handed to the nodes in RAFTKA_CLUSTER_SECRET, never written to disk.
Ctrl-C or SIGTERM stops every node (SIGTERM by PID, SIGKILL after 15 s). A
node that dies (or is killed to watch a failover) is reported; the others
keep running. Its port pickers (free_ports, consecutive_free_ports) serve the
tests, the benchmarks and engine/replication/local_nodes.py too.
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
from pathlib import Path

from raftka.ports import free_ports

READY_TIMEOUT_S = 60.0
PR_SET_PDEATHSIG = 1


def raftka_command(*args: str) -> list[str]:
    """The argv that runs `raftka <args>` in a new process with this interpreter.

    `-P` keeps the working directory off sys.path, so a folder there named
    like the package (a `raftka/` of the user's own) cannot shadow the
    installed one. Every process the CLI starts is started with this."""
    return [sys.executable, "-P", "-m", "raftka.cli", *args]


def write_configs(nodes: int, base_port: int, data_dir: Path) -> list[Path]:
    peer_ports = free_ports(nodes)
    paths = []
    for i in range(1, nodes + 1):
        node_dir = data_dir / f"node-{i}"
        node_dir.mkdir(parents=True, exist_ok=True)
        peers = "".join(f'\n  {{ id = {j}, host = "127.0.0.1", port = {peer_ports[j - 1]} }},'
                        for j in range(1, nodes + 1) if j != i)
        text = (f'# written by `raftka cluster`; the cluster secret comes from RAFTKA_CLUSTER_SECRET\n'
                f'node_id = {i}\nhost = "127.0.0.1"\nport = {base_port + i - 1}\n'
                f'peer_host = "127.0.0.1"\npeer_port = {peer_ports[i - 1]}\n'
                f'data_dir = "{node_dir / "data"}"\n'
                f'default_replication_factor = {min(3, nodes)}\n'
                f'peers = [{peers}\n]\n')
        path = node_dir / "broker.toml"
        path.write_text(text)
        paths.append(path)
    return paths


def run_cluster(nodes: int, base_port: int, data_dir: Path) -> int:
    data_dir = Path(data_dir).resolve()
    configs = write_configs(nodes, base_port, data_dir)
    env = dict(os.environ, RAFTKA_CLUSTER_SECRET=secrets.token_hex(16))
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    processes = []
    try:
        for config in configs:
            log = open(config.parent / "broker.log", "ab")
            processes.append(subprocess.Popen(raftka_command("serve", "--config", str(config)),
                                              stdout=subprocess.PIPE, stderr=log, env=env,
                                              preexec_fn=die_with_parent))
        for i, process in enumerate(processes, 1):
            line = _ready_line(process, READY_TIMEOUT_S)
            if line is None:
                print(f"node {i} did not start; see {configs[i - 1].parent / 'broker.log'}", file=sys.stderr)
                return 1
            print(line, flush=True)
        bootstrap = ",".join(f"127.0.0.1:{base_port + i}" for i in range(nodes))
        print(f"cluster of {nodes} ready: bootstrap.servers={bootstrap} (Ctrl-C stops it)", flush=True)
        reported: set[int] = set()
        while not stop.is_set():
            for i, process in enumerate(processes, 1):
                if process.poll() is not None and i not in reported:
                    reported.add(i)   # killed on purpose, perhaps: the others carry on
                    print(f"node {i} exited with {process.returncode}; the others keep running", flush=True)
            if len(reported) == len(processes):
                return 1
            stop.wait(0.5)
        return 0
    finally:
        stop_processes(processes)


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
