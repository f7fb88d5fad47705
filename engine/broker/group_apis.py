"""The consumer-group APIs on the wire: FindCoordinator, JoinGroup, SyncGroup,
Heartbeat, LeaveGroup, OffsetCommit, OffsetFetch, ListGroups, DescribeGroups,
DeleteGroups, OffsetDelete.

Each decodes its kio request, asks the GroupService, and answers with Kafka's
error codes in the places the protocol puts them; a GroupError from below is
just its error code. Nothing here keeps state.
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from raftka.broker.group_service import GroupService
from raftka.errors import ErrorCode, GroupError
from raftka.groups.coordinator import GroupState
from raftka.groups.offsets_topic import CommittedOffset
from raftka.protocol import kafka
from raftka.protocol.kafka import Request, build, nested, response_schema
from raftka.security import state as acl

if TYPE_CHECKING:
    from raftka.broker.security_apis import Security

Handler = Callable[[Request], Awaitable[bytes]]


class GroupHandlers:
    """The group APIs of one broker, over its GroupService."""

    def __init__(self, service: GroupService) -> None:
        self.service = service
        self.metadata_max_bytes = service.controller.config.offset_metadata_max_bytes
        self.security: Security | None = None     # set by Handlers.secure: ACLs when SASL is on

    def _may(self, request: Request, operation: int, resource_type: int, name: str) -> bool:
        return self.security is None or self.security.allowed(request, operation, resource_type, name)

    def _authorize_group(self, request: Request, operation: int, group_id: str) -> None:
        """GroupError GROUP_AUTHORIZATION_FAILED unless the principal may `operation` the group."""
        if not self._may(request, operation, acl.RESOURCE_GROUP, group_id):
            raise GroupError(ErrorCode.GROUP_AUTHORIZATION_FAILED, group_id)

    def table(self) -> dict[int, Handler]:
        return {
            kafka.FIND_COORDINATOR: self.find_coordinator, kafka.JOIN_GROUP: self.join_group,
            kafka.SYNC_GROUP: self.sync_group, kafka.HEARTBEAT: self.heartbeat, kafka.LEAVE_GROUP: self.leave_group,
            kafka.OFFSET_COMMIT: self.offset_commit, kafka.OFFSET_FETCH: self.offset_fetch,
            kafka.LIST_GROUPS: self.list_groups, kafka.DESCRIBE_GROUPS: self.describe_groups,
            kafka.DELETE_GROUPS: self.delete_groups, kafka.OFFSET_DELETE: self.offset_delete,
        }

    async def find_coordinator(self, request: Request) -> bytes:
        body = request.body
        key = body.key
        if getattr(body, "key_type", 0) != 0:
            return kafka.answer(request, error_code=ErrorCode.INVALID_REQUEST, error_message="transactions are not supported",
                           node_id=-1, host="", port=-1)
        try:
            self._authorize_group(request, acl.OP_DESCRIBE, key)
            node_id, host, port = await self.service.find_coordinator(key)
        except GroupError as error:
            return kafka.answer(request, error_code=error.error_code, error_message=str(error), node_id=-1, host="", port=-1)
        return kafka.answer(request, error_code=ErrorCode.NONE, error_message=None, node_id=node_id, host=host, port=port)

    async def join_group(self, request: Request) -> bytes:
        body = request.body
        session_ms = int(body.session_timeout.total_seconds() * 1000)
        rebalance = getattr(body, "rebalance_timeout", None)   # v0 has none: the session timeout serves
        rebalance_ms = int(rebalance.total_seconds() * 1000) if rebalance is not None else session_ms
        member_cls = nested(response_schema(request), "JoinGroupResponseMember")
        try:
            self._authorize_group(request, acl.OP_READ, body.group_id)
            self.service.coordinating(body.group_id)
            result = await self.service.coordinator.join(
                body.group_id, body.member_id, request.client_id or "", request.client_host, session_ms, rebalance_ms,
                body.protocol_type, tuple((p.name, p.metadata) for p in body.protocols),
                getattr(body, "group_instance_id", None))
        except GroupError as error:
            return kafka.answer(request, error_code=error.error_code, generation_id=-1, protocol_type=None,
                                protocol_name=None if request.api_version >= 7 else "", leader="",
                                member_id=body.member_id, members=())
        members = tuple(build(member_cls, member_id=member_id, group_instance_id=instance_id, metadata=metadata)
                        for member_id, instance_id, metadata in result.members)
        return kafka.answer(request, error_code=ErrorCode.NONE, generation_id=result.generation,
                            protocol_type=body.protocol_type, protocol_name=result.protocol or "",
                            leader=result.leader, member_id=result.member_id, members=members)

    async def sync_group(self, request: Request) -> bytes:
        body = request.body
        group_instance_id = getattr(body, "group_instance_id", None)
        try:
            self._authorize_group(request, acl.OP_READ, body.group_id)
            self.service.coordinating(body.group_id)
            self._check_sync_protocol(body)
            assignment = await self.service.coordinator.sync(
                body.group_id, body.generation_id, body.member_id,
                {a.member_id: a.assignment for a in body.assignments}, group_instance_id)
        except GroupError as error:
            return kafka.answer(request, error_code=error.error_code, protocol_type=None, protocol_name=None,
                                assignment=b"")
        group = self.service.coordinator.groups.get(body.group_id)
        return kafka.answer(request, error_code=ErrorCode.NONE, assignment=assignment,
                            protocol_type=group.protocol_type if group else None,
                            protocol_name=group.protocol if group else None)

    def _check_sync_protocol(self, body: Any) -> None:
        """SyncGroup v5+ names the protocol type and name the member joined
        with: INCONSISTENT_GROUP_PROTOCOL unless they are the group's."""
        group = self.service.coordinator.groups.get(body.group_id)
        if group is None:
            return
        for given, actual in ((getattr(body, "protocol_type", None), group.protocol_type),
                              (getattr(body, "protocol_name", None), group.protocol)):
            if given is not None and actual is not None and given != actual:
                raise GroupError(ErrorCode.INCONSISTENT_GROUP_PROTOCOL, body.group_id,
                                 f"{given!r} is not the group's {actual!r}")

    async def heartbeat(self, request: Request) -> bytes:
        body = request.body
        code = ErrorCode.NONE
        try:
            self._authorize_group(request, acl.OP_READ, body.group_id)
            self.service.coordinating(body.group_id)
            self.service.coordinator.heartbeat(body.group_id, body.generation_id, body.member_id,
                                               getattr(body, "group_instance_id", None))
        except GroupError as error:
            code = error.error_code
        return kafka.answer(request, error_code=code)

    async def leave_group(self, request: Request) -> bytes:
        """v0-2 name one member; v3+ a batch of members, each by member id
        and/or group instance id, each answered on its own."""
        body = request.body
        leaving = [(m.member_id, m.group_instance_id) for m in body.members] if request.api_version >= 3 \
            else [(body.member_id, None)]
        codes = []
        try:
            self._authorize_group(request, acl.OP_READ, body.group_id)
            self.service.coordinating(body.group_id)
        except GroupError as error:
            return kafka.answer(request, error_code=error.error_code, members=())
        for member_id, instance_id in leaving:
            code = ErrorCode.NONE
            try:
                self.service.coordinator.leave(body.group_id, member_id, instance_id)
            except GroupError as error:
                code = error.error_code
            codes.append(code)
        if request.api_version < 3:
            return kafka.answer(request, error_code=codes[0])
        member_cls = nested(response_schema(request), "MemberResponse")
        members = tuple(build(member_cls, member_id=member_id, group_instance_id=instance_id, error_code=code)
                        for (member_id, instance_id), code in zip(leaving, codes))
        return kafka.answer(request, error_code=ErrorCode.NONE, members=members)

    # ---- offsets --------------------------------------------------------------------

    async def offset_commit(self, request: Request) -> bytes:
        body = request.body
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "OffsetCommitResponseTopic"), nested(schema, "OffsetCommitResponsePartition")
        now_ms = int(time.time() * 1000)
        offsets: dict[tuple[str, int], CommittedOffset] = {}
        codes: dict[tuple[str, int], ErrorCode] = {}
        for topic in body.topics:
            for p in topic.partitions:
                metadata = p.committed_metadata or ""
                if not self._may(request, acl.OP_READ, acl.RESOURCE_TOPIC, topic.name):
                    codes[(topic.name, p.partition_index)] = ErrorCode.TOPIC_AUTHORIZATION_FAILED
                elif len(metadata.encode()) > self.metadata_max_bytes:
                    codes[(topic.name, p.partition_index)] = ErrorCode.OFFSET_METADATA_TOO_LARGE
                else:
                    offsets[(topic.name, p.partition_index)] = CommittedOffset(
                        p.committed_offset, getattr(p, "committed_leader_epoch", -1), metadata, now_ms)
        try:
            self._authorize_group(request, acl.OP_READ, body.group_id)
            await self.service.commit_offsets(body.group_id, body.generation_id_or_member_epoch, body.member_id, offsets,
                                              getattr(body, "group_instance_id", None))
            codes.update((tp, ErrorCode.NONE) for tp in offsets)
        except GroupError as error:
            codes.update((tp, error.error_code) for tp in offsets)
        topics = tuple(build(topic_cls, name=topic.name, partitions=tuple(
            build(partition_cls, partition_index=p.partition_index, error_code=codes[(topic.name, p.partition_index)])
            for p in topic.partitions)) for topic in body.topics)
        return kafka.answer(request, topics=topics)

    async def offset_fetch(self, request: Request) -> bytes:
        """Committed offsets of one group (v0-7) or of several (v8+)."""
        body = request.body
        schema = response_schema(request)
        if request.api_version < 8:
            topics, code = self._fetched_offsets(request, schema, "OffsetFetchResponseTopic", "OffsetFetchResponsePartition",
                                                 body.group_id, body.topics)
            return kafka.answer(request, topics=topics, error_code=code)
        group_cls = nested(schema, "OffsetFetchResponseGroup")
        groups = []
        for wanted in body.groups:
            topics, code = self._fetched_offsets(request, schema, "OffsetFetchResponseTopics", "OffsetFetchResponsePartitions",
                                                 wanted.group_id, wanted.topics)
            groups.append(build(group_cls, group_id=wanted.group_id, topics=topics, error_code=code))
        return kafka.answer(request, groups=tuple(groups))

    def _fetched_offsets(self, request: Request, schema: type, topic_name: str, partition_name: str, group_id: str,
                         requested: Any) -> tuple[tuple[Any, ...], ErrorCode]:
        """(topics, group error) of one group's OffsetFetch; `requested` None: every partition it committed."""
        topic_cls, partition_cls = nested(schema, topic_name), nested(schema, partition_name)
        try:
            self._authorize_group(request, acl.OP_DESCRIBE, group_id)
            committed = self.service.committed_offsets(group_id)
            code = ErrorCode.NONE
        except GroupError as error:
            committed, code = {}, error.error_code
        if requested is None:
            wanted: dict[str, list[int]] = {}
            for topic, partition in sorted(committed):
                if self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, topic):
                    wanted.setdefault(topic, []).append(partition)
        else:
            wanted = {t.name: list(t.partition_indexes) for t in requested}
        topics = []
        for name, partitions in wanted.items():
            entries = []
            topic_code = code if self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_TOPIC, name) \
                else ErrorCode.TOPIC_AUTHORIZATION_FAILED
            for index in partitions:
                value = committed.get((name, index)) if topic_code == ErrorCode.NONE else None
                entries.append(build(partition_cls, partition_index=index,
                                     committed_offset=value.offset if value else -1,
                                     committed_leader_epoch=value.leader_epoch if value else -1,
                                     metadata=value.metadata if value else "", error_code=topic_code))
            topics.append(build(topic_cls, name=name, partitions=tuple(entries)))
        return tuple(topics), code

    async def offset_delete(self, request: Request) -> bytes:
        body = request.body
        schema = response_schema(request)
        topic_cls, partition_cls = nested(schema, "OffsetDeleteResponseTopic"), nested(schema, "OffsetDeleteResponsePartition")
        wanted = [(t.name, p.partition_index) for t in body.topics for p in t.partitions]
        try:
            self._authorize_group(request, acl.OP_DELETE, body.group_id)
            outcome = await self.service.delete_offsets(body.group_id, wanted)
        except GroupError as error:
            return kafka.answer(request, error_code=error.error_code, topics=())
        topics = tuple(build(topic_cls, name=t.name, partitions=tuple(
            build(partition_cls, partition_index=p.partition_index, error_code=outcome[(t.name, p.partition_index)])
            for p in t.partitions)) for t in body.topics)
        return kafka.answer(request, error_code=ErrorCode.NONE, topics=topics)

    # ---- admin ----------------------------------------------------------------------

    async def list_groups(self, request: Request) -> bytes:
        listed_cls = nested(response_schema(request), "ListedGroup")
        groups = tuple(build(listed_cls, group_id=group_id, protocol_type=protocol_type)
                       for group_id, protocol_type in self.service.listed_groups()
                       if self._may(request, acl.OP_DESCRIBE, acl.RESOURCE_GROUP, group_id))
        return kafka.answer(request, error_code=ErrorCode.NONE, groups=groups)

    async def describe_groups(self, request: Request) -> bytes:
        schema = response_schema(request)
        group_cls, member_cls = nested(schema, "DescribedGroup"), nested(schema, "DescribedGroupMember")
        described = []
        for group_id in request.body.groups:
            try:
                self._authorize_group(request, acl.OP_DESCRIBE, group_id)
                self.service.coordinating(group_id)
            except GroupError as error:
                described.append(build(group_cls, error_code=error.error_code, group_id=group_id, group_state="",
                                       protocol_type="", protocol_data="", members=()))
                continue
            group = self.service.coordinator.groups.get(group_id)
            if group is None:   # only offsets stored (Empty), or no such group (Dead)
                state = GroupState.EMPTY if group_id in self.service.store.group_names() else GroupState.DEAD
                described.append(build(group_cls, error_code=ErrorCode.NONE, group_id=group_id, group_state=state.value,
                                       protocol_type="", protocol_data="", members=()))
                continue
            members = tuple(build(member_cls, member_id=m.member_id, client_id=m.client_id, client_host=m.client_host,
                                  member_metadata=m.metadata(group.protocol) if group.protocol else b"",
                                  member_assignment=m.assignment) for m in group.members.values())
            described.append(build(group_cls, error_code=ErrorCode.NONE, group_id=group_id,
                                   group_state=group.state.value, protocol_type=group.protocol_type or "",
                                   protocol_data=group.protocol or "", members=members))
        return kafka.answer(request, groups=tuple(described))

    async def delete_groups(self, request: Request) -> bytes:
        result_cls = nested(response_schema(request), "DeletableGroupResult")
        results = []
        for group_id in request.body.groups_names:
            code = ErrorCode.NONE
            try:
                self._authorize_group(request, acl.OP_DELETE, group_id)
                await self.service.delete_group(group_id)
            except GroupError as error:
                code = error.error_code
            results.append(build(result_cls, group_id=group_id, error_code=code))
        return kafka.answer(request, results=tuple(results))
