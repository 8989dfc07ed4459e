"""gRPC servicers of the master: the client-facing KVPool service and the Admin service.

They translate protos to :class:`~kvpool.master.index.BlockIndex` calls and back, nothing
more. Every handler goes through :func:`~kvpool.master.handlers.rpc`, which turns :mod:`kvpool.errors` exceptions
into gRPC statuses (the server keeps serving) and records the RPC's latency.
"""

from __future__ import annotations

import operator
import logging

import grpc

from kvpool.auth import current_caller
from kvpool.errors import InvalidArgument, NotFound, PermissionDenied
from kvpool.identity import KEY_BYTES, Namespace
from kvpool.layout import KVLayout
from kvpool.master.handlers import rpc
from kvpool.master.drain import DEFAULT_BATCH, Drainer, DrainReport
from kvpool.master.index import BlockIndex, CopyView, Entry, NamespaceInfo, unknown_namespace
from kvpool.master.nodes import memory_tiers
from kvpool.master.tiering import Tiering
from kvpool.metrics import Metrics
from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc, common_pb2, pool_pb2, pool_pb2_grpc
from kvpool.capability import expiry_ms, sign
from kvpool.transport.base import READ, WRITE
from kvpool.wire import TIER_CODES

__all__ = ["PoolServicer", "AdminServicer", "stats_response"]

_record_of = operator.attrgetter("record")
_node_of = operator.attrgetter("node_id")
_loc_of = operator.attrgetter("loc")
_tier_of = operator.attrgetter("mem_tier")
_mem_of = operator.attrgetter("mem")

log = logging.getLogger("kvpool.master")


def namespace_from_proto(msg: common_pb2.Namespace) -> Namespace:
    if not msg.HasField("layout"):
        raise InvalidArgument("RegisterNamespace: the namespace has no layout; set layout (KVLayout)")
    lay = msg.layout
    layout = KVLayout(
        num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads, head_dim=lay.head_dim,
        dtype=lay.dtype or "bfloat16", block_tokens=lay.block_tokens, kv_kind=lay.kv_kind or "kv",
    )
    return Namespace(model=msg.model, layout=layout, tp_rank=msg.tp_rank, tp_size=msg.tp_size or 1,
                     tenant=msg.tenant, lora=msg.lora, salt=msg.salt)


