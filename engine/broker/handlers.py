"""What the broker answers to each Kafka API, over a ClusterController.

Every handler takes a decoded Request and returns the response frame (bytes,
or a list of buffers for Fetch), or None when the client expects no answer
(Produce with acks=0). Errors are Kafka error codes in the response, per
topic or partition as the protocol places them; nothing here raises for bad
input.
"""
from __future__ import annotations

import asyncio
import logging
import time
import uuid
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Awaitable, Callable, NamedTuple

from raftka.broker.group_apis import GroupHandlers
from raftka.broker.group_service import GroupService
from raftka.broker.metrics import BrokerMetrics
from raftka.cluster import topic_configs
from raftka.cluster.controller import ADMIN_TIMEOUT_S, ClusterController
from raftka.cluster.metadata import RESOURCE_BROKER, RESOURCE_TOPIC
from raftka.records.batch import decode_batch, iter_batches
from raftka.config import BROKER_CONFIGS, OFFSETS_TOPIC, TOPIC_CONFIGS, Config, config_text
from raftka.errors import ErrorCode, OffsetOutOfRangeError, RaftkaError
from raftka.protocol import kafka
from raftka.storage.log_manager import validate_topic_name
from raftka.protocol.kafka import FetchPartition, Request, build, nested, response_schema
from raftka.replication import PartitionReplica
from raftka.security import state as acl
from raftka.security.batch_rules import check_client_batches

if TYPE_CHECKING:
    from raftka.broker.security_apis import Security

log = logging.getLogger(__name__)

LATEST, EARLIEST, MAX_TIMESTAMP = -1, -2, -3   # ListOffsets' special timestamps
PREFERRED_ELECTION = 0                           # ElectLeaders' election type 0; 1 is unclean
HIGH_WATERMARK = -1                              # DeleteRecords' "everything committed"
MAX_TIMESTAMP_READ_BYTES = 4 << 20
ENDPOINT_TYPE_BROKERS = 1                        # DescribeCluster v1
ZERO_UUID = uuid.UUID(int=0)                     # Kafka's "no topic id"
# DescribeConfigs config_source
SOURCE_TOPIC, SOURCE_DYNAMIC_BROKER, SOURCE_DYNAMIC_DEFAULT_BROKER, SOURCE_STATIC_BROKER, SOURCE_DEFAULT = 1, 2, 3, 4, 5
DEFAULT_CONFIG = Config()      # Kafka's defaults, as Config holds them
AUTO_CREATE_TIMEOUT_S = 10.0

Response = bytes | list[Any] | None


