"""The master process: ``kvpool master``, and ``kvpool serve`` with a node inside it.

The master (index + servicers) reaches every node through the NodeHandle interface: the
node inside ``kvpool serve`` directly, nodes in other processes (``kvpool node``) through
:class:`~kvpool.master.remote.RemoteNode`. The master code is the same either way. This
module only wires the parts together, starts the gRPC server (pool, admin and registry
services, with health checking and reflection), the Prometheus exporter and the sweeper
(expiry, watermarks, tier movement, node liveness), and tears everything down in order.

Shutdown order (SIGTERM/SIGINT): stop taking RPCs, abort in-flight puts (their slots are
freed), stop the exporter, then close the node, which unlinks its shared memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from kvpool.auth import AuthInterceptor, TokenTable
from kvpool.guard import LogLimiter, RequestGuard
from kvpool.tls import TlsFiles, peer_context, server_context, server_credentials
from kvpool.config import MasterSettings, TierSettings, format_size, parse_quotas
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.master.servicer import AdminServicer, PoolServicer
from kvpool.master.remote import RegistryServicer
from kvpool.master.tiering import Tiering
from kvpool.metrics import Metrics
from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc, node_pb2, node_pb2_grpc, pool_pb2, pool_pb2_grpc

__all__ = ["PoolServer", "GRPC_OPTIONS", "METADATA_HEALTH"]

#: Health-check service name that says whether the metadata store (Redis) is reachable; the
#: pool itself ("") stays SERVING from memory while it is not.
METADATA_HEALTH = "kvpool.metadata"
_REGISTRY_METHODS = "/" + node_pb2.DESCRIPTOR.services_by_name["Registry"].full_name + "/"

log = logging.getLogger("kvpool.serve")

#: Large enough for a 1M-token batch of keys and its location records.
GRPC_OPTIONS = [
    ("grpc.max_receive_message_length", 64 * 2**20),
    ("grpc.max_send_message_length", 64 * 2**20),
    # gRPC enables SO_REUSEPORT by default: a second server on the same port would then
    # silently share its traffic. A port in use must be an error instead.
    ("grpc.so_reuseport", 0),
]


class _GenericHandlersOnly:
    """Stands in for the server while a generated ``add_*Servicer_to_server`` runs, and keeps
    only its generic handlers.

    Why: with the "registered method" handlers that grpcio-tools now also emits, gRPC queues
    incoming calls per method, and a hot method waits behind itself. Measured with 11 loaded
    clients on 2 cores (tools/bench_load.py's mix, 55% Lookups): a Lookup that failed at its
    first check took 14 ms against 4 ms for Get, Remove or Stats; with generic handlers only,
    every method took 10 ms. The pool's hottest call should not be its slowest.
    """

    def __init__(self, server) -> None:
        self._server = server

    def add_generic_rpc_handlers(self, handlers) -> None:
        self._server.add_generic_rpc_handlers(handlers)

    def add_registered_method_handlers(self, service, handlers) -> None:
        pass


class PoolServer:
    """A master; with ``tiers``, also a node in the same process (``kvpool serve``)."""

    def __init__(self, settings: MasterSettings, tiers: TierSettings | None = None) -> None:
        self.settings = settings
        self.tiers = tiers
        self.node = None  # kvpool.node.node.Node, for `kvpool serve`
        self.registry: RegistryServicer | None = None
        self.index: BlockIndex | None = None
        self.metrics: Metrics | None = None
        self._server: grpc.aio.Server | None = None
        self._sweeper: asyncio.Task | None = None
        self.tiering: Tiering | None = None
        self.port = 0
        self.metrics_port = -1
        #: With --redis: the metadata store, the leader's lease and the task that leads.
        self.meta = None
        self.lease = None
        self._leading: asyncio.Task | None = None
        self._serving = False
        self._registering = False
        self.events = None
        self.replicator = None

    async def start(self) -> None:
        s, t = self.settings, self.tiers
        nodes = NodeRegistry()
        if t is not None:
            # Only `kvpool serve` loads the node stack (tiers, mover, data server); `kvpool master`
            # never does (docs/design.md §5).
            from kvpool.node.node import Node

            os.makedirs(t.data_dir, exist_ok=True)
            self.node = Node.build(1, t.node_name, dram_bytes=t.dram, nvme_bytes=t.nvme, hbm_bytes=t.hbm,
                                   data_dir=t.data_dir, chunk_bytes=t.slab_bytes, prefault=t.prefault)
            tls = TlsFiles.of(s)
            self.node.serve_data(s.host, t.data_port, advertise_host=t.advertise_host or None, ucx=t.ucx,
                                 tls=server_context(tls) if tls is not None else None, peer_tls=peer_context(tls))
            nodes.add(self.node)
        self.index = BlockIndex(nodes, IndexConfig(
            grant_ttl_s=s.grant_ttl, lease_ttl_s=s.lease_ttl, max_batch=s.max_batch,
            high_watermark=s.high_watermark, low_watermark=s.low_watermark,
            eviction_policy=s.eviction_policy, write_through=s.write_through, quotas=parse_quotas(s.quotas),
            replicas=s.replicas, read_replicas=s.read_replicas,
        ))
        self.tiering = Tiering(self.index, write_through=s.write_through)
        # Always there, for token-checked gRPC subscribers; the ZMQ socket only with --events-port.
        from kvpool.master.events import EventPublisher

        self.events = EventPublisher(s.events_host, s.events_port, self.index, topic=s.events_topic)
        self.events.cleared()  # whatever an earlier master announced may be stale
        self.index.observers.append(self.events)
        self.events.start()
        if self.events.port >= 0:
            log.info("KV events on tcp://%s:%d (topic %r)", s.events_host, self.events.port, s.events_topic)
        # Always there: a namespace may ask for replicas although the pool default is 1. It
        # queues only blocks of namespaces that want copies, so it costs nothing otherwise.
        from kvpool.master.replication import Replicator

        self.replicator = Replicator(self.index)
        # The index is rebuilt from what the nodes hold: blocks that survived on NVMe.
        if self.node is not None:
            recovered = self.index.adopt(self.node.node_id, self.node.recover())
            if recovered:
                log.info("serving %d blocks recovered from NVMe", recovered)
        self.metrics = Metrics(self.index)

        # The guard is outermost, so that even a refused caller's body is parsed safely; then
        # who is calling (tokens); then whether this master leads (a standby refuses the rest).
        interceptors = [RequestGuard(LogLimiter(logging.getLogger("kvpool.requests")))]
        if s.auth_tokens:
            interceptors.append(AuthInterceptor(TokenTable.load(s.auth_tokens)))
        if s.redis:
            from kvpool.master.gate import LeaderGate
            from kvpool.master.leader import LeaderLease
            from kvpool.master.metastore import MetaCollector, RedisMeta

            self.meta = RedisMeta(s.redis, s.redis_prefix, self.index, max_backlog=s.redis_backlog,
                                  commit=s.redis_commit)
            if self.events.port >= 0:
                self.events.redis, self.events.stream = self.meta.redis, f"{s.redis_prefix}:events"
            self.lease = LeaderLease(self.meta.redis, s.redis_prefix, "", ttl=s.leader_ttl)
            interceptors.append(LeaderGate(self._admits, lambda: self.lease.leader_address, self._why_not))
            self.metrics.registry.register(MetaCollector(self.meta, self.lease))
        options = [(k, s.max_message_bytes if k == "grpc.max_receive_message_length" else v) for k, v in GRPC_OPTIONS]
        server = grpc.aio.server(options=options, interceptors=interceptors)
        servicers = [PoolServicer(self.index, self.metrics, self.tiering),
                     AdminServicer(self.index, self.metrics, self.tiering)]
        servicers[1].events = self.events
        if s.read_replicas:
            servicers[0].read_by = self.replicator.read
        if self.meta is not None:
            for servicer in servicers:
                servicer.admit_commit = self.meta.admit
                servicer.settings_durable = self.meta.durable
                servicer.describe_store = self._describe_store
        pool_pb2_grpc.add_KVPoolServicer_to_server(servicers[0], _GenericHandlersOnly(server))
        admin_pb2_grpc.add_AdminServicer_to_server(servicers[1], _GenericHandlersOnly(server))
        self.registry = RegistryServicer(self.index, self.metrics, heartbeat_interval=s.heartbeat_interval,
                                         tls=TlsFiles.of(s))
        node_pb2_grpc.add_RegistryServicer_to_server(self.registry, server)
        for servicer in servicers:
            servicer.removal_durable = self._removal_durable
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        services = (
            pool_pb2.DESCRIPTOR.services_by_name["KVPool"].full_name,
            admin_pb2.DESCRIPTOR.services_by_name["Admin"].full_name,
            node_pb2.DESCRIPTOR.services_by_name["Registry"].full_name,
            health.SERVICE_NAME,
            reflection.SERVICE_NAME,
        )
        reflection.enable_server_reflection(services, server)
        tls = TlsFiles.of(s)
        try:
            if tls is not None:
                self.port = server.add_secure_port(f"{s.host}:{s.port}", server_credentials(tls))
            else:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:  # newer grpcio raises instead of returning 0
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind gRPC to {s.host}:{s.port} (in use?); pick another --port")
        await server.start()
        for name in services[:2] + ("",):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        if s.metrics_port >= 0:
            self.metrics_port = self.metrics.serve(s.metrics_host or s.host, s.metrics_port)
        self._health = health_servicer
        self._sweeper = asyncio.create_task(self._sweep())
        metrics = f"http://{s.metrics_host or s.host}:{self.metrics_port}/metrics" if self.metrics_port >= 0 else "off"
        if s.tls_cert:
            log.info("gRPC and data port serve TLS%s", " with client certificates required (mutual TLS)"
                     if s.tls_ca else "")
        if s.auth_tokens:
            log.info("bearer tokens required (%s)", s.auth_tokens)
        elif s.insecure:
            log.warning("serving %s WITHOUT authentication (--insecure): every peer that reaches it is trusted",
                        s.host)
        if self.meta is not None:
            self.lease.address = f"{s.advertise_host or s.host}:{self.port}"
            await health_servicer.set(METADATA_HEALTH, health_pb2.HealthCheckResponse.SERVING)
            self._leading = asyncio.create_task(self._lead(metrics))
            log.info("kvpool master standby grpc=%s:%d metrics=%s redis=%s (serving once it holds the lease)",
                     s.host, self.port, metrics, s.redis)
            return
        self._serving = True
        self._ready(metrics)

    def _ready(self, metrics: str) -> None:
        s, t = self.settings, self.tiers
        if self.node is None:
            log.info("kvpool master ready grpc=%s:%d metrics=%s policy=%s (nodes join with: kvpool node "
                     "--master %s:%d)", s.host, self.port, metrics, s.eviction_policy, s.host, self.port)
            return
        ep = self.node.endpoint()
        shm = ep.segment("dram", "shm").handle

        def size(tier: str) -> str:
            return format_size(self.node.tiers[tier].capacity) if tier in self.node.tiers else "off"

        log.info("kvpool serve ready grpc=%s:%d metrics=%s data=%s ucx=%s dram=%s hbm=%s nvme=%s shm=/dev/shm/%s "
                 "policy=%s data_dir=%s", s.host, self.port, metrics, ep.tcp_address or "off",
                 "on" if ep.ucx_worker_address else "off", size("dram"), size("hbm"), size("nvme"), shm,
                 s.eviction_policy, os.path.abspath(t.data_dir))

    async def _removal_durable(self, holders: set[int]) -> None:
        """Before a removal is answered: with Redis, the flush that writes its tombstones
        (the next leader does not serve what they name); without, or while Redis is down,
        the nodes that held the blocks apply it (a restarted master is not told of them)."""
        if self.meta is not None and self.meta.up:
            await self.meta.durable()
            if self.meta.up:
                return
        await self.registry.push_removals(holders)

    async def _lead(self, metrics: str) -> None:
        """Wait for the lease, take over the metadata in Redis, serve; step down if deposed."""
        lease, meta = self.lease, self.meta
        await lease.acquire()
        started = time.monotonic()
        self.registry.epoch = lease.epoch
        self.registry.meta = meta
        try:
            # A block of node ids no other master term uses (clients cache endpoints by id).
            last = await meta.redis.incrby(f"{self.settings.redis_prefix}:node_ids", 1 << 20)
            self.registry.first_node_id(100 + (last - (1 << 20)) % (1 << 31))
            namespaces, records, known_nodes = await meta.load()
            # Before any node registers: what they name is not adopted again.
            self.registry.tombstones.load(await meta.load_tombstones())
            self.index.config.quotas = await meta.take_tenant_settings(
                self.index.config.quotas if self.settings.quotas else None)
        except Exception as exc:  # Redis went away between the lease and the load
            log.warning("cannot load metadata from Redis (%s); nodes' reports rebuild the index", exc)
            namespaces, records, known_nodes = [], [], []
        for ns, settings in namespaces:  # with the settings the leader before this one had
            self.index.register_namespace(ns, replicas=settings.replicas)
        for record in records:
            self.registry.candidates.setdefault(record.node, []).append(record)
        self.index.observers.append(meta)
        self.registry.tombstones.store, meta.removals = meta, self.registry.tombstones
        meta.on_fenced = lambda: asyncio.ensure_future(lease.renew())
        meta.lease_fresh = lease.fresh
        lease.on_error, lease.on_reset = meta.mark_down, meta.mark_reset
        meta.start(lease.epoch)
        # Nodes that were in the pool register again (they follow the lease within a heartbeat
        # or two); clients wait meanwhile instead of finding an empty pool.
        self._registering = True
        expected = set(known_nodes)
        settle = time.monotonic() + max(1.0, 5 * self.settings.heartbeat_interval)
        while expected and time.monotonic() < settle:
            if expected <= {n.name for n in self.index.nodes}:
                break
            await asyncio.sleep(0.05)
        self._serving = True
        log.info("took over with fencing epoch %d in %.3fs: %d namespaces, %d block records to reconcile with "
                 "node reports", lease.epoch, time.monotonic() - started, len(namespaces), len(records))
        self._ready(metrics)
        await lease.keep()
        # Deposed: the gate refuses every request already; nodes fence what got through.
        self._serving = False
        # Linger one lease TTL, refusing with the new leader's address, so that callers still
        # pointed here are sent on to it instead of finding a closed port.
        log.warning("another master leads now; this one stops in %.1fs (restart it to stand by again)",
                    self.settings.leader_ttl)
        await asyncio.sleep(self.settings.leader_ttl)
        os.kill(os.getpid(), signal.SIGTERM)

    async def _admits(self, method: str) -> bool:
        """With Redis: serve only while leading; while nodes register again after a takeover,
        serve only them (clients are told to retry rather than find an empty pool)."""
        if self.meta.deposed:  # Redis refused a write for a newer epoch: learn who leads, step down
            if self.lease.leading:
                await self.lease.renew()
            return False
        if not await self.lease.confirm():
            return False
        return self._serving or (self._registering and method.startswith(_REGISTRY_METHODS))

    def _why_not(self) -> str:
        if self.lease.valid():
            return "it took over just now and its nodes are registering again; retry in a moment"
        leader = self.lease.leader_address
        if leader and leader != self.lease.address:
            return f"it stands by; the leader is at {leader}"
        return "no master leads right now (the lease lapsed); retry in a moment"

    def _describe_store(self, resp) -> None:
        resp.metadata_store = self.meta.health()
        resp.metadata_degraded = not self.meta.up
        resp.fencing_epoch = self.lease.epoch

    async def _sweep(self) -> None:
        """Twice a second: expire grants and leases, keep tiers under their high watermark,
        and forget nodes that went silent. None of this waits on a node, so a node that hangs
        (SIGSTOP, a stuck disk) delays no expiry and no node-loss decision: the work that calls
        nodes (demotion, promotion, NVMe drops, replica copies, each RPC up to its 60 s
        timeout) runs in its own loop, :meth:`_move`."""
        mover = asyncio.create_task(self._move())
        try:
            while True:
                await asyncio.sleep(0.5)
                try:
                    grants, leases = self.index.expire()
                    if grants or leases:
                        log.info("expired %d put grants and %d read leases", grants, leases)
                    self.index.enforce_watermarks()
                    await self.registry.sweep()
                    if self.meta is not None:
                        await self._health.set(METADATA_HEALTH, health_pb2.HealthCheckResponse.SERVING
                                               if self.meta.up else health_pb2.HealthCheckResponse.NOT_SERVING)
                except Exception:  # never let the sweeper die silently
                    log.exception("sweeper failed")
        finally:
            mover.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await mover

    async def _move(self) -> None:
        """Twice a second at most: the background work that calls nodes: tier movement
        (demotion where there is NVMe, NVMe drops, write-through) and replica copies."""
        while True:
            await asyncio.sleep(0.5)
            try:
                await self.tiering.cycle()
                if self.replicator is not None:
                    await self.replicator.cycle()
            except Exception:  # never let the mover die silently
                log.exception("tier mover failed")

    async def stop(self, grace: float = 2.0) -> None:
        if self._leading is not None:
            self._leading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._leading
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self.events is not None:
            self.events.end_streams()  # else each open SubscribeEvents would hold the stop for `grace`
        if self._server is not None:
            await self._server.stop(grace)
        if self.index is not None:
            aborted = self.index.abort_all()
            if aborted:
                log.info("aborted %d in-flight put blocks", aborted)
            with contextlib.suppress(Exception):
                await self.tiering.flush_drops()
        if self.events is not None:
            with contextlib.suppress(Exception):
                await self.events.close()
        if self.meta is not None:
            with contextlib.suppress(Exception):
                await self.meta.stop()
        if self.metrics is not None:
            self.metrics.close()
        for node in list(self.index.nodes) if self.index is not None else []:
            await node.disconnect()
        if self.node is not None:
            self.node.close()
            log.info("kvpool stopped; shared memory unlinked")