class _Base:
    def __init__(self, index: BlockIndex, metrics: Metrics, tiering: Tiering | None = None) -> None:
        self.index = index
        self.metrics = metrics
        self.tiering = tiering
        self._endpoints: dict[int, common_pb2.NodeEndpoint] = {}
        #: With Redis metadata: awaited before a commit is answered: backpressure, or the
        #: flush that carries it with --redis-commit wait (kvpool.master.metastore).
        self.admit_commit = None
        #: Fills the metadata-store fields of a StatsResponse (set by the server).
        self.describe_store = None
        #: Awaited, with the ids of the nodes that held them, before removals are answered:
        #: the flush that carries their tombstones (Redis), or the nodes applying them (no
        #: Redis), so that a removed block does not come back after a master restart or a
        #: failover (kvpool.master.tombstones). None: every node lives in this process.
        self.removal_durable = None
        #: Awaited before a change to a namespace (new, or a new setting) is answered: with
        #: Redis, the flush that writes its record, so that the next leader has it.
        self.settings_durable = None
        #: Told of each read served from another host than the reader's (read-driven
        #: replicas, kvpool.master.replication); None when they are off.
        self.read_by = None

    def _holders(self, entries) -> set[int]:
        """The nodes holding a copy of any of these entries."""
        out: set[int] = set()
        for e in entries:
            out.add(e.node_id)
            out.update(r.node_id for r in e.replicas)
        return out

    async def _durable_removal(self, holders: set[int], removed: int) -> None:
        if removed and self.removal_durable is not None:
            await self.removal_durable(holders)

    def _nearest(self, entries, client_host: str):
        """For each entry, a memory copy on the reader's host when there is one (the entry
        pins all its copies, so the lease covers the copy chosen)."""
        if not client_host or not self.index.replicated:
            return entries
        nodes = self.index.nodes
        out = []
        for e in entries:
            if len(e.copies) > 1 and nodes.get(e.node_id).endpoint().host_id != client_host:
                for c in e.copies[1:]:
                    node = nodes.get(c.node_id)
                    if c.mem is not None and node is not None and node.endpoint().host_id == client_host:
                        e = CopyView(e, c)
                        break
            out.append(e)
        return out

    def _served(self, entries, client_host: str):
        """The copies a read is sent to (:meth:`_nearest`); reads from afar are counted."""
        served = self._nearest(entries, client_host)
        if self.read_by is not None and client_host:
            self.read_by(served, client_host)
        return served

    def _stats(self, tenant: str | None = None) -> common_pb2.StatsResponse:
        resp = stats_response(self.index, tenant)
        if self.describe_store is not None:
            self.describe_store(resp)
        else:
            resp.metadata_store = "memory"
        return resp

    @staticmethod
    def _tenant() -> str | None:
        """The tenant a client token acts for; None for admins and servers without tokens."""
        caller = current_caller()
        return caller.tenant if caller is not None and caller.is_client else None

    def _ns(self, ns_id: str) -> NamespaceInfo:
        """A namespace the caller may use: another tenant's is reported as not registered."""
        info = self.index.namespace(ns_id)
        tenant = self._tenant()
        if tenant is not None and info.tenant != tenant:
            raise unknown_namespace(ns_id)
        return info

    async def _resident(self, lease, client_host: str = "") -> list[bool] | None:
        """Promote the lease's blocks that have no copy in memory (a copy on the reader's host
        first); None when all were in memory already."""
        if self.tiering is None or not self.tiering.any_nvme() or None not in map(_mem_of, lease.entries):
            return None
        return await self.tiering.make_resident(lease.entries, client_host)

    def _endpoint(self, node_id: int) -> common_pb2.NodeEndpoint:
        ep = self._endpoints.get(node_id)
        if ep is None:
            node = self.index.nodes.get(node_id)
            if node is None:
                raise NotFound(f"node {node_id} is not registered")
            ep = common_pb2.NodeEndpoint()
            node.endpoint().fill(ep)
            self._endpoints[node_id] = ep
        return ep

    def _several_memory_tiers(self) -> bool:
        """Whether blocks of one batch can sit in different memory tiers (HBM and DRAM)."""
        return any(len(memory_tiers(n)) > 1 for n in self.index.nodes)

    def _locations(self, entries, out: common_pb2.Locations, op: int, grant_id: str, ttl_s: float,
                   tenant: str) -> None:
        """Fill ``out`` with where ``entries`` are, and a capability per node for ``op`` on
        behalf of ``tenant``."""
        if len(self.index.nodes) == 1:  # the embedded case: skip a pass over the batch
            node_ids = {next(iter(self.index.nodes)).node_id}
        else:
            node_ids = set(map(_node_of, entries))
        out.nodes.extend(self._endpoint(n) for n in sorted(node_ids))
        tiers = set(map(_tier_of, entries)) if self._several_memory_tiers() else {entries[0].mem_tier}
        sizes = {entries[0].size, entries[-1].size}  # one namespace: one block size
        if len(node_ids) == 1 and len(tiers) == 1 and len(sizes) == 1:
            first = entries[0]
            out.uniform.node_id = first.node_id
            out.uniform.tier = TIER_CODES[first.tier]
            out.uniform.size = first.size
            out.slots = b"".join(map(_loc_of, entries))
        else:
            out.records = b"".join(map(_record_of, entries))
        # The data plane's proof: per node, an HMAC over exactly the records the client sees.
        expires = expiry_ms(ttl_s)
        for node_id in sorted(node_ids):
            node = self.index.nodes.get(node_id)
            if node is None or not node.data_key:
                continue
            mine = entries if len(node_ids) == 1 else [e for e in entries if e.node_id == node_id]
            records = b"".join(map(_record_of, mine))
            out.caps.add(node_id=node_id, expires_unix_ms=expires, tenant=tenant,
                         mac=sign(node.data_key, op, grant_id, node_id, expires, records, tenant))