class CommitWaiters:
    """Fetches waiting for new data on some partitions, woken by commits."""

    def __init__(self) -> None:
        self._waiting: dict[tuple[str, int], set[asyncio.Future[None]]] = {}

    def wake(self, key: tuple[str, int]) -> None:
        for future in self._waiting.pop(key, ()):
            if not future.done():
                future.set_result(None)

    async def wait(self, keys: list[tuple[str, int]], timeout_s: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for key in keys:
            self._waiting.setdefault(key, set()).add(future)
        try:
            await asyncio.wait_for(future, timeout_s)
        except asyncio.TimeoutError:
            pass
        finally:
            for key in keys:
                waiting = self._waiting.get(key)
                if waiting is not None:
                    waiting.discard(future)
                    if not waiting:
                        del self._waiting[key]


class Handlers:
    """One per broker; `handle(request)` answers any API in kafka.ADVERTISED."""

    def __init__(self, controller: ClusterController, groups: GroupService) -> None:
        self.controller = controller
        self.groups = groups
        self.waiters = CommitWaiters()
        self.metrics: BrokerMetrics | None = None    # set by the broker when metrics are on
        self.storage_failure: str | None = None      # set by the broker when its storage failed
        self.security: Security | None = None        # set by the broker: authorization (ACLs) when SASL is on
        self.group_handlers = GroupHandlers(groups)
        self._table: dict[int, Callable[[Request], Awaitable[Response]]] = {
            kafka.API_VERSIONS: self.api_versions, kafka.METADATA: self.metadata,
            kafka.PRODUCE: self.produce, kafka.FETCH: self.fetch, kafka.LIST_OFFSETS: self.list_offsets,
            kafka.CREATE_TOPICS: self.create_topics, kafka.DELETE_TOPICS: self.delete_topics,
            kafka.DELETE_RECORDS: self.delete_records, kafka.OFFSET_FOR_LEADER_EPOCH: self.offset_for_leader_epoch,
            kafka.INIT_PRODUCER_ID: self.init_producer_id, kafka.CREATE_PARTITIONS: self.create_partitions,
            kafka.DESCRIBE_CONFIGS: self.describe_configs, kafka.DESCRIBE_CLUSTER: self.describe_cluster,
            kafka.ALTER_CONFIGS: self.alter_configs, kafka.INCREMENTAL_ALTER_CONFIGS: self.incremental_alter_configs,
            kafka.ELECT_LEADERS: self.elect_leaders,
            **self.group_handlers.table(),
        }

    def secure(self, security: "Security") -> None:
        """Check every request against `security`'s ACLs (when SASL is on)."""
        self.security = self.group_handlers.security = security

    def _may(self, request: Request, operation: int, resource_type: int, name: str) -> bool:
        return self.security is None or self.security.allowed(request, operation, resource_type, name)

    def _may_create(self, request: Request, topic: str) -> bool:
        return self._may(request, acl.OP_CREATE, acl.RESOURCE_CLUSTER, acl.CLUSTER_NAME) \
            or self._may(request, acl.OP_CREATE, acl.RESOURCE_TOPIC, topic)

    def add_apis(self, table: dict[int, Callable[[Request], Awaitable[Response]]]) -> None:
        """Serve more APIs (the security ones, from engine/broker/security_apis.py)."""
        self._table.update(table)

    @property
    def config(self) -> Config:
        return self.controller.config   # the broker may update it (the bound port) after construction

    def replica_started(self, key: tuple[str, int], replica: PartitionReplica) -> None:
        replica.on_high_watermark = lambda: self.waiters.wake(key)
        if key[0] == OFFSETS_TOPIC:
            self.groups.replica_started(key[1], replica)

    async def handle(self, request: Request) -> Response:
        if self.metrics is None:
            return await self._table[request.api_key](request)
        started = time.perf_counter()
        try:
            return await self._table[request.api_key](request)
        finally:
            api = self.metrics.api(request.api_key)
            self.metrics.requests.labels(api).inc()
            self.metrics.request_seconds.labels(api).observe(time.perf_counter() - started)

    # ---- ApiVersions, Metadata ---------------------------------------------

    async def api_versions(self, request: Request) -> Response:
        body = kafka.api_versions_body(response_schema(request))
        return kafka.encode_response(request.correlation_id, body)

    async def metadata(self, request: Request) -> Response:
        """Brokers, controller and topics; v7+ with each partition's leader
        epoch (its Raft term), v10+ with topic ids (fixed at creation)."""
        schema = response_schema(request)
        state = self.controller.state
        requested = request.body.topics
        unknown_ids: list[uuid.UUID] = []
        if requested is None or (request.api_version == 0 and not requested):
            names = sorted(state.topics)
        else:
            names, unknown_ids = self._requested_topic_names(requested)
        denied = {n for n in names if not self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, n)}
        if requested is None or not requested:
            names = [n for n in names if n not in denied]    # topics you may not describe are not listed
        allow_create = self.config.auto_create_topics and getattr(request.body, "allow_auto_topic_creation", True)
        creating = set()
        if allow_create:
            creating = await self._auto_create([n for n in names if n not in state.topics and n not in denied
                                                and self._may_create(request, n)])
        broker_cls, topic_cls = nested(schema, "MetadataResponseBroker"), nested(schema, "MetadataResponseTopic")
        listed = self._listed_brokers()
        brokers = tuple(build(broker_cls, node_id=node_id, host=host, port=port, rack=rack)
                        for node_id, (host, port, rack) in sorted(listed.items()))
        topics = []
        for name in names:
            topic = state.topics.get(name)
            if name in denied:
                topics.append(build(topic_cls, error_code=ErrorCode.TOPIC_AUTHORIZATION_FAILED, name=name,
                                    topic_id=ZERO_UUID, is_internal=False, partitions=()))
                continue
            if topic is None:
                code = ErrorCode.LEADER_NOT_AVAILABLE if name in creating else self._unknown_topic_code(name)
                topics.append(build(topic_cls, error_code=code, name=name, topic_id=ZERO_UUID, is_internal=False,
                                    partitions=()))
                continue
            topics.append(build(topic_cls, error_code=ErrorCode.NONE, name=name, topic_id=uuid.UUID(bytes=topic.topic_id),
                                is_internal=name == OFFSETS_TOPIC,
                                partitions=self._metadata_partitions(nested(schema, "MetadataResponsePartition"), topic)))
        topics += [build(topic_cls, error_code=ErrorCode.UNKNOWN_TOPIC_ID, name=None, topic_id=topic_id,
                         is_internal=False, partitions=()) for topic_id in unknown_ids]
        return kafka.encode_response(request.correlation_id, build(
            schema, throttle_time=0, brokers=brokers, cluster_id=self.config.cluster_id,
            controller_id=self._controller_for_clients(listed), topics=tuple(topics)))

    def _requested_topic_names(self, requested: Any) -> tuple[list[str], list[uuid.UUID]]:
        """(names, unknown topic ids) of a Metadata request's topics, which
        v10+ may name by id instead."""
        by_id = {uuid.UUID(bytes=t.topic_id): t.name for t in self.controller.state.topics.values()}
        names, unknown_ids = [], []
        for wanted in requested:
            name = wanted.name
            topic_id = getattr(wanted, "topic_id", None)
            if name is None and topic_id is not None:
                name = by_id.get(topic_id)
                if name is None:
                    unknown_ids.append(topic_id)
                    continue
            if name is not None:
                names.append(name)
        return names, unknown_ids

    def _metadata_partitions(self, partition_cls: type, topic: Any) -> tuple[Any, ...]:
        partitions = []
        for index, info in enumerate(topic.partitions):
            leader, epoch = self.controller.partition_leader(topic.name, index)
            isr = tuple(info.isr) if info.isr else ((leader,) if leader >= 0 else ())
            partitions.append(build(
                partition_cls, error_code=ErrorCode.NONE if leader >= 0 else ErrorCode.LEADER_NOT_AVAILABLE,
                partition_index=index, leader_id=leader, leader_epoch=epoch if leader >= 0 else -1,
                replica_nodes=tuple(info.replicas), isr_nodes=isr, offline_replicas=()))
        return tuple(partitions)

    async def describe_cluster(self, request: Request) -> Response:
        """The brokers and controller (as Metadata names them); only the
        broker endpoints (endpoint type 1) are served."""
        schema = response_schema(request)
        listed = self._listed_brokers()
        if getattr(request.body, "endpoint_type", ENDPOINT_TYPE_BROKERS) != ENDPOINT_TYPE_BROKERS:
            return kafka.answer(request, error_code=ErrorCode.UNSUPPORTED_ENDPOINT_TYPE,
                                error_message="only broker endpoints (type 1) are served", cluster_id=self.config.cluster_id,
                                brokers=())
        broker_cls = nested(schema, "DescribeClusterBroker")
        brokers = tuple(build(broker_cls, broker_id=node_id, host=host, port=port, rack=rack)
                        for node_id, (host, port, rack) in sorted(listed.items()))
        return kafka.answer(request, error_code=ErrorCode.NONE, error_message=None, cluster_id=self.config.cluster_id,
                            controller_id=self._controller_for_clients(listed), brokers=brokers)

    def _listed_brokers(self) -> dict[int, tuple[str, int, str | None]]:
        """node id -> (host, port, rack) of the registered brokers, and of this
        one before its registration is committed: it answers, so it is listed.
        A broker out of service (its storage failed) leaves itself out, so
        clients drop their connection to it and ask the others (its own view of
        leaders is stale: it reports them unknown)."""
        listed = {b.node_id: (b.host, b.port, b.rack) for b in self.controller.state.brokers.values()}
        if self.storage_failure is not None:
            listed.pop(self.controller.node_id, None)
        else:
            listed.setdefault(self.controller.node_id, (*self.config.advertised_address, None))
        return listed

    def _controller_for_clients(self, listed: dict[int, Any]) -> int:
        """Metadata's controller_id: the metadata leader once it is elected and
        listed, otherwise this broker, as a KRaft broker names any live broker:
        admin requests are forwarded to the leader, or answered NOT_CONTROLLER
        while there is none. Never -1: librdkafka then waits for a controller
        without asking again, and its admin requests time out unsent."""
        leader = self.controller.controller_id
        return leader if leader in listed else self.controller.node_id

    def _unknown_topic_code(self, name: str) -> int:
        try:
            validate_topic_name(name)
        except RaftkaError as error:
            return error.error_code
        return ErrorCode.UNKNOWN_TOPIC_OR_PARTITION

    async def _auto_create(self, names: list[str]) -> set[str]:
        """Create unknown topics with the defaults; the names now being created.
        Until the broker is ready none is created and valid names are reported
        as being created (LEADER_NOT_AVAILABLE), so clients ask again."""
        if not self.controller.ready:
            return {name for name in names if self._unknown_topic_code(name) == ErrorCode.UNKNOWN_TOPIC_OR_PARTITION}
        created = set()
        for name in names:
            try:
                await asyncio.wait_for(self.controller.create_topic(name), AUTO_CREATE_TIMEOUT_S)
                created.add(name)
            except RaftkaError as error:
                if error.error_code == ErrorCode.TOPIC_ALREADY_EXISTS:
                    created.add(name)
                elif error.error_code != ErrorCode.INVALID_TOPIC_EXCEPTION:
                    log.warning("auto-creating topic %r failed: %s", name, error)
            except asyncio.TimeoutError:
                log.warning("auto-creating topic %r timed out", name)
        return created

    # ---- Produce ---------------------------------------------------------------

    def _leader_replica(self, topic: str, partition: int) -> tuple[PartitionReplica | None, int]:
        """This broker's replica if it leads the partition, else the error code to answer."""
        if self.controller.state.partition(topic, partition) is None:
            return None, ErrorCode.UNKNOWN_TOPIC_OR_PARTITION
        replica = self.controller.replica(topic, partition)
        if replica is None or not replica.is_leader:
            return None, ErrorCode.NOT_LEADER_OR_FOLLOWER
        return replica, ErrorCode.NONE

    async def produce(self, request: Request) -> Response:
        body = request.body
        timeout_s = max(body.timeout.total_seconds(), 0.001)
        jobs: list[tuple[str, int, Awaitable[tuple[int, int, int]]]] = []
        for topic in body.topic_data:
            for data in topic.partition_data:
                job = self._append(topic.name, data.index, data.records, body.acks, timeout_s) \
                    if self._may(request, acl.OP_WRITE, acl.RESOURCE_TOPIC, topic.name) \
                    else _answered(ErrorCode.TOPIC_AUTHORIZATION_FAILED)
                jobs.append((topic.name, data.index, job))
        results = await asyncio.gather(*(job for _, _, job in jobs))
        if body.acks == 0:
            return None
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "TopicProduceResponse"), nested(schema, "PartitionProduceResponse")
        by_topic: dict[str, list[Any]] = {}
        for (name, index, _), (code, base_offset, log_start_offset) in zip(jobs, results):
            by_topic.setdefault(name, []).append(build(
                partition_cls, index=index, error_code=code, base_offset=base_offset, log_append_time=None,
                log_start_offset=log_start_offset, record_errors=(), error_message=None))
        return kafka.encode_response(request.correlation_id, build(
            schema, throttle_time=0, responses=tuple(build(topic_cls, name=n, partition_responses=tuple(p))
                                                     for n, p in by_topic.items())))

    async def _append(self, topic: str, partition: int, records: bytes | None, acks: int,
                      timeout_s: float) -> tuple[int, int, int]:
        """(error code, base offset, log start offset) of one partition's part of a produce."""
        if self.storage_failure is not None:
            return ErrorCode.KAFKA_STORAGE_ERROR, -1, -1
        if topic == OFFSETS_TOPIC:
            return ErrorCode.INVALID_TOPIC_EXCEPTION, -1, -1    # internal: written by the group coordinators only
        replica, code = self._leader_replica(topic, partition)
        if replica is None:
            return code, -1, -1
        min_insync = replica.log.config.min_insync_replicas
        # Kafka's check before the append; acks 0/1 skip it, and with 1 the leader alone is enough
        if acks == -1 and min_insync > 1 and len(self.controller.in_sync_replicas(replica)) < min_insync:
            return ErrorCode.NOT_ENOUGH_REPLICAS, -1, -1
        if not records:
            return ErrorCode.CORRUPT_MESSAGE, -1, -1
        try:
            replica.log.validate(records)
            check_client_batches(records, replica.log.config, int(time.time() * 1000))
            started = time.perf_counter()
            base_offset = await replica.replicate(records, timeout_s)
            if self.metrics is not None:
                self._count_produced(topic, records, time.perf_counter() - started)
        except RaftkaError as error:
            return error.error_code, -1, -1
        return ErrorCode.NONE, base_offset, replica.log.log_start_offset

    def _count_produced(self, topic: str, records: bytes, commit_s: float) -> None:
        assert self.metrics is not None
        self.metrics.commit_seconds.observe(commit_s)
        self.metrics.bytes_in.labels(topic).inc(len(records))
        self.metrics.records_in.labels(topic).inc(sum(h.record_count for h, _ in iter_batches(records)))

    # ---- Fetch, ListOffsets -------------------------------------------------------

    async def fetch(self, request: Request) -> Response:
        """Fetch without sessions (KIP-227): a full fetch every time, answered
        with session id 0, which tells a client asking for a session that
        none was created; a session id or epoch of a session is refused."""
        body = request.body
        session_error = _fetch_session_error(getattr(body, "session_id", 0), getattr(body, "session_epoch", -1))
        if session_error != ErrorCode.NONE:
            return kafka.fetch_response(request.correlation_id, request.api_version, [], session_error)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(body.max_wait.total_seconds(), 0.0)
        denied = {t.topic for t in body.topics if not self._may(request, acl.OP_READ, acl.RESOURCE_TOPIC, t.topic)}
        while True:
            topics, total, errors, served = self._read_fetch(body, denied)
            remaining = deadline - loop.time()
            if total >= body.min_bytes or errors or remaining <= 0:
                if self.metrics is not None:
                    for topic, size, count in served:
                        self.metrics.bytes_out.labels(topic).inc(size)
                        self.metrics.records_out.labels(topic).inc(count)
                return kafka.fetch_response(request.correlation_id, request.api_version, topics)
            keys = [(t.topic, p.partition) for t in body.topics for p in t.partitions]
            await self.waiters.wait(keys, remaining)

    def _read_fetch(self, body: Any, denied: set[str]) -> tuple[list[tuple[str, list[FetchPartition]]], int, bool,
                                              list[tuple[str, int, int]]]:
        """(topics, bytes, any error, (topic, bytes, records) served per partition)."""
        cap = self.config.fetch_max_bytes    # the broker's bound, whatever the client asks
        budget = min(body.max_bytes, cap)
        total, errors = 0, False
        topics, served = [], []
        for topic in body.topics:
            partitions = []
            for wanted in topic.partitions:
                replica, code = self._leader_replica(topic.topic, wanted.partition)
                if replica is not None:
                    code = _leader_epoch_error(getattr(wanted, "current_leader_epoch", -1), replica.leader_epoch)
                if topic.topic in denied:
                    replica, code = None, ErrorCode.TOPIC_AUTHORIZATION_FAILED
                high_watermark, log_start_offset, records = -1, -1, b""
                if replica is not None and code == ErrorCode.NONE:
                    log_ = replica.log
                    high_watermark, log_start_offset = log_.high_watermark, log_.log_start_offset
                    limit = min(wanted.partition_max_bytes, budget if total else cap)
                    try:
                        if limit > 0:
                            chunk = log_.read(wanted.fetch_offset, limit, for_consumer=True)
                            records = chunk.buffer
                            served.append((topic.topic, len(records), chunk.next_offset - wanted.fetch_offset))
                    except OffsetOutOfRangeError:
                        code = ErrorCode.OFFSET_OUT_OF_RANGE
                total += len(records)
                budget -= len(records)
                errors |= code != ErrorCode.NONE
                partitions.append(FetchPartition(wanted.partition, code, high_watermark, log_start_offset, records))
            topics.append((topic.topic, partitions))
        return topics, total, errors, served

    async def list_offsets(self, request: Request) -> Response:
        """Kafka's answers: earliest (-2) the log start offset, latest (-1) the
        high watermark, max timestamp (-3, v7+) the record with the largest
        timestamp, a timestamp the first record at or after it, with that
        record's own timestamp, or offset -1 and timestamp -1 when none is."""
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "ListOffsetsTopicResponse"), nested(schema, "ListOffsetsPartitionResponse")
        topics = []
        for topic in request.body.topics:
            partitions = []
            for wanted in topic.partitions:
                replica, code = self._leader_replica(topic.name, wanted.partition_index)
                if replica is not None:
                    code = _leader_epoch_error(getattr(wanted, "current_leader_epoch", -1), replica.leader_epoch)
                if not self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, topic.name):
                    replica, code = None, ErrorCode.TOPIC_AUTHORIZATION_FAILED
                found = ListedOffset(-1, -1, -1)
                if replica is not None and code == ErrorCode.NONE:
                    try:
                        found = _list_offset(replica, wanted.timestamp)
                    except RaftkaError as error:   # a stored batch that does not decode (within its cap)
                        code = error.error_code
                partitions.append(build(partition_cls, partition_index=wanted.partition_index, error_code=code,
                                        timestamp=found.timestamp, offset=found.offset, leader_epoch=found.leader_epoch))
            topics.append(build(topic_cls, name=topic.name, partitions=tuple(partitions)))
        return kafka.answer(request, topics=tuple(topics))

    # ---- DeleteRecords ---------------------------------------------------------

    async def delete_records(self, request: Request) -> Response:
        """Kafka's DeleteRecords: each partition's leader moves its log start
        offset up to the offset asked for (-1: the high watermark) through
        Raft, so every replica deletes alike, and answers with the new log
        start (the low watermark) once that is committed and applied here."""
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "DeleteRecordsTopicResult"), nested(schema, "DeleteRecordsPartitionResult")
        deadline = _admin_deadline(request.body.timeout)
        jobs = [(topic.name, wanted.partition_index,
                 self._delete_records(request, topic.name, wanted.partition_index, wanted.offset, _remaining_s(deadline)))
                for topic in request.body.topics for wanted in topic.partitions]
        results = await asyncio.gather(*(job for _, _, job in jobs))
        by_topic: dict[str, list[Any]] = {}
        for (name, index, _), (code, low_watermark) in zip(jobs, results):
            by_topic.setdefault(name, []).append(build(partition_cls, partition_index=index, error_code=code,
                                                       low_watermark=low_watermark))
        return kafka.answer(request, topics=tuple(build(topic_cls, name=n, partitions=tuple(p))
                                                  for n, p in by_topic.items()))

    async def _delete_records(self, request: Request, topic: str, partition: int, offset: int,
                              timeout_s: float) -> tuple[int, int]:
        """(error code, low watermark) of one partition's part of a DeleteRecords:
        DELETE on the topic needed; the internal topic refused, as Kafka does."""
        if not self._may(request, acl.OP_DELETE, acl.RESOURCE_TOPIC, topic):
            return ErrorCode.TOPIC_AUTHORIZATION_FAILED, -1
        if self.storage_failure is not None:
            return ErrorCode.KAFKA_STORAGE_ERROR, -1
        if topic == OFFSETS_TOPIC:
            return ErrorCode.INVALID_TOPIC_EXCEPTION, -1
        replica, code = self._leader_replica(topic, partition)
        if replica is None:
            return code, -1
        try:
            offset = replica.log.high_watermark if offset == HIGH_WATERMARK else offset
            return ErrorCode.NONE, await replica.delete_records(offset, timeout_s)
        except RaftkaError as error:
            return error.error_code, -1

    # ---- ElectLeaders ------------------------------------------------------------

    async def elect_leaders(self, request: Request) -> Response:
        """Kafka's ElectLeaders, type PREFERRED (the only one a Raft log has: an
        unclean election could lose committed entries): each partition asked,
        or every partition when the list is null, moves to its preferred
        replica (ClusterController.elect_preferred_leader). ALTER on the
        cluster is needed. A null list answers only the partitions that needed
        an election, as Kafka does."""
        body = request.body
        schema = response_schema(request)
        result_cls, partition_cls = nested(schema, "ReplicaElectionResult"), nested(schema, "PartitionResult")
        deadline = _admin_deadline(body.timeout)
        everything = body.topic_partitions is None
        if everything:
            wanted = [(t.name, p) for t in self.controller.state.topics.values() for p in range(len(t.partitions))]
        else:
            wanted = [(t.topic, int(p)) for t in body.topic_partitions for p in t.partitions]
        codes = await asyncio.gather(*(self._elect_leader(request, topic, partition, getattr(body, "election_type", 0),
                                                          _remaining_s(deadline)) for topic, partition in wanted))
        by_topic: dict[str, list[Any]] = {}
        for (topic, partition), code in zip(wanted, codes):
            if everything and code == ErrorCode.ELECTION_NOT_NEEDED:
                continue
            message = None if code == ErrorCode.NONE else ErrorCode(code).name
            by_topic.setdefault(topic, []).append(build(partition_cls, partition_id=partition, error_code=code,
                                                        error_message=message))
        return kafka.answer(request, error_code=ErrorCode.NONE, replica_election_results=tuple(
            build(result_cls, topic=topic, partition_result=tuple(results)) for topic, results in by_topic.items()))

    async def _elect_leader(self, request: Request, topic: str, partition: int, election_type: int,
                            timeout_s: float) -> int:
        if not self._may(request, acl.OP_ALTER, acl.RESOURCE_CLUSTER, acl.CLUSTER_NAME):
            return ErrorCode.CLUSTER_AUTHORIZATION_FAILED
        if election_type != PREFERRED_ELECTION:
            return ErrorCode.INVALID_REQUEST   # unclean: never, a Raft leader always holds every committed entry
        return await self.controller.elect_preferred_leader(topic, partition, timeout_s)

    # ---- OffsetForLeaderEpoch ------------------------------------------------

    async def offset_for_leader_epoch(self, request: Request) -> Response:
        """KIP-320: a consumer whose partition changed leader asks where the
        leader epoch (Raft term) of the records it last read ends on the new
        leader; a position past that end was truncated away. The leader
        answers from its log (fenced by the client's current leader epoch)."""
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "OffsetForLeaderTopicResult"), nested(schema, "EpochEndOffset")
        topics = []
        for topic in request.body.topics:
            allowed = self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, topic.topic)
            partitions = []
            for wanted in topic.partitions:
                code, epoch, end_offset = self._epoch_end_offset(topic.topic, wanted, allowed)
                partitions.append(build(partition_cls, error_code=code, partition=wanted.partition,
                                        leader_epoch=epoch, end_offset=end_offset))
            topics.append(build(topic_cls, topic=topic.topic, partitions=tuple(partitions)))
        return kafka.answer(request, topics=tuple(topics))

    def _epoch_end_offset(self, topic: str, wanted: Any, allowed: bool) -> tuple[int, int, int]:
        """(error code, epoch, end offset) of one partition: the leader's
        current epoch ends at its log end offset, an unknown one (-1, or newer
        than the leader's) is answered -1 / -1, as Kafka does."""
        if not allowed:
            return ErrorCode.TOPIC_AUTHORIZATION_FAILED, -1, -1
        replica, code = self._leader_replica(topic, wanted.partition)
        if replica is None:
            return code, -1, -1
        code = _leader_epoch_error(wanted.current_leader_epoch, replica.leader_epoch)
        if code != ErrorCode.NONE:
            return code, -1, -1
        requested, log_ = wanted.leader_epoch, replica.log
        if requested < 0 or requested > replica.leader_epoch:
            return ErrorCode.NONE, -1, -1
        if requested == replica.leader_epoch:
            return ErrorCode.NONE, requested, log_.log_end_offset
        return (ErrorCode.NONE, *log_.end_offset_for_epoch(requested))

    # ---- InitProducerId ------------------------------------------------------

    async def init_producer_id(self, request: Request) -> Response:
        """Idempotent producers get a cluster-unique id, epoch 0 (transactions
        are not supported)."""
        if request.body.transactional_id is not None:
            log.warning("InitProducerId for transactional id %r refused: transactions are not supported",
                        request.body.transactional_id)
            return kafka.answer(request, error_code=ErrorCode.INVALID_REQUEST,
                                producer_id=-1, producer_epoch=-1)
        code, producer_id = ErrorCode.NONE, -1
        if self.security is not None and not self.security.may_write_idempotently(request):
            return kafka.answer(request, error_code=ErrorCode.CLUSTER_AUTHORIZATION_FAILED,
                                producer_id=-1, producer_epoch=-1)
        try:
            producer_id = await self.controller.allocate_producer_id()
        except RaftkaError as error:
            code = error.error_code
        return kafka.answer(request, error_code=code, producer_id=producer_id,
                            producer_epoch=0 if producer_id >= 0 else -1)

    # ---- CreateTopics, DeleteTopics ---------------------------------------------

    # Topics are created, deleted or grown one after another (placement reads
    # the topic count) within one deadline: the request's timeout, capped at
    # the controller's ADMIN_TIMEOUT_S. What is not done by then is answered
    # NOT_CONTROLLER, which clients retry.

    async def create_topics(self, request: Request) -> Response:
        result_cls = nested(response_schema(request), "CreatableTopicResult")
        deadline = _admin_deadline(request.body.timeout)
        over_limit = self._past_request_partition_limit(
            sum(self.config.default_partitions if t.num_partitions == -1 else max(t.num_partitions, 0)
                for t in request.body.topics))
        results = []
        for topic in request.body.topics:
            if topic.assignments:
                code, message = ErrorCode.INVALID_REQUEST, "manual replica assignment is not supported"
            elif over_limit:
                code, message = ErrorCode.INVALID_PARTITIONS, over_limit
            elif not self._may_create(request, topic.name):
                code, message = ErrorCode.TOPIC_AUTHORIZATION_FAILED, None
            elif request.body.validate_only:
                code, message = await _outcome(_validate_topic_name(topic.name))
            else:
                configs = {c.name: c.value for c in topic.configs}
                code, message = await _outcome(self.controller.create_topic(
                    topic.name, topic.num_partitions, topic.replication_factor, configs, _remaining_s(deadline)))
            results.append(build(result_cls, name=topic.name, error_code=code, error_message=message))
        return kafka.answer(request, topics=tuple(results))

    def _past_request_partition_limit(self, partitions: int) -> str | None:
        """Why a CreateTopics or CreatePartitions adding `partitions` in all is
        refused as a whole, None when it is within max_partitions_per_request."""
        limit = self.config.max_partitions_per_request
        if partitions <= limit:
            return None
        return f"the request adds {partitions} partitions in all, more than max_partitions_per_request={limit}"

    async def delete_topics(self, request: Request) -> Response:
        result_cls = nested(response_schema(request), "DeletableTopicResult")
        deadline = _admin_deadline(request.body.timeout)
        results = []
        for name in request.body.topic_names:
            if not self._may(request, acl.OP_DELETE, acl.RESOURCE_TOPIC, name):
                results.append(build(result_cls, name=name, error_code=ErrorCode.TOPIC_AUTHORIZATION_FAILED))
                continue
            code, _message = await _outcome(self.controller.delete_topic(name, _remaining_s(deadline)))
            results.append(build(result_cls, name=name, error_code=code))
        return kafka.answer(request, responses=tuple(results))

    async def create_partitions(self, request: Request) -> Response:
        result_cls = nested(response_schema(request), "CreatePartitionsTopicResult")
        deadline = _admin_deadline(request.body.timeout)
        topics = self.controller.state.topics
        over_limit = self._past_request_partition_limit(
            sum(max(t.count - len(topics[t.name].partitions), 0) for t in request.body.topics if t.name in topics))
        results = []
        for topic in request.body.topics:
            if topic.assignments is not None:
                code, message = ErrorCode.INVALID_REQUEST, "manual replica assignment is not supported"
            elif over_limit:
                code, message = ErrorCode.INVALID_PARTITIONS, over_limit
            elif topic.name == OFFSETS_TOPIC:
                code, message = ErrorCode.INVALID_TOPIC_EXCEPTION, f"{OFFSETS_TOPIC} is internal"
            elif not self._may(request, acl.OP_ALTER, acl.RESOURCE_TOPIC, topic.name):
                code, message = ErrorCode.TOPIC_AUTHORIZATION_FAILED, None
            elif request.body.validate_only:
                code, message = ErrorCode.NONE, None
                current = self.controller.state.topics.get(topic.name)
                if current is None:
                    code, message = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {topic.name!r}"
                elif topic.count <= len(current.partitions):
                    code, message = ErrorCode.INVALID_PARTITIONS, f"{topic.name!r} already has {len(current.partitions)}"
            else:
                code, message = await _outcome(self.controller.create_partitions(topic.name, topic.count,
                                                                                 _remaining_s(deadline)))
            results.append(build(result_cls, name=topic.name, error_code=code, error_message=message))
        return kafka.answer(request, results=tuple(results))

    async def describe_configs(self, request: Request) -> Response:
        """Every topic config Raftka takes, with where its value comes from
        (the topic, a dynamic broker config, the static one, Kafka's default)
        and, when asked, its synonyms in precedence order; this broker's
        settings under Kafka's names (resource "<node id>"), or the dynamic
        cluster-wide ones (resource "")."""
        schema = response_schema(request)
        result_cls, entry_cls = nested(schema, "DescribeConfigsResult"), nested(schema, "DescribeConfigsResourceResult")
        synonym_cls = nested(schema, "DescribeConfigsSynonym")
        with_synonyms = getattr(request.body, "include_synonyms", False)
        results = []
        for resource in request.body.resources:
            code, message, entries = ErrorCode.NONE, None, []
            if not self._may_configs(request, acl.OP_DESCRIBE_CONFIGS, resource):
                code, message = _config_refusal(resource), None
            elif resource.resource_type == RESOURCE_TOPIC:
                topic = self.controller.state.topics.get(resource.resource_name)
                if topic is None:
                    code, message = ErrorCode.UNKNOWN_TOPIC_OR_PARTITION, f"unknown topic {resource.resource_name!r}"
                else:
                    entries = [(name, self._topic_config_layers(name, field, topic.configs), False)
                               for name, field in TOPIC_CONFIGS.items()]
            elif resource.resource_type == RESOURCE_BROKER and resource.resource_name in ("", str(self.controller.node_id)):
                entries = self._broker_config_entries(resource.resource_name)
            else:
                code, message = ErrorCode.INVALID_REQUEST, f"cannot describe resource {resource.resource_type}/{resource.resource_name!r}"
            wanted = resource.configuration_keys
            configs = tuple(build(entry_cls, name=name, value=layers[0][1], read_only=read_only,
                                  config_source=layers[0][2], is_sensitive=False,
                                  synonyms=tuple(build(synonym_cls, name=n, value=v, source=src) for n, v, src in layers)
                                  if with_synonyms else (),
                                  config_type=topic_configs.config_type(name), documentation=None)
                            for name, layers, read_only in entries if wanted is None or name in wanted)
            results.append(build(result_cls, error_code=code, error_message=message,
                                 resource_type=resource.resource_type, resource_name=resource.resource_name,
                                 configs=configs))
        return kafka.answer(request, results=tuple(results))

    def _topic_config_layers(self, name: str, field: str, own: dict[str, str]) -> list[tuple[str, str, int]]:
        """(name, value, source) of a topic config wherever it is set, the one in force first."""
        layers = [(name, own[name], SOURCE_TOPIC)] if name in own else []
        broker_name = next((b for b, f in topic_configs.DYNAMIC_BROKER_CONFIGS.items() if f == field), None)
        if broker_name is not None:
            layers += self._broker_config_layers(broker_name, field)
        return layers

    def _broker_config_layers(self, name: str, field: str) -> list[tuple[str, str, int]]:
        dynamic = self.controller.state.broker_configs
        layers = [(name, dynamic[resource][name], source)
                  for resource, source in ((str(self.controller.node_id), SOURCE_DYNAMIC_BROKER),
                                           ("", SOURCE_DYNAMIC_DEFAULT_BROKER))
                  if name in dynamic.get(resource, {})]
        static, default = config_text(getattr(self.config, field)), config_text(getattr(DEFAULT_CONFIG, field))
        if static != default:
            layers.append((name, static, SOURCE_STATIC_BROKER))
        return layers + [(name, default, SOURCE_DEFAULT)]

    def _broker_config_entries(self, resource_name: str) -> list[tuple[str, list[tuple[str, str, int]], bool]]:
        """(name, layers, read only) of this broker's settings, or for resource
        "" the dynamic cluster-wide defaults alone."""
        if resource_name == "":
            return [(name, [(name, value, SOURCE_DYNAMIC_DEFAULT_BROKER)], False)
                    for name, value in sorted(self.controller.state.broker_configs.get("", {}).items())]
        return [(name, self._broker_config_layers(name, field), name not in topic_configs.DYNAMIC_BROKER_CONFIGS)
                for name, field in BROKER_CONFIGS.items()]

    def _may_configs(self, request: Request, operation: int, resource: Any) -> bool:
        """DESCRIBE_CONFIGS / ALTER_CONFIGS on a topic, or on the cluster for broker resources."""
        if resource.resource_type == RESOURCE_TOPIC:
            return self._may(request, operation, acl.RESOURCE_TOPIC, resource.resource_name)
        return self._may(request, operation, acl.RESOURCE_CLUSTER, acl.CLUSTER_NAME)

    # ---- AlterConfigs, IncrementalAlterConfigs ------------------------------------

    async def alter_configs(self, request: Request) -> Response:
        """Replace a resource's configs with those given (Kafka's legacy API)."""
        result_cls = nested(response_schema(request), "AlterConfigsResourceResponse")
        results = []
        for resource in request.body.resources:
            values = {c.name: c.value for c in resource.configs}
            if not self._may_configs(request, acl.OP_ALTER_CONFIGS, resource):
                code, message = _config_refusal(resource), None
            else:
                code, message = await _outcome(self.controller.alter_configs(
                    resource.resource_type, resource.resource_name, values, [], replace=True,
                    validate_only=request.body.validate_only))
            results.append(build(result_cls, error_code=code, error_message=message,
                                 resource_type=resource.resource_type, resource_name=resource.resource_name))
        return kafka.answer(request, responses=tuple(results))

    async def incremental_alter_configs(self, request: Request) -> Response:
        """SET, DELETE, APPEND and SUBTRACT on a resource's configs."""
        result_cls = nested(response_schema(request), "AlterConfigsResourceResponse")
        results = []
        for resource in request.body.resources:
            if not self._may_configs(request, acl.OP_ALTER_CONFIGS, resource):
                code, message = _config_refusal(resource), None
            else:
                code, message = await _outcome(self._alter_incrementally(resource, request.body.validate_only))
            results.append(build(result_cls, error_code=code, error_message=message,
                                 resource_type=resource.resource_type, resource_name=resource.resource_name))
        return kafka.answer(request, responses=tuple(results))

    async def _alter_incrementally(self, resource: Any, validate_only: bool) -> None:
        state = self.controller.state
        if resource.resource_type == RESOURCE_TOPIC:
            topic = state.topics.get(resource.resource_name)
            current = topic.configs if topic is not None else {}
        else:
            current = state.broker_configs.get(resource.resource_name, {})
        values, deleted = topic_configs.incremental(
            current, [(c.name, c.config_operation, c.value) for c in resource.configs])
        await self.controller.alter_configs(resource.resource_type, resource.resource_name, values, deleted,
                                            validate_only=validate_only)


