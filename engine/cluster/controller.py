"""ClusterController: one broker's part in the cluster.

It owns the broker's RaftNode (peer network and every Raft group), its
LogManager, and its member of the metadata group, and keeps three things true:

- the partition groups running here are exactly those the metadata assigns
  to this broker (`_reconcile`, after every metadata change): a new topic or
  partition starts a PartitionReplica, a deleted one is stopped and its data
  removed, and a topic recreated under the same name starts from empty;
- the metadata says who leads each partition: a partition's leader records
  its leader epoch and ISR there when they change, so every broker can
  answer Kafka's Metadata;
- admin operations (register, create/delete topics, add partitions) work from
  any broker: a command is proposed on the metadata leader, forwarded to it
  over the peer network when that is another broker. They are served once the
  broker is ready (a metadata leader is elected and every configured broker
  has registered), and end within their timeout: done, refused, or
  NoControllerError (Kafka's retriable NOT_CONTROLLER).

Nothing here runs on another thread: Raft ticks, applies, reconciliation and
the Kafka server (issue 4) share the broker's event loop.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import os
import shutil
from typing import Any, Callable

from raftka.cluster import metadata
from raftka.cluster.metadata import METADATA_GROUP_ID, ClusterState, PartitionInfo, PartitionLimits
from raftka.cluster import topic_configs
from raftka.cluster.leader_balance import LeaderBalancer, LedPartition, preferred_imbalance
from raftka.config import OFFSETS_TOPIC, Config, ConfigError, config_text
from raftka.errors import (ErrorCode, InvalidConfigError, InvalidPartitionsError, InvalidReplicationFactorError, NoControllerError,
                           RaftkaError, UnknownTopicOrPartitionError)
from raftka.storage.log_manager import LogManager, validate_topic_name
from raftka.replication import NotLeaderError, PartitionReplica, ReplicationError
from raftka.security.tls import peer_tls
from raftka.raft.codec import CodecError
from raftka.raft.node import RaftNode
from raftka.raft.state_machine import StateMachineReplica
from raftka.raft.transport import PeerNetwork, PeerNetworkConfig
from raftka.raft.votes import VoteStore

log = logging.getLogger(__name__)

DUTY_INTERVAL_S = 0.1
LEADERSHIP_REPORT_INTERVAL_S = 0.5
FORWARD_TIMEOUT_S = 2.0
ADMIN_TIMEOUT_S = 15.0             # the longest an admin operation waits (a request's own timeout may be shorter)
READY_POLL_INTERVAL_S = 0.02
PROPOSE_RETRY_INTERVAL_S = 0.05
PRODUCER_ID_BLOCK = 1000
ELECTION_POLL_INTERVAL_S = 0.01


class MetadataCommandError(RaftkaError):
    """The metadata refused a command with this Kafka error code."""

    def __init__(self, code: int, what: str) -> None:
        self.error_code = ErrorCode(code)
        super().__init__(f"{what}: {self.error_code.name}")


class ClusterController:
    """See the module docstring."""

    def __init__(self, config: Config, **raft_settings: Any) -> None:
        try:   # the static defaults of topic configs: only values Raftka implements
            topic_configs.validate({name: config_text(getattr(config, field))
                                    for name, field in topic_configs.DYNAMIC_BROKER_CONFIGS.items()},
                                   topic_configs.DYNAMIC_BROKER_CONFIGS)
        except InvalidConfigError as error:
            raise ConfigError(str(error)) from None
        self.config = config
        self.node_id = config.node_id
        self.raft_settings = dict(raft_settings)
        # acknowledge only what the journal has fdatasync'd (fsync=always, the default)
        self.raft_settings.setdefault("journal_fsync", config.fsync == "always")
        self.raft_dir = config.data_dir / "raft"
        self.logs = LogManager(config)
        self.state = ClusterState()
        self.state.on_change(self._metadata_changed)
        network = PeerNetwork(PeerNetworkConfig(
            node_id=config.node_id, secret=config.cluster_secret.encode(),
            peers={peer_id: (host, port) for peer_id, host, port in config.peers},
            listen_host=config.peer_host, listen_port=config.peer_port, tls=peer_tls(config)))
        self.node = RaftNode(network, VoteStore(self.raft_dir / "votes"))
        self.raft_settings["vote_store"] = self.node.votes
        self.metadata: StateMachineReplica | None = None
        self._replicas: dict[tuple[str, int], PartitionReplica] = {}
        self._reporting: set[tuple[str, int]] = set()      # leader reports in flight
        self._forwarded: dict[int, tuple[int, asyncio.Future[int]]] = {}   # request id -> (leader asked, answer)
        self._forward_ids = itertools.count(1)
        self._reconcile_scheduled = False
        self._reconciled_version = -1
        self._registered = False
        self._producer_ids: list[int] | None = None    # [next, end) of this broker's block
        self._producer_id_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.balancer = LeaderBalancer(config.node_id, config.leader_imbalance_check_interval_seconds,
                                       config.leader_imbalance_per_broker_percentage)
        # the broker's hook on each partition replica this broker starts
        self.on_replica_started: Callable[[tuple[str, int], PartitionReplica], None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    # ---- lifecycle ---------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self.node.start()
        self.metadata = StateMachineReplica(METADATA_GROUP_ID, self.state, self.node_id, self.config.broker_ids,
                                            self.node.network, self.raft_dir / "metadata", **self.raft_settings)
        self.metadata.transport.on_extension_message = self._on_forwarded
        self.node.add_group(self.metadata)
        self._tasks = [self._loop.create_task(self._duties()), self._loop.create_task(self._register())]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        for _leader, future in self._forwarded.values():
            if not future.done():
                future.cancel()
        await self.node.stop()
        self._replicas.clear()
        self.logs.close()

    def not_ready_reason(self) -> str | None:
        """Why this broker cannot serve yet; None once it can: a metadata
        leader is elected, this broker's copy of the metadata has caught up
        with the leader's, and every configured broker (this one included)
        has registered, so a new topic's replicas can be placed on all of them."""
        if self.metadata is None or self.metadata.leader_id is None:
            return f"waiting for a majority of {self.config.broker_ids} to elect the metadata leader"
        if not self.metadata.isReady():
            return "catching up with the metadata leader"
        missing = sorted(set(self.config.broker_ids) - set(self.state.brokers))
        if missing or not self._registered:
            return f"waiting for brokers {missing or [self.node_id]} to register"
        return None

    @property
    def ready(self) -> bool:
        """This broker can serve (see not_ready_reason)."""
        return self.not_ready_reason() is None

    async def wait_ready(self, timeout_s: float = 30.0) -> None:
        """Return once ready; NoControllerError saying what is missing after `timeout_s`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while (reason := self.not_ready_reason()) is not None:
            if loop.time() >= deadline:
                raise NoControllerError(f"node {self.node_id}: not ready after {timeout_s:.3g} s: {reason}")
            await asyncio.sleep(min(READY_POLL_INTERVAL_S, max(deadline - loop.time(), 0.0)))

    # ---- what the broker asks ---------------------------------------------

    @property
    def controller_id(self) -> int:
        """The metadata group's leader (Kafka's controller), -1 while unknown."""
        leader = self.metadata.leader_id if self.metadata is not None else None
        return -1 if leader is None else leader

    def replica(self, topic: str, partition: int) -> PartitionReplica | None:
        """This broker's replica of the partition, None when it hosts none."""
        return self._replicas.get((topic, partition))

    def replicas(self) -> dict[tuple[str, int], PartitionReplica]:
        return dict(self._replicas)

    def partition_leader(self, topic: str, partition: int) -> tuple[int, int]:
        """(leader id, leader epoch) as this broker knows them, (-1, -1) when unknown:
        the local replica's view if it hosts one and a leader is known (it is
        the freshest), otherwise what the metadata records. A broker out of
        service knows nothing current: unknown, so clients ask the others
        instead of being sent back to a leader that is gone."""
        if self.node.failed:
            return -1, -1
        replica = self._replicas.get((topic, partition))
        if replica is not None and replica.leader_id is not None:
            return replica.leader_id, replica.leader_epoch
        info = self.state.partition(topic, partition)
        return (info.leader, info.leader_epoch) if info is not None else (-1, -1)

    def in_sync_replicas(self, replica: PartitionReplica) -> list[int]:
        """Kafka's ISR of a partition this broker leads, as the leader sees it
        now (replica.lag.time.max.ms): what it records for Metadata, and what
        acks=all checks against min.insync.replicas. [] unless it leads."""
        return replica.in_sync_replicas(self.config.replica_lag_time_max_ms / 1000)

    # ---- admin operations ---------------------------------------------------

    # Each admin operation refuses bad arguments at once, then waits, within
    # its `timeout_s`, for this broker to be ready and for the metadata leader
    # to commit the command. Past `timeout_s` it raises NoControllerError
    # (NOT_CONTROLLER: retriable), so every request is answered in time.

    async def create_topic(self, name: str, partitions: int | None = None, replication_factor: int | None = None,
                           configs: dict[str, str] | None = None, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        deadline = self._deadline(timeout_s)
        validate_topic_name(name)
        partitions = self.config.default_partitions if partitions in (None, -1) else partitions
        if not isinstance(partitions, int) or not 0 < partitions <= self.config.max_partitions_per_topic:
            raise InvalidPartitionsError(f"partitions must be in [1, max_partitions_per_topic="
                                         f"{self.config.max_partitions_per_topic}], got {partitions!r}")
        cluster_size = len(set(self.config.broker_ids) | set(self.state.brokers))
        if replication_factor in (None, -1):
            replication_factor = min(self.config.default_replication_factor, cluster_size)
        if not isinstance(replication_factor, int) or not 0 < replication_factor <= cluster_size:
            raise InvalidReplicationFactorError(
                f"replication factor {replication_factor!r} in a cluster of {cluster_size} brokers")
        configs = dict(configs or {})
        topic_configs.validate(configs)
        await self._wait_ready_until(deadline)
        brokers = sorted(self.state.brokers)
        assert replication_factor <= len(brokers), f"ready with {brokers} registered, fewer than {cluster_size}"
        replicas = metadata.assign_replicas(brokers, partitions, replication_factor, start=len(self.state.topics))
        limits = PartitionLimits.of(self.config)
        self.state.check_partition_limits(name, replicas, limits)
        await self._propose_partitions(metadata.create_topic(name, os.urandom(16), replicas, configs, limits),
                                       f"create topic {name!r}", limits, deadline)

    async def delete_topic(self, name: str, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        deadline = self._deadline(timeout_s)
        if name == OFFSETS_TOPIC:
            raise RaftkaError(f"{OFFSETS_TOPIC} is internal: it holds every consumer group's offsets")
        await self._wait_ready_until(deadline)
        await self.propose(metadata.delete_topic(name), f"delete topic {name!r}", self._remaining_s(deadline))

    async def create_partitions(self, name: str, total: int, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        deadline = self._deadline(timeout_s)
        await self._wait_ready_until(deadline)   # the topic's partition count is read from caught-up metadata
        topic = self.state.topics.get(name)
        if topic is None:
            raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
        current = len(topic.partitions)
        if not isinstance(total, int) or not current < total <= self.config.max_partitions_per_topic:
            raise InvalidPartitionsError(f"topic {name!r} has {current} partitions; cannot grow it to {total!r} "
                                         f"(max_partitions_per_topic={self.config.max_partitions_per_topic})")
        replication_factor = len(topic.partitions[0].replicas)
        brokers = sorted(self.state.brokers)
        replicas = metadata.assign_replicas(brokers, total - current, replication_factor,
                                            first_partition=current, start=len(self.state.topics))
        limits = PartitionLimits.of(self.config)
        self.state.check_partition_limits(name, replicas, limits)
        await self._propose_partitions(metadata.create_partitions(name, replicas, limits),
                                       f"add partitions to {name!r}", limits, deadline)

    async def _propose_partitions(self, command: bytes, what: str, limits: PartitionLimits, deadline: float) -> None:
        """Propose a topic change that passed the partition limits here; the
        state machine checks them again at apply, where a change committed
        meanwhile (another create, on any broker) may have taken the room."""
        try:
            await self.propose(command, what, self._remaining_s(deadline))
        except MetadataCommandError as error:
            if error.error_code != ErrorCode.INVALID_PARTITIONS:
                raise
            raise InvalidPartitionsError(
                f"{what}: refused when committed, past max_partitions_per_topic={limits.per_topic} or "
                f"max_partitions_per_broker={limits.per_broker} (partitions created meanwhile)") from None

    async def alter_configs(self, resource_type: int, name: str, values: dict[str, str], deleted: list[str],
                            replace: bool = False, validate_only: bool = False,
                            timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        """Change a topic's configs, or the dynamic broker configs of resource
        `name` ("" every broker, "<id>" one), through the metadata group, so
        every broker applies the change at the same point of its log."""
        deadline = self._deadline(timeout_s)
        if resource_type == metadata.RESOURCE_TOPIC:
            await self._wait_ready_until(deadline)
            topic = self.state.topics.get(name)
            if topic is None:
                raise UnknownTopicOrPartitionError(f"unknown topic {name!r}")
            current, names = topic.configs, topic_configs.TOPIC_CONFIGS
        elif resource_type == metadata.RESOURCE_BROKER and (name == "" or name.isdigit()):
            current, names = self.state.broker_configs.get(name, {}), topic_configs.DYNAMIC_BROKER_CONFIGS
        else:
            raise RaftkaError(f"config resource type {resource_type} {name!r} cannot be altered")
        updated = {} if replace else {k: v for k, v in current.items() if k not in deleted}
        updated.update(values)
        topic_configs.validate(updated, names)
        if validate_only:
            return
        await self._wait_ready_until(deadline)
        await self.propose(metadata.alter_configs(resource_type, name, values, deleted, replace),
                           f"alter configs of {name!r}", self._remaining_s(deadline))

    def _deadline(self, timeout_s: float) -> float:
        assert timeout_s >= 0, f"timeout_s({timeout_s}) < 0"
        return asyncio.get_running_loop().time() + timeout_s

    def _remaining_s(self, deadline: float) -> float:
        return max(deadline - asyncio.get_running_loop().time(), 0.0)

    async def _wait_ready_until(self, deadline: float) -> None:
        await self.wait_ready(self._remaining_s(deadline))

    async def allocate_producer_id(self) -> int:
        """A producer id unique in the cluster's lifetime. Ids come in blocks
        the metadata assigns to this broker; a restarted broker takes a new
        block, so no id is handed out twice."""
        async with self._producer_id_lock:
            return await self._next_producer_id()

    async def _next_producer_id(self) -> int:
        if self._producer_ids is None or self._producer_ids[0] >= self._producer_ids[1]:
            before = self.state.producer_id_blocks.get(self.node_id)
            await self.propose(metadata.allocate_producer_ids(self.node_id, PRODUCER_ID_BLOCK), "allocate producer ids")
            loop = asyncio.get_running_loop()
            deadline = loop.time() + ADMIN_TIMEOUT_S
            while self.state.producer_id_blocks.get(self.node_id) == before:   # our copy applies it shortly
                if loop.time() > deadline:
                    raise NoControllerError("producer id block not applied here in time")
                await asyncio.sleep(0.01)
            self._producer_ids = list(self.state.producer_id_blocks[self.node_id])
        producer_id = self._producer_ids[0]
        self._producer_ids[0] += 1
        return producer_id

    async def propose(self, command: bytes, what: str, timeout_s: float = ADMIN_TIMEOUT_S) -> None:
        """Commit a metadata command, wherever the metadata leader is, trying
        again until `timeout_s` has passed (no attempt outlasts it); raise
        NoControllerError if it was not committed in time (it may still be),
        MetadataCommandError if the state machine refused it."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            code = await self._propose_once(command, min(FORWARD_TIMEOUT_S, self._remaining_s(deadline)))
            if code is not None:
                break
            if loop.time() >= deadline:
                raise NoControllerError(f"{what}: no metadata leader committed it within {timeout_s:.3g} s")
            await asyncio.sleep(min(PROPOSE_RETRY_INTERVAL_S, self._remaining_s(deadline)))
        if code != ErrorCode.NONE:
            raise MetadataCommandError(code, what)

    async def _propose_once(self, command: bytes, timeout_s: float) -> int | None:
        """The command's error code, or None when it should be retried."""
        leader = self.metadata.leader_id if self.metadata is not None else None
        try:
            if leader is None:
                return None
            if leader == self.node_id:
                return await asyncio.wait_for(self.metadata.propose(command), timeout_s)
            request_id = next(self._forward_ids)
            future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
            self._forwarded[request_id] = (leader, future)
            try:
                self.metadata.transport.send_to(leader, {"type": "rk_propose", "id": request_id, "command": command})
                self.node.mark_active(METADATA_GROUP_ID)
                code = await asyncio.wait_for(future, timeout_s)
            finally:
                self._forwarded.pop(request_id, None)
            return None if code == ErrorCode.NOT_CONTROLLER else code
        except (NotLeaderError, ReplicationError, asyncio.TimeoutError):
            return None

    def _on_forwarded(self, peer_id: int, message: dict) -> None:
        kind, request_id = message.get("type"), message.get("id")
        if not isinstance(request_id, int):
            return
        if kind == "rk_proposed":
            leader, future = self._forwarded.get(request_id, (None, None))
            code = message.get("error")
            # only the broker asked may answer: no peer answers for another
            if leader == peer_id and future is not None and not future.done() and isinstance(code, int):
                future.set_result(code)
        elif kind == "rk_propose" and isinstance(message.get("command"), bytes):
            asyncio.get_running_loop().create_task(self._serve_forwarded(peer_id, request_id, message["command"]))
        elif kind == "rk_elect" and isinstance(message.get("topic"), str) and isinstance(message.get("partition"), int):
            asyncio.get_running_loop().create_task(
                self._serve_election(peer_id, request_id, (message["topic"], message["partition"])))
        elif kind == "rk_elected":
            leader, future = self._forwarded.get(request_id, (None, None))
            code = message.get("error")
            if leader == peer_id and future is not None and not future.done() and isinstance(code, int):
                future.set_result(code)

    async def _serve_forwarded(self, peer_id: int, request_id: int, command: bytes) -> None:
        assert self.metadata is not None
        code = self._refuse_forwarded(peer_id, command)
        if code is None:
            try:
                code = await asyncio.wait_for(self.metadata.propose(command), FORWARD_TIMEOUT_S)
            except (NotLeaderError, ReplicationError, asyncio.TimeoutError):
                code = int(ErrorCode.NOT_CONTROLLER)
        self.metadata.transport.send_to(peer_id, {"type": "rk_proposed", "id": request_id, "error": code})
        self.node.mark_active(METADATA_GROUP_ID)

    # ---- preferred leader election (Kafka's ElectLeaders, type PREFERRED) ----

    async def elect_preferred_leader(self, topic: str, partition: int, timeout_s: float) -> int:
        """Make the partition's preferred replica (its first) its leader, from
        any broker: the leader, asked over the peer network (the metadata
        group's channel: every broker is in it) when that is another broker,
        transfers its leadership (Raft's TimeoutNow). The Kafka error code:
        NONE once the preferred replica leads, ELECTION_NOT_NEEDED when it
        already did, PREFERRED_LEADER_NOT_AVAILABLE when it is not caught up
        (or did not take over), LEADER_NOT_AVAILABLE with no leader known,
        REQUEST_TIMED_OUT when the leader did not answer in time."""
        info = self.state.partition(topic, partition)
        if info is None or not info.replicas:
            return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        leader, _epoch = self.partition_leader(topic, partition)
        if leader == info.replicas[0]:
            return ErrorCode.ELECTION_NOT_NEEDED
        if leader == self.node_id:
            return await self._elect_here((topic, partition), timeout_s)
        if leader < 0 or self.metadata is None:
            return ErrorCode.LEADER_NOT_AVAILABLE
        request_id = next(self._forward_ids)
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._forwarded[request_id] = (leader, future)
        try:
            self.metadata.transport.send_to(leader, {"type": "rk_elect", "id": request_id, "topic": topic,
                                                     "partition": partition})
            self.node.mark_active(METADATA_GROUP_ID)
            return await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            return ErrorCode.REQUEST_TIMED_OUT
        finally:
            self._forwarded.pop(request_id, None)

    async def _serve_election(self, peer_id: int, request_id: int, key: tuple[str, int]) -> None:
        assert self.metadata is not None
        code = await self._elect_here(key, FORWARD_TIMEOUT_S)
        self.metadata.transport.send_to(peer_id, {"type": "rk_elected", "id": request_id, "error": int(code)})
        self.node.mark_active(METADATA_GROUP_ID)

    async def _elect_here(self, key: tuple[str, int], timeout_s: float) -> int:
        """As the partition's leader: transfer to the preferred replica and wait for it to lead."""
        replica, info = self._replicas.get(key), self.state.partition(*key)
        if info is None or not info.replicas:
            return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        if replica is None or not replica.is_leader:
            return ErrorCode.NOT_LEADER_OR_FOLLOWER
        preferred = info.replicas[0]
        if preferred == self.node_id:
            return ErrorCode.ELECTION_NOT_NEEDED
        if not replica.peer_caught_up(preferred):
            return ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE
        self.transfer_leadership(key, preferred)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while replica.leader_id != preferred and loop.time() < deadline:
            if replica.is_leader and replica.transferring_to is None:
                break   # abandoned: it did not take over in an election timeout
            await asyncio.sleep(ELECTION_POLL_INTERVAL_S)
        return ErrorCode.NONE if replica.leader_id == preferred else ErrorCode.PREFERRED_LEADER_NOT_AVAILABLE

    def _refuse_forwarded(self, peer_id: int, command: bytes) -> int | None:
        """Why a command a peer forwarded is not proposed (an error code the
        peer does not retry), None to propose it: a broker speaks only for
        its own id (`peer_id` is the one the peer network authenticated)."""
        try:
            speaker = metadata.speaks_for(command)
        except (CodecError, KeyError, TypeError) as error:
            log.warning("node %d: refused a malformed metadata command forwarded by node %d: %s",
                        self.node_id, peer_id, error)
            return int(ErrorCode.INVALID_REQUEST)
        if speaker is not None and speaker != peer_id:
            log.warning("node %d: refused a metadata command node %d forwarded on behalf of node %d: "
                        "a broker speaks only for itself", self.node_id, peer_id, speaker)
            return int(ErrorCode.CLUSTER_AUTHORIZATION_FAILED)
        return None

    # ---- keeping this broker in line with the metadata ----------------------

    async def _register(self) -> None:
        host, port = self.config.advertised_address
        while True:
            try:
                await self.propose(metadata.register_broker(self.node_id, host, port), "register broker")
                self._registered = True
                return
            except NoControllerError:
                continue
            except RaftkaError:
                log.exception("node %d: registration refused", self.node_id)
                return

    def _metadata_changed(self) -> None:
        if not self._reconcile_scheduled and self._loop is not None:
            self._reconcile_scheduled = True
            self._loop.call_soon(self._reconcile)

    def _reconcile(self) -> None:
        """Start and stop partition groups to match the metadata. Only once the
        metadata caught up with the leader's: a restarted broker replays an
        older prefix first, which lacks topics it already hosts."""
        self._reconcile_scheduled = False
        if self.metadata is None or not self.metadata.isReady():
            return
        self._reconciled_version = self.state.version
        wanted: dict[tuple[str, int], PartitionInfo] = {}
        for topic in self.state.topics.values():
            for partition, info in enumerate(topic.partitions):
                if self.node_id in info.replicas:
                    wanted[(topic.name, partition)] = info
        for key, replica in list(self._replicas.items()):
            info = wanted.get(key)
            if info is None or info.group_id != replica.group_id:
                self._stop_replica(key)
        for record in self.logs.topic_records():
            topic = self.state.topics.get(record.name)
            if topic is None or topic.topic_id != record.topic_id:
                log.info("node %d: removing local data of topic %r (deleted or recreated)", self.node_id, record.name)
                for partition in range(record.partitions):
                    self._stop_replica((record.name, partition))
                self.logs.delete_topic(record.name)
        for key, info in sorted(wanted.items()):
            if key not in self._replicas:
                self._start_replica(key, info)
        self._remove_orphan_group_dirs()
        for (name, _partition), replica in self._replicas.items():
            topic_config = self._topic_config(self.state.topics[name].configs)
            if replica.log.config != topic_config:
                replica.log.reconfigure(topic_config)

    def _topic_config(self, configs: dict[str, str]) -> Config:
        """A topic's settings: this broker's static settings, under the
        dynamic cluster-wide and per-broker ones, under the topic's own."""
        dynamic = self.state.broker_configs
        return topic_configs.effective(self.config, [
            (dynamic.get("", {}), topic_configs.DYNAMIC_BROKER_CONFIGS),
            (dynamic.get(str(self.node_id), {}), topic_configs.DYNAMIC_BROKER_CONFIGS),
            (configs, topic_configs.TOPIC_CONFIGS)])

    def _start_replica(self, key: tuple[str, int], info: PartitionInfo) -> None:
        name, partition = key
        topic = self.state.topics[name]
        local_partitions = self.logs.topics().get(name)
        if local_partitions is None:
            self.logs.create_topic(name, len(topic.partitions), topic.topic_id)
        elif local_partitions < len(topic.partitions):
            self.logs.add_partitions(name, len(topic.partitions))
        replica = PartitionReplica(info.group_id, self.logs.log(name, partition), self.node_id, info.replicas,
                                   self.node.network, self.raft_dir / str(info.group_id), **self.raft_settings)
        self._replicas[key] = replica
        if info.replicas and info.replicas[0] == self.node_id:
            replica.stand_first()   # the preferred leader: usually elected first, nothing to move later
        self.node.add_group(replica)
        if self.on_replica_started is not None:
            self.on_replica_started(key, replica)

    def _stop_replica(self, key: tuple[str, int]) -> None:
        replica = self._replicas.pop(key, None)
        if replica is not None:
            self.node.remove_group(replica.group_id)
            self.node.votes.forget(replica.group_id)
            shutil.rmtree(replica.group_dir, ignore_errors=True)

    def _remove_orphan_group_dirs(self) -> None:
        running = {str(r.group_id) for r in self._replicas.values()}
        if not self.raft_dir.exists():
            return
        for path in self.raft_dir.iterdir():
            if path.name.isdigit() and path.name not in running:
                shutil.rmtree(path, ignore_errors=True)

    async def _duties(self) -> None:
        loop = asyncio.get_running_loop()
        next_report = loop.time()
        while True:
            await asyncio.sleep(DUTY_INTERVAL_S)
            try:
                self.logs.tick()
                if self._reconciled_version != self.state.version:
                    self._reconcile()
                if loop.time() >= next_report:
                    next_report = loop.time() + LEADERSHIP_REPORT_INTERVAL_S
                    self._report_leadership()
                if self.config.auto_leader_rebalance_enable and self.balancer.due(loop.time()) and self.ready:
                    self._balance_leaders(loop.time())
            except Exception:
                log.exception("node %d: periodic duties failed", self.node_id)

    def _report_leadership(self) -> None:
        """Record in the metadata each partition this broker leads whose
        recorded leader, epoch or ISR is out of date."""
        for key, replica in self._replicas.items():
            if key in self._reporting or not replica.is_leader:
                continue
            info = self.state.partition(*key)
            isr = self.in_sync_replicas(replica)
            if info is None or (info.leader, info.leader_epoch, info.isr) == (self.node_id, replica.leader_epoch, isr):
                continue
            self._reporting.add(key)
            command = metadata.record_leader(key[0], key[1], replica.group_id, self.node_id, replica.leader_epoch, isr)
            task = asyncio.get_running_loop().create_task(self._report(command))
            task.add_done_callback(lambda _t, key=key: self._reporting.discard(key))

    def _balance_leaders(self, now: float) -> None:
        """Hand partitions this broker leads to their preferred replicas where
        the LeaderBalancer says so (auto.leader.rebalance.enable)."""
        led = []
        for key, replica in self._replicas.items():
            info = self.state.partition(*key)
            if replica.is_leader and info is not None and info.replicas:
                preferred = info.replicas[0]
                led.append(LedPartition(key, preferred, replica.leader_epoch, replica.peer_caught_up(preferred)))
        for key, target in self.balancer.transfers(now, led, self.leader_imbalance()):
            log.info("node %d: %s-%d: moving leadership to its preferred replica %d", self.node_id, *key, target)
            try:
                self.transfer_leadership(key, target)
            except (NotLeaderError, ValueError) as error:
                log.info("node %d: %s-%d: no transfer: %s", self.node_id, *key, error)

    def transfer_leadership(self, key: tuple[str, int], target: int) -> None:
        """Start a leadership transfer of a partition this broker leads (Raft's
        TimeoutNow); NotLeaderError if it does not lead it (any more)."""
        replica = self._replicas.get(key)
        if replica is None:
            raise NotLeaderError(-1, None)
        replica.transfer_leadership(target)
        self.node.mark_active(replica.group_id)

    def leader_imbalance(self) -> dict[int, float]:
        """Preferred broker -> the share of its preferred partitions it does not
        lead, every topic, from the metadata (and our own replicas, fresher)."""
        partitions = []
        for topic in self.state.topics.values():
            for index, info in enumerate(topic.partitions):
                replica = self._replicas.get((topic.name, index))
                leader = self.node_id if replica is not None and replica.is_leader else info.leader
                partitions.append((leader, info.replicas))
        return preferred_imbalance(partitions)

    async def _report(self, command: bytes) -> None:
        try:
            await self.propose(command, "record leader", timeout_s=FORWARD_TIMEOUT_S)
        except RaftkaError as error:
            log.debug("node %d: leader report not recorded: %s", self.node_id, error)

    def status(self) -> dict[str, Any]:
        """What this broker knows, for tests and the control port."""
        return {
            "node": self.node_id, "controller": self.controller_id, "ready": self.ready,
            "brokers": sorted(self.state.brokers),
            "topics": {t.name: [{"group": p.group_id, "replicas": p.replicas, "leader": p.leader,
                                 "epoch": p.leader_epoch, "isr": p.isr} for p in t.partitions]
                       for t in self.state.topics.values()},
        }