class PoolServicer(_Base, pool_pb2_grpc.KVPoolServicer):
    @rpc
    def RegisterNamespace(self, request, context):
        ns = namespace_from_proto(request.namespace)
        tenant = self._tenant()
        if tenant is not None and ns.tenant != tenant:
            raise PermissionDenied(f"RegisterNamespace: this token acts for tenant {tenant!r}, not {ns.tenant!r}; "
                                   f"set Namespace(tenant={tenant!r})")
        before = self.index.namespaces.get(ns.id)
        info = self.index.register_namespace(ns, request.replicas)
        resp = pool_pb2.RegisterNamespaceResponse(namespace_id=info.namespace.id, block_bytes=info.block_bytes,
                                                  replicas=self.index.replicas_of(info.namespace.id))
        if info is before or self.settings_durable is None:  # nothing new: no wait (every connect registers)
            return resp
        return self._after(self.settings_durable(), resp)

    @staticmethod
    async def _after(durable, resp):
        await durable
        return resp

    @rpc
    def PutStart(self, request, context):
        self._ns(request.namespace_id)
        keys = self.index.split_packed(request.keys, "PutStart")
        first = request.first_position if request.HasField("first_position") else None
        grant, statuses = self.index.put_start(request.namespace_id, keys, list(request.sizes), first, request.tier,
                                               request.client_host, request.exclude_nodes)
        resp = pool_pb2.PutStartResponse(put_id=grant.put_id, expires_in_ms=int(self.index.config.grant_ttl_s * 1000))
        resp.status.extend(statuses)
        if grant.entries:
            self._locations(list(grant.entries.values()), resp.grants, WRITE, grant.put_id,
                            self.index.config.grant_ttl_s, grant.tenant)
        return resp

    @rpc
    async def PutCommit(self, request, context):
        keys = self.index.split_packed(request.keys, "PutCommit") if request.keys else None
        committed, released = self.index.put_commit(request.put_id, keys, list(request.checksums), self._tenant())
        if self.admit_commit is not None:
            await self.admit_commit()
        return pool_pb2.PutCommitResponse(committed=committed, released=released)

    @rpc
    def PutAbort(self, request, context):
        return pool_pb2.PutAbortResponse(released=self.index.put_abort(request.put_id, self._tenant()))

    @rpc
    async def Lookup(self, request, context):
        self._ns(request.namespace_id)
        keys = self.index.split_packed(request.keys, "Lookup")
        if request.release_lease_ids:
            self.index.release(request.release_lease_ids, tenant=self._tenant())
        hits, lease = self.index.lookup(request.namespace_id, keys, lease=not request.count_only)
        if lease is not None:
            ok = await self._resident(lease, request.client_host)
            if ok is not None and not all(ok):
                # The hit ends at the first block that could not be made readable.
                hits = ok.index(False)
                lease = self.index.shrink_lease(lease, hits)
        resp = pool_pb2.LookupResponse(hit_blocks=hits)
        if lease is not None:
            self._locations(self._served(lease.entries, request.client_host), resp.locations, READ, lease.lease_id,
                            self.index.config.lease_ttl_s, self.index.namespace(request.namespace_id).tenant)
            resp.lease_id = lease.lease_id
            resp.lease_expires_in_ms = int(self.index.config.lease_ttl_s * 1000)
        return resp

    @rpc
    async def Get(self, request, context):
        self._ns(request.namespace_id)
        keys = self.index.split_packed(request.keys, "Get")
        if request.release_lease_ids:
            self.index.release(request.release_lease_ids, tenant=self._tenant())
        found, lease = self.index.get(request.namespace_id, keys)
        if lease is not None:
            ok = await self._resident(lease, request.client_host)
            if ok is not None and not all(ok):
                keep = [i for i, good in enumerate(ok) if good]
                found_at = [i for i, f in enumerate(found) if f]
                for j, good in enumerate(ok):
                    if not good:
                        found[found_at[j]] = False
                lease = self.index.shrink_lease(lease, keep)
        resp = pool_pb2.GetResponse(found=bytes(found))
        if lease is not None:
            self._locations(self._served(lease.entries, request.client_host), resp.locations, READ, lease.lease_id,
                            self.index.config.lease_ttl_s, self.index.namespace(request.namespace_id).tenant)
            resp.lease_id = lease.lease_id
            resp.lease_expires_in_ms = int(self.index.config.lease_ttl_s * 1000)
        return resp

    @rpc
    def Release(self, request, context):
        corrupt = self.index.split_packed(request.corrupt_keys, "Release") if request.corrupt_keys else ()
        released, dropped = self.index.release(request.lease_ids, corrupt, self._tenant())
        if dropped:
            log.warning("dropped %d blocks that a reader found corrupt (checksum mismatch)", dropped)
        return pool_pb2.ReleaseResponse(released=released, dropped_corrupt=dropped)

    @rpc
    async def Remove(self, request, context):
        keys = self.index.split_packed(request.keys, "Remove")
        if request.namespace_id:
            tenant = self._ns(request.namespace_id).tenant
        else:
            tenant = self._tenant() or ""
        holders = self._holders(e for k in keys if (e := self.index.entry(k, tenant)) is not None)
        removed, deferred = self.index.remove(keys, tenant)
        await self._durable_removal(holders, removed)
        return pool_pb2.RemoveResponse(removed=removed, deferred=deferred)

    @rpc
    def Stats(self, request, context):
        return self._stats(self._tenant())