class ListedOffset(NamedTuple):
    offset: int
    timestamp: int
    leader_epoch: int


def _list_offset(replica: PartitionReplica, timestamp: int) -> ListedOffset:
    log_ = replica.log
    if timestamp == LATEST:
        return ListedOffset(log_.high_watermark, -1, replica.leader_epoch)
    if timestamp == EARLIEST:
        return ListedOffset(log_.log_start_offset, -1, replica.leader_epoch)
    if timestamp == MAX_TIMESTAMP:
        return _max_timestamp_record(log_)
    offset = log_.offset_for_timestamp(timestamp)
    if offset is None:
        return ListedOffset(-1, -1, -1)
    chunk = log_.read(offset, 1)   # at least the batch holding `offset`
    for header, batch in iter_batches(chunk.buffer):
        for record in decode_batch(header, batch, log_.name, 0):
            if record.offset == offset:
                return ListedOffset(offset, record.timestamp_ms, header.partition_leader_epoch)
    raise AssertionError(f"{log_.name}: offset {offset} found by timestamp is not in the batch read at it")


def _max_timestamp_record(log_: Any) -> ListedOffset:
    """The first record with the log's largest timestamp (-1/-1 for an empty
    log): the batch headers are walked, one batch decoded."""
    best: tuple[int, int] | None = None      # (max timestamp, base offset of its first batch)
    offset = log_.log_start_offset
    while offset < log_.high_watermark:
        chunk = log_.read(offset, MAX_TIMESTAMP_READ_BYTES)
        for header, _batch in iter_batches(chunk.buffer):
            if header.base_offset >= offset and (best is None or header.max_timestamp > best[0]):
                best = (header.max_timestamp, header.base_offset)
        if chunk.next_offset <= offset:
            break
        offset = chunk.next_offset
    if best is None:
        return ListedOffset(-1, -1, -1)
    for header, batch in iter_batches(log_.read(best[1], 1).buffer):
        for record in decode_batch(header, batch, log_.name, 0):
            if record.timestamp_ms == best[0]:
                return ListedOffset(record.offset, record.timestamp_ms, header.partition_leader_epoch)
    raise AssertionError(f"{log_.name}: no record at the batch's max timestamp {best[0]}")


