"""BrokerMetrics: a broker's Prometheus metrics, and the HTTP endpoint that serves them.

Off unless `metrics_port` is set (`raftka serve --metrics-port 9644`). Counters
and histograms are updated where the work happens (request handling, produce,
fetch, commits); state that already lives in the broker (terms, offsets,
follower lag, group lag) is read when Prometheus scrapes, by a collector.
The endpoint is served on the broker's own event loop, so a scrape reads the
broker's state between two events, never in the middle of one, and takes no
locks.

  raftka_requests_total{api}                 requests answered, per Kafka API
  raftka_request_seconds{api}                request latency histogram, per API
  raftka_topic_bytes_in_total{topic}         record batch bytes produced
  raftka_topic_records_in_total{topic}       records produced
  raftka_topic_bytes_out_total{topic}        record batch bytes fetched
  raftka_topic_records_out_total{topic}      records fetched (whole batches)
  raftka_commit_seconds                      propose-to-commit latency of appends (histogram)
  raftka_raft_elections_total                new terms seen by this broker's replicas
  raftka_journal_fdatasyncs_total            fdatasync/fsync calls of Raft log group commits (files and directories)
  raftka_peer_refused_frames_total{peer}     peer frames whose tag did not verify (each dropped that link)
  raftka_partition_raft_term{topic,partition}          current Raft term (Kafka's leader epoch)
  raftka_partition_leader{topic,partition}             1 if this broker leads it
  raftka_partition_log_end_offset{topic,partition}
  raftka_partition_high_watermark{topic,partition}
  raftka_partition_follower_lag_entries{topic,partition,follower}   (on the leader)
  raftka_group_lag{group,topic,partition}    high watermark - committed offset (on the coordinator)
"""
from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Iterator

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from raftka.broker.group_service import GroupService
    from raftka.cluster.controller import ClusterController

log = logging.getLogger(__name__)

API_NAMES = {0: "Produce", 1: "Fetch", 2: "ListOffsets", 3: "Metadata", 8: "OffsetCommit", 9: "OffsetFetch",
             10: "FindCoordinator", 11: "JoinGroup", 12: "Heartbeat", 13: "LeaveGroup", 14: "SyncGroup",
             15: "DescribeGroups", 16: "ListGroups", 18: "ApiVersions", 19: "CreateTopics", 20: "DeleteTopics",
             22: "InitProducerId", 32: "DescribeConfigs", 37: "CreatePartitions", 42: "DeleteGroups",
             43: "ElectLeaders", 47: "OffsetDelete"}
MAX_REQUEST_HEAD_BYTES = 8192


class BrokerMetrics:
    """One per broker; see the module docstring."""

    def __init__(self, controller: "ClusterController", groups: "GroupService") -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("raftka_requests", "Kafka requests answered", ["api"], registry=self.registry)
        self.request_seconds = Histogram("raftka_request_seconds", "Kafka request latency", ["api"],
                                         registry=self.registry,
                                         buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
        self.bytes_in = Counter("raftka_topic_bytes_in", "record batch bytes produced", ["topic"], registry=self.registry)
        self.records_in = Counter("raftka_topic_records_in", "records produced", ["topic"], registry=self.registry)
        self.bytes_out = Counter("raftka_topic_bytes_out", "record batch bytes fetched", ["topic"], registry=self.registry)
        self.records_out = Counter("raftka_topic_records_out", "records fetched", ["topic"], registry=self.registry)
        self.commit_seconds = Histogram("raftka_commit_seconds", "append propose-to-commit latency",
                                        registry=self.registry,
                                        buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5))
        self.elections = Counter("raftka_raft_elections", "new Raft terms seen by this broker's replicas",
                                 registry=self.registry)
        self._terms: dict[int, int] = {}       # group id -> last term seen
        self.registry.register(_StateCollector(self, controller, groups))
        self._server: asyncio.base_events.Server | None = None

    def api(self, api_key: int) -> str:
        return API_NAMES.get(api_key, str(api_key))

    def observe_terms(self, controller: "ClusterController") -> None:
        """Count new terms of this broker's partition groups (called by the duties loop)."""
        for replica in controller.replicas().values():
            term, seen = replica.leader_epoch, self._terms.get(replica.group_id)
            if seen is not None and term > seen:
                self.elections.inc(term - seen)
            self._terms[replica.group_id] = term

    # ---- the endpoint ----------------------------------------------------------------

    async def start(self, host: str, port: int) -> int:
        self._server = await asyncio.start_server(self._serve, host, port)
        bound = self._server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", host, bound)
        return bound

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5.0)
            path = head.split(b" ", 2)[1] if head.count(b" ") >= 2 else b""
            if len(head) > MAX_REQUEST_HEAD_BYTES or not head.startswith(b"GET ") or path not in (b"/metrics", b"/"):
                writer.write(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            else:
                body = generate_latest(self.registry)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4; charset=utf-8\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)
            await writer.drain()
        except (asyncio.TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            pass
        finally:
            writer.close()


class _StateCollector:
    """Gauges read from the broker's state at scrape time."""

    def __init__(self, metrics: BrokerMetrics, controller: "ClusterController", groups: "GroupService") -> None:
        self.metrics, self.controller, self.groups = metrics, controller, groups

    def collect(self) -> Iterator[GaugeMetricFamily]:
        labels = ["topic", "partition"]
        term = GaugeMetricFamily("raftka_partition_raft_term", "current Raft term (leader epoch)", labels=labels)
        leader = GaugeMetricFamily("raftka_partition_leader", "1 if this broker leads the partition", labels=labels)
        end = GaugeMetricFamily("raftka_partition_log_end_offset", "log end offset", labels=labels)
        high = GaugeMetricFamily("raftka_partition_high_watermark", "high watermark", labels=labels)
        lag = GaugeMetricFamily("raftka_partition_follower_lag_entries", "Raft entries a follower is behind (leader only)",
                                labels=[*labels, "follower"])
        hw_by_partition: dict[tuple[str, int], int] = {}
        for (topic, partition), replica in sorted(self.controller.replicas().items()):
            values = [topic, str(partition)]
            term.add_metric(values, replica.leader_epoch)
            leader.add_metric(values, 1 if replica.is_leader else 0)
            end.add_metric(values, replica.log.log_end_offset)
            high.add_metric(values, replica.log.high_watermark)
            hw_by_partition[(topic, partition)] = replica.log.high_watermark
            for follower, behind in sorted(replica.follower_lag().items()):
                lag.add_metric([*values, str(follower)], behind)
        yield from (term, leader, end, high, lag)
        yield self._group_lag(hw_by_partition)
        yield CounterMetricFamily("raftka_journal_fdatasyncs", "fdatasync/fsync calls of Raft log group commits",
                                  value=self.controller.node.fdatasyncs)
        refused = CounterMetricFamily("raftka_peer_refused_frames", "peer frames whose tag did not verify",
                                      labels=["peer"])
        for peer, count in sorted(self.controller.node.network.refused_frames.items()):
            refused.add_metric([str(peer)], count)
        yield refused

    def _group_lag(self, hw_by_partition: dict[tuple[str, int], int]) -> GaugeMetricFamily:
        family = GaugeMetricFamily("raftka_group_lag", "high watermark - committed offset (on the coordinator)",
                                   labels=["group", "topic", "partition"])
        for group_id in sorted(self.groups.coordinated_groups()):
            for (topic, partition), committed in sorted(self.groups.store.committed(group_id).items()):
                high = hw_by_partition.get((topic, partition))
                if high is not None:
                    family.add_metric([group_id, topic, str(partition)], max(high - committed.offset, 0))
        return family