def stats_response(index: BlockIndex, tenant: str | None = None) -> common_pb2.StatsResponse:
    """Pool statistics; with ``tenant``, the per-tenant rows show that tenant only."""
    c = index.counters
    resp = common_pb2.StatsResponse(
        blocks=index.block_count, bytes=index.committed_bytes(), hit_blocks=c.hit_blocks,
        miss_blocks=c.miss_blocks, put_blocks=c.put_blocks, dedup_blocks=c.dedup_blocks,
        evictions=sum(c.evictions.values()), pending_grants=index.pending_count,
        active_leases=index.lease_count, namespaces=len(index.namespaces), nodes=len(index.nodes),
        eviction_policy=index.config.eviction_policy, uptime_seconds=index.clock() - index.started,
        demoted_blocks=c.demoted_blocks, promoted_blocks=c.promoted_blocks,
        written_through_blocks=c.written_through_blocks, corrupt_blocks=c.corrupt_blocks, put_bytes=c.put_bytes,
        replicated_blocks=c.replicated_blocks,
    )
    for node in index.nodes:
        for u in node.usage():
            resp.tiers.add(tier=u.name, node_id=node.node_id, node_name=node.name, capacity_bytes=u.capacity_bytes,
                           used_bytes=u.used_bytes, blocks=index.tier_blocks(node.node_id, u.name),
                           evictions=c.evictions.get((node.node_id, u.name), 0))
    for who, tier, used, blocks, quota in index.tenant_usage():
        if tenant is None or who == tenant:
            row = resp.tenants.add(tenant=who, tier=tier, used_bytes=used, blocks=blocks)
            if quota is not None:
                row.quota_bytes = quota
    return resp


def block_detail(entry: Entry, now: float) -> admin_pb2.BlockDetail:
    return admin_pb2.BlockDetail(
        key=entry.client_key, tenant=entry.tenant, namespace_id=entry.ns, state=entry.state, node_id=entry.node_id,
        tier=TIER_CODES[entry.tier], offset=entry.slot.offset, size=entry.slot.size,
        checksum=entry.checksum, leases=entry.pins, hits=entry.hits,
        age_seconds=now - entry.created, idle_seconds=now - entry.last_access, position=entry.position,
        copies=[admin_pb2.BlockCopy(node_id=c.node_id, tiers=[TIER_CODES[t] for t in c.tiers]) for c in entry.copies],
    )


def _transport_summary(ep) -> dict[str, str]:
    """What a node offers clients, for operators: segment names and addresses, not secrets."""
    out = {f"{s.kind}.{s.tier}": (s.handle if s.kind == "shm" else "(handle)") for s in ep.segments}
    if ep.tcp_address:
        out["tcp"] = ep.tcp_address
    out.update({f"ucx.{r.tier}": "(registered)" for r in ep.ucx_regions})
    out["host"] = ep.host_id
    return out


