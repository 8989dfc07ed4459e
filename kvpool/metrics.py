"""Prometheus metrics of a kvpool process (``--metrics-port``).

Pool state (blocks, bytes, hits, evictions…) is read from the index at scrape time by a
collector, so the hot path only bumps plain integers. RPC latency is a histogram observed
by every gRPC handler. Each server has its own registry: several servers can live in one
process (tests) without clashing.

Names follow Prometheus conventions: ``kvpool_`` prefix, ``_total`` for counters,
``_bytes`` and ``_seconds`` for units.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

if TYPE_CHECKING:
    from kvpool.master.index import BlockIndex

__all__ = ["Metrics"]

_RPC_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.02, 0.025, 0.05, 0.1, 0.25, 1.0)


class _IndexCollector:
    def __init__(self, index: "BlockIndex") -> None:
        self.index = index

    def collect(self):
        index = self.index
        c = index.counters
        labels = ["node", "tier"]
        blocks = GaugeMetricFamily("kvpool_tier_blocks", "Committed blocks held by a tier", labels=labels)
        used = GaugeMetricFamily("kvpool_tier_used_bytes", "Bytes of allocated slots in a tier", labels=labels)
        cap = GaugeMetricFamily("kvpool_tier_capacity_bytes", "Capacity of a tier", labels=labels)
        evictions = CounterMetricFamily("kvpool_evictions", "Blocks evicted from a tier", labels=labels)
        for node in index.nodes:
            for u in node.usage():
                lv = [node.name, u.name]
                blocks.add_metric(lv, index.tier_blocks(node.node_id, u.name))
                used.add_metric(lv, u.used_bytes)
                cap.add_metric(lv, u.capacity_bytes)
                evictions.add_metric(lv, c.evictions.get((node.node_id, u.name), 0))
        yield from (blocks, used, cap, evictions)
        yield CounterMetricFamily("kvpool_hits", "Blocks found by Lookup and Get", value=c.hit_blocks)
        yield CounterMetricFamily("kvpool_misses", "Blocks asked for by Lookup and Get and not found", value=c.miss_blocks)
        yield CounterMetricFamily("kvpool_puts", "Blocks committed", value=c.put_blocks)
        yield CounterMetricFamily("kvpool_put_bytes", "Bytes committed", value=c.put_bytes)
        yield CounterMetricFamily("kvpool_dedup", "PutStart keys already present (skipped)", value=c.dedup_blocks)
        yield CounterMetricFamily("kvpool_expired_grants", "Put grants released by expiry", value=c.expired_grants)
        yield CounterMetricFamily("kvpool_expired_leases", "Read leases ended by expiry", value=c.expired_leases)
        yield CounterMetricFamily("kvpool_demotions", "Blocks moved from DRAM to NVMe", value=c.demoted_blocks)
        yield CounterMetricFamily("kvpool_promotions", "Blocks read back from NVMe into DRAM on a hit", value=c.promoted_blocks)
        yield CounterMetricFamily("kvpool_write_throughs", "Committed blocks copied to NVMe", value=c.written_through_blocks)
        yield CounterMetricFamily("kvpool_corrupt_blocks", "Blocks that failed their checksum and were dropped", value=c.corrupt_blocks)
        yield GaugeMetricFamily("kvpool_nodes", "Storage nodes registered with this master", value=len(index.nodes))
        yield GaugeMetricFamily("kvpool_pending_blocks", "Blocks granted and not yet committed", value=index.pending_count)
        yield GaugeMetricFamily("kvpool_active_leases", "Read leases held", value=index.lease_count)


class _NodeCollector:
    """What a node process (``kvpool node``) holds, per tier: its own view, beside the master's."""

    def __init__(self, node) -> None:
        self.node = node

    def collect(self):
        labels = ["node", "tier"]
        used = GaugeMetricFamily("kvpool_node_tier_used_bytes", "Bytes of allocated slots in a tier of this node",
                                 labels=labels)
        cap = GaugeMetricFamily("kvpool_node_tier_capacity_bytes", "Capacity of a tier of this node", labels=labels)
        for u in self.node.usage():
            used.add_metric([self.node.name, u.name], u.used_bytes)
            cap.add_metric([self.node.name, u.name], u.capacity_bytes)
        yield from (used, cap)


class Metrics:
    @classmethod
    def for_node(cls, node) -> "Metrics":
        """The exporter of a node process: its tiers' use (``--metrics-port`` of ``kvpool node``)."""
        metrics = cls()
        metrics.registry.register(_NodeCollector(node))
        return metrics

    def __init__(self, index: "BlockIndex | None" = None) -> None:
        self.registry = CollectorRegistry()
        self.rpc_seconds = Histogram(
            "kvpool_rpc_duration_seconds", "Latency of gRPC calls served (from their arrival at the server to the answer), by method and status code",
            ["method", "code"], registry=self.registry, buckets=_RPC_BUCKETS,
        )
        if index is not None:
            self.registry.register(_IndexCollector(index))
        self._server = None

    def observe_rpc(self, method: str, code: str, seconds: float) -> None:
        self.rpc_seconds.labels(method, code).observe(seconds)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP exporter; returns the bound port (``port=0`` picks one)."""
        self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._server.server_address[1]

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
