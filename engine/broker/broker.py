"""Broker: one Raftka broker process's parts together: the ClusterController
(Raft groups, storage, metadata) and the Kafka listener, on one event loop."""
from __future__ import annotations

import asyncio
import logging
import re
import signal
from typing import Any

from engine.broker.groups import GroupService
from engine.broker.handlers import Handlers
from engine.broker.server import KafkaServer
from engine.cluster.controller import ClusterController
from engine.config import Config
from engine.errors import NoControllerError

log = logging.getLogger(__name__)

READY_LOG_INTERVAL_S = 10.0
# the line `raftka serve` prints once it serves; tools that start brokers wait for it
READY_PATTERN = re.compile(r"ready on ([\d.]+):(\d+)")


class Broker:
    """Start with `await start()`; `port` is the Kafka listener's bound port."""

    def __init__(self, config: Config, **raft_settings: Any) -> None:
        self.config = config
        self.controller = ClusterController(config, **raft_settings)
        self.groups = GroupService(self.controller)
        self.handlers = Handlers(self.controller, self.groups)
        self.controller.on_replica_started = self.handlers.replica_started
        self.server = KafkaServer(self.handlers, config.max_request_bytes)
        self.port: int | None = None

    async def start(self) -> None:
        self.port = await self.server.start(self.config.host, self.config.port)
        if self.config.port == 0 and not self.config.advertised_port:
            # registered with the port actually bound
            self.controller.config = self.config = self.config.replace(advertised_port=self.port)
        await self.controller.start()
        await self.groups.start()
        while True:   # peers on other hosts may start much later: wait for them, saying so
            try:
                await self.controller.wait_ready(READY_LOG_INTERVAL_S)
                return
            except NoControllerError:
                log.warning("node %d: waiting for a majority of %s to elect the metadata leader",
                            self.config.node_id, self.config.broker_ids)

    async def stop(self) -> None:
        await self.server.stop()
        await self.groups.stop()
        await self.controller.stop()


async def serve(config: Config, **raft_settings: Any) -> None:
    """Run a broker until SIGTERM or SIGINT."""
    broker = Broker(config, **raft_settings)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = config.host, broker.port
    print(f"raftka broker {config.node_id} ready on {host}:{port} (data in {config.data_dir})", flush=True)
    await stop.wait()
    await broker.stop()