class AdminServicer(_Base, admin_pb2_grpc.AdminServicer):
    #: The master's KV events (kvpool.master.events.EventPublisher), set by the server.
    events = None

    @rpc
    def ListBlocks(self, request, context):
        if request.namespace_id:
            self._ns(request.namespace_id)
        limit = request.limit or 100
        now = self.index.clock()
        resp = admin_pb2.ListBlocksResponse()
        total = 0
        tenant = self._tenant()
        if tenant is None and request.HasField("tenant"):
            tenant = request.tenant
        for entry in self.index.entries(request.namespace_id, tenant):
            if request.offset <= total < request.offset + limit:
                resp.blocks.append(block_detail(entry, now))
            total += 1
        resp.total = total
        return resp

    @rpc
    def Inspect(self, request, context):
        if len(request.key) != KEY_BYTES:
            raise InvalidArgument(f"Inspect: a block key is 16 bytes (32 hex digits); got {len(request.key)} bytes")
        tenant = self._tenant()
        entry = self.index.entry(request.key, request.tenant if tenant is None else tenant)
        if entry is None:
            raise NotFound(f"Inspect: block {request.key.hex()} is not in the pool")
        return admin_pb2.InspectResponse(block=block_detail(entry, self.index.clock()))

    @rpc
    async def Evict(self, request, context):
        if not request.all and request.bytes == 0:
            raise InvalidArgument("Evict: say how much: set bytes > 0, or all=true")
        want = None if request.all else request.bytes
        if self.tiering is not None and any(self.tiering.has_nvme(n) for n in self.index.nodes):
            # With an NVMe tier, evicting DRAM means demoting: nothing is lost.
            blocks = freed = 0
            for node in self.index.nodes:
                if self.tiering.has_nvme(node):
                    b, f = await self.tiering.demote(node, None if want is None else max(0, want - freed))
                    blocks, freed = blocks + b, freed + f
            leased = sum(1 for e in self.index.entries() if e.pins)
        else:
            blocks, freed, leased = self.index.evict(want)
        return admin_pb2.EvictResponse(blocks=blocks, bytes=freed, skipped_leased=leased)

    @rpc
    async def Flush(self, request, context):
        holders = {n.node_id for n in self.index.nodes}
        removed, deferred = self.index.flush(request.namespace_id)
        await self._durable_removal(holders, removed)
        return admin_pb2.FlushResponse(removed=removed, deferred=deferred)

    @rpc
    def Stats(self, request, context):
        return self._stats()

    @rpc
    def ListNodes(self, request, context):
        now = self.index.clock()
        resp = admin_pb2.ListNodesResponse()
        stats = stats_response(self.index)
        for node in self.index.nodes:
            last_seen = node.last_seen  # None: the node inside this process, which does not beat
            info = resp.nodes.add(
                node_id=node.node_id, name=node.name, in_process=last_seen is None,
                control_address=node.control_address,
                seconds_since_heartbeat=0.0 if last_seen is None else now - last_seen,
                transports=_transport_summary(node.endpoint()),
                unapplied_changes=node.unapplied_changes,
                draining=node.node_id in self.index.draining,
            )
            info.tiers.extend(t for t in stats.tiers if t.node_id == node.node_id)
        return resp

    @rpc
    async def Drain(self, request, context):
        drainer = Drainer(self.index, self.tiering)
        node = drainer.find(request.node)
        if request.resume:
            drainer.resume(node)
            report = DrainReport(node, remaining=sum(1 for e in self.index.entries() if e.node_id == node.node_id))
        else:
            report = await drainer.drain(node, drop=request.drop, max_blocks=request.max_blocks or DEFAULT_BATCH)
        return admin_pb2.DrainResponse(
            node_id=node.node_id, node_name=node.name, moved=report.moved, moved_bytes=report.moved_bytes,
            dropped=report.dropped, remaining=report.remaining, leased=report.leased,
            draining=node.node_id in self.index.draining, failed=report.failed, first_error=report.first_error)

    async def SubscribeEvents(self, request, context):
        """Streams KV event batches, narrowed to the caller's tenant for a client token
        (kvpool.master.events); ends when the master stops or the caller goes away."""
        if self.events is None:
            await context.abort(grpc.StatusCode.UNAVAILABLE, "SubscribeEvents: this master publishes no events")
        sub = self.events.subscribe(self._tenant())
        try:
            # Headers now, so a subscriber knows when it is subscribed (before any event).
            await context.send_initial_metadata(())
            while (batch := await sub.queue.get()) is not None:
                seq, payload = batch
                yield admin_pb2.EventBatch(seq=seq, payload=payload)
        finally:
            self.events.unsubscribe(sub)
    @rpc
    async def Namespaces(self, request, context):
        index = self.index
        if request.HasField("set_replicas"):
            if not request.namespace_id:
                raise InvalidArgument("Namespaces: set_replicas needs namespace_id (see kvpool admin namespaces)")
            index.set_replicas(request.namespace_id, request.set_replicas)
            if self.settings_durable is not None:  # the next leader has the setting
                await self.settings_durable()
        elif request.namespace_id:
            index.namespace(request.namespace_id)  # NOT_FOUND, naming RegisterNamespace
        blocks: dict[str, int] = {}
        for entry in index.entries(request.namespace_id):
            blocks[entry.ns] = blocks.get(entry.ns, 0) + 1
        resp = admin_pb2.NamespacesResponse(default_replicas=index.config.replicas)
        for ns_id, info in index.namespaces.items():
            if request.namespace_id and ns_id != request.namespace_id:
                continue
            resp.namespaces.add(namespace_id=ns_id, model=info.namespace.model, tenant=info.tenant,
                                block_bytes=info.block_bytes, replicas=index.replicas_of(ns_id),
                                replicas_default=not info.replicas, blocks=blocks.get(ns_id, 0))
        return resp
