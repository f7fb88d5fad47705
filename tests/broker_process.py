"""A real `raftka serve` process for integration tests, stopped by its PID."""
from __future__ import annotations

import subprocess
import time
from pathlib import Path

from raftka.broker.broker import READY_PATTERN
from raftka.broker.local_cluster import raftka_command, stop_processes



class BrokerProcess:
    def __init__(self, data_dir: Path, *extra: str) -> None:
        self.data_dir = Path(data_dir)
        self.log_path = self.data_dir.with_suffix(".log")
        self.args = raftka_command("serve", "--port", "0", "--data-dir", str(self.data_dir), *extra)
        self.process: subprocess.Popen | None = None
        self.port = 0

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 30.0) -> "BrokerProcess":
        self.log_file = open(self.log_path, "ab")
        self.process = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=self.log_file)
        deadline = time.monotonic() + timeout_s
        assert self.process.stdout is not None
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError(f"broker exited: {self.log_path.read_text(errors='replace')[-2000:]}")
            match = READY_PATTERN.search(line.decode(errors="replace"))
            if match:
                self.port = int(match.group(2))
                self.ready_line = line.decode(errors="replace")
                return self
        raise TimeoutError("broker not ready")

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        if self.process is not None:
            stop_processes([self.process])
        self.log_file.close()
