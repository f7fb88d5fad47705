"""Broker: one Raftka broker process's parts together: the ClusterController
(Raft groups, storage, metadata) and the Kafka listener, on one event loop.

When its RaftNode fails (local storage broke: an OSError or StorageError
while replicating, see raft/node.py) the broker logs it at CRITICAL and goes
out of service: it no longer replicates, leads or votes, so the other
brokers elect new leaders for its partitions, and Produce is answered with
KAFKA_STORAGE_ERROR. Only a restart (once the disk is fixed) brings it back."""
from __future__ import annotations

import asyncio
import logging
import re
import signal
from typing import Any

from raftka.broker.group_service import GroupService
from raftka.broker.handlers import Handlers
from raftka.broker.metrics import BrokerMetrics
from raftka.broker.security_apis import Security, SecurityHandlers
from raftka.broker.server import KafkaServer
from raftka.cluster.controller import ClusterController
from raftka.config import Config
from raftka.errors import NoControllerError, RaftkaError, StorageError
from raftka.security.process_limits import make_private, raise_descriptor_limit

log = logging.getLogger(__name__)

READY_LOG_INTERVAL_S = 10.0
TERM_OBSERVE_INTERVAL_S = 0.5
# the line `raftka serve` prints once it can serve (Broker.start returned); tools that start brokers wait for it
READY_PATTERN = re.compile(r"ready on ([\d.]+):(\d+)")


class Broker:
    """Start with `await start()`; `port` is the Kafka listener's bound port."""

    def __init__(self, config: Config, **raft_settings: Any) -> None:
        self.config = config
        self.controller = ClusterController(config, **raft_settings)
        self.groups = GroupService(self.controller)
        self.handlers = Handlers(self.controller, self.groups)
        self.controller.on_replica_started = self.handlers.replica_started
        self.failure: str | None = None   # why this broker is out of service, if it is
        node = self.controller.node
        node.storage_errors = (*node.storage_errors, StorageError)   # a log write the disk refused
        node.on_failure(self._storage_failed)
        self.security = Security(config, self.controller)
        self.handlers.secure(self.security)
        self.handlers.add_apis(SecurityHandlers(self.security).table())
        self.server = KafkaServer(self.handlers, config, self.security)
        self.port: int | None = None
        self.metrics: BrokerMetrics | None = None
        self.metrics_port: int | None = None
        self._metrics_task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen, join the cluster, and return once the broker can serve (its
        controller is ready: a metadata leader is elected and every configured
        broker has registered). Requests that come before are answered: admin
        ones wait for readiness within their timeout, then NOT_CONTROLLER."""
        self.port = await self.server.start(self.config.host, self.config.port)
        if self.config.port == 0 and not self.config.advertised_port:
            # registered with the port actually bound
            self.controller.config = self.config = self.config.replace(advertised_port=self.port)
        await self.controller.start()
        await self.groups.start()
        if self.config.metrics_port:
            self.metrics = self.handlers.metrics = BrokerMetrics(self.controller, self.groups)
            self.metrics_port = await self.metrics.start(self.config.metrics_host, self.config.metrics_port)
            self._metrics_task = asyncio.get_running_loop().create_task(self._observe_terms())
        while True:   # peers on other hosts may start much later: wait for them, saying so
            try:
                await self.controller.wait_ready(READY_LOG_INTERVAL_S)
                break
            except NoControllerError as waiting:
                log.warning("%s", waiting)
        try:
            await self.security.bootstrap_admin()
        except RaftkaError as error:   # another broker may have done it; a restart tries again
            log.warning("could not give the admin user its credentials: %s", error)

    def _storage_failed(self, reason: str) -> None:
        self.failure = self.handlers.storage_failure = reason
        log.critical("broker %d is out of service, its storage failed: %s. It no longer replicates, leads or "
                     "votes (the other brokers elect new leaders for its partitions) and answers Produce with "
                     "KAFKA_STORAGE_ERROR; restart it once the disk is fixed", self.config.node_id, reason)

    async def _observe_terms(self) -> None:
        while True:
            await asyncio.sleep(TERM_OBSERVE_INTERVAL_S)
            assert self.metrics is not None
            self.metrics.observe_terms(self.controller)

    async def stop(self) -> None:
        if self.metrics is not None:
            if self._metrics_task is not None:
                self._metrics_task.cancel()
            await self.metrics.stop()
        await self.server.stop()
        await self.groups.stop()
        await self.controller.stop()


async def serve(config: Config, **raft_settings: Any) -> None:
    """Run a broker until SIGTERM or SIGINT (with the process-wide settings
    of raftka.security.process_limits: descriptors, private files)."""
    raise_descriptor_limit()
    make_private(config.data_dir)
    broker = Broker(config, **raft_settings)
    await broker.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    host, port = config.host, broker.port
    metrics = f", metrics on http://{config.metrics_host}:{broker.metrics_port}/metrics" if broker.metrics_port else ""
    print(f"raftka broker {config.node_id} ready on {host}:{port} (data in {config.data_dir}){metrics}", flush=True)
    await stop.wait()
    await broker.stop()