def _fetch_session_error(session_id: int, session_epoch: int) -> int:
    """Sessionless fetches only: session id 0 with epoch -1 (no session) or 0
    (asking for one, which the answer's session id 0 declines)."""
    if session_id != 0:
        return ErrorCode.FETCH_SESSION_ID_NOT_FOUND
    if session_epoch not in (-1, 0):
        return ErrorCode.INVALID_FETCH_SESSION_EPOCH
    return ErrorCode.NONE


def _leader_epoch_error(client_epoch: int, leader_epoch: int) -> int:
    """Kafka's check of the leader epoch a client read from Metadata (-1: none
    given): older than the leader's is FENCED_LEADER_EPOCH (its metadata is
    stale), newer is UNKNOWN_LEADER_EPOCH (this broker's is)."""
    if client_epoch < 0 or client_epoch == leader_epoch:
        return ErrorCode.NONE
    return ErrorCode.FENCED_LEADER_EPOCH if client_epoch < leader_epoch else ErrorCode.UNKNOWN_LEADER_EPOCH


def _admin_deadline(timeout: timedelta) -> float:
    """The event-loop time by which an admin request is answered: its timeout
    (none given, 0 or less: ADMIN_TIMEOUT_S), capped at ADMIN_TIMEOUT_S."""
    timeout_s = timeout.total_seconds()
    timeout_s = min(timeout_s, ADMIN_TIMEOUT_S) if timeout_s > 0 else ADMIN_TIMEOUT_S
    return asyncio.get_running_loop().time() + timeout_s


def _remaining_s(deadline: float) -> float:
    return max(deadline - asyncio.get_running_loop().time(), 0.0)


async def _outcome(operation: Awaitable[None]) -> tuple[int, str | None]:
    """(error code, message) of an admin operation."""
    try:
        await operation
    except RaftkaError as error:
        return error.error_code, str(error)
    return ErrorCode.NONE, None


def _config_refusal(resource: Any) -> int:
    return ErrorCode.TOPIC_AUTHORIZATION_FAILED if resource.resource_type == RESOURCE_TOPIC \
        else ErrorCode.CLUSTER_AUTHORIZATION_FAILED


async def _answered(code: int) -> tuple[int, int, int]:
    """A produce job already decided: (error code, base offset -1, log start offset -1)."""
    return code, -1, -1


async def _validate_topic_name(name: str) -> None:
    validate_topic_name(name)
