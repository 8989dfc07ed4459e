"""Nodes in other processes: the master's side of the master <-> node services (node.proto).

:class:`RemoteNode` is a :class:`~kvpool.master.nodes.NodeHandle` for a node reached over
gRPC. It mirrors the node's memory tiers with :class:`SlabAllocator` bookkeeping of the
same geometry, so allocation and free stay synchronous and local to the master, exactly as
for the node inside ``kvpool serve``; only tier movement (demote, promote, drop) crosses
the network. The node reports its NVMe usage with every reply and heartbeat.

:class:`RegistryServicer` lets nodes join. Every registration is a new incarnation with a
new node id: the index forgets everything about an earlier incarnation of the same node
(its memory is gone) and adopts what the node found on its NVMe. A node that misses its
heartbeats is forgotten the same way.

**Nodes are the truth for their bytes.** Every change to which memory slot holds which
committed block is journaled here, numbered, and sent to the node on the answer to its next
heartbeats until the node says it applied it (:mod:`kvpool.node.resident`). A node whose
master restarted registers with the memory blocks it still holds, and they are served again.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time

import grpc

from kvpool.auth import bearer_metadata, current_caller
from kvpool.capability import KEY_BYTES as DATA_KEY_BYTES
from kvpool.errors import FailedPrecondition, InvalidArgument, Unavailable
from kvpool.identity import KEY_BYTES, MAX_TENANT_BYTES
from kvpool.master.index import BlockIndex
from kvpool.master.metastore import BlockRecord
from kvpool.master.tombstones import Tombstones
from kvpool.metrics import Metrics
from kvpool.rpc.v1 import node_pb2, node_pb2_grpc
from kvpool.master.handlers import rpc
from kvpool.tls import TlsFiles, open_aio_channel
from kvpool.tiers.base import SlabAllocator, Slot, TierCaps, TierUsage
from kvpool.tiers.moves import DemoteResult, PromoteResult
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.wire import TIER_CODES

__all__ = ["RemoteNode", "RegistryServicer"]

log = logging.getLogger("kvpool.master")


class RemoteNode:
    """A node in another process, reached through its NodeControl service."""

    #: It can pull blocks from another node's data server (kvpool.master.replication).
    pulls_replicas = True

    def __init__(self, node_id: int, request: node_pb2.RegisterNodeRequest, clock=time.monotonic,
                 epoch: int = 0, tls: TlsFiles | None = None) -> None:
        self.node_id = node_id
        #: The master's fencing epoch, sent with every request: the node refuses older ones.
        self.epoch = epoch
        self.tls = tls
        self.name = request.name
        self.incarnation = request.incarnation
        self.control_address = request.control_address
        self._clock = clock
        self.last_seen = clock()
        self._tiers = [t.tier for t in request.tiers]
        self._caps = {t.tier: TierCaps(t.caps) for t in request.tiers}
        # Memory tiers are mirrored here (the master allocates their slots); the durable tier's
        # slots belong to the node's mover, which reports its use.
        self._memory = {t.tier: SlabAllocator(t.capacity_bytes, t.chunk_bytes)
                        for t in request.tiers if TierCaps.PERSISTENT not in self._caps[t.tier]}
        self._nvme: TierUsage | None = None
        for t in request.tiers:
            self._update_nvme(t)
        self._endpoint = NodeEndpoint.from_proto(request.endpoint).with_id(node_id)
        self.data_key = request.data_key
        self._recovered = [(b.key, Slot(b.offset, b.size), b.checksum, b.namespace_id) for b in request.nvme_blocks]
        # Changes to the node's memory slots not yet applied by the node: (tier, slot, entry
        # or None). _journal[0] has sequence number _journal_base + 1.
        self._journal: list[tuple[str, Slot, object]] = []
        self._journal_base = 0
        #: The master calls the node back with the token the node registered with (if any).
        self.token = ""
        #: The registry's tombstones (kvpool.master.tombstones), told of confirmed NVMe drops.
        self.tombstones = None
        # Opened at the first tier movement, on the event loop that needs it.
        self._channel: grpc.aio.Channel | None = None
        self._stub: node_pb2_grpc.NodeControlStub | None = None

    def _update_nvme(self, t: node_pb2.TierGeometry) -> None:
        if TierCaps.PERSISTENT in TierCaps(t.caps) and t.capacity_bytes:
            self._nvme = TierUsage(t.tier, t.capacity_bytes, t.used_bytes, t.used_slots)

    def heartbeat(self, tiers) -> None:
        self.last_seen = self._clock()
        for t in tiers:
            self._update_nvme(t)

    # NodeHandle: slots (mirrored here) ---------------------------------------

    def tier_names(self) -> list[str]:
        return list(self._tiers)

    def tier_caps(self) -> dict[str, TierCaps]:
        return dict(self._caps)

    def allocate(self, tier: str, size: int) -> Slot | None:
        return self._memory[tier].allocate(size)

    def free(self, tier: str, slot: Slot) -> None:
        self._memory[tier].free(slot)
        self._journal.append((tier, slot, None))

    def note_resident(self, entries) -> None:
        # Only a reference here: the change is encoded when a heartbeat carries it, off the
        # put's path. The slot is copied now, since the entry's memory copy can move later.
        self._journal.extend((e.mem_tier, e.mem, e) for e in entries)

    def claim(self, tier: str, slot: Slot) -> bool:
        """Take a slot the node reports holding a committed block (master restart)."""
        allocator = self._memory.get(tier)
        if allocator is None:
            return False
        try:
            allocator.claim(slot)
        except (ValueError, RuntimeError):
            return False
        return True

    # The journal of memory-slot changes ------------------------------------------

    @property
    def journal_seq(self) -> int:
        """The sequence number of the newest change."""
        return self._journal_base + len(self._journal)

    @property
    def unapplied_changes(self) -> int:
        return len(self._journal)

    @property
    def applied_seq(self) -> int:
        """The sequence number of the newest change the node has applied."""
        return self._journal_base

    def applied(self, seq: int) -> None:
        """The node applied every change up to ``seq``: stop resending them."""
        done = min(max(0, seq - self._journal_base), len(self._journal))
        if done:
            del self._journal[:done]
            self._journal_base += done

    def changes(self, limit: int = 65536) -> tuple[list[node_pb2.ResidentBlock], int, bool]:
        """The oldest unapplied changes (at most ``limit``), the last one's number, and
        whether more wait."""
        batch = self._journal[:limit]
        out = []
        for tier, slot, entry in batch:
            if entry is None:
                out.append(node_pb2.ResidentBlock(tier=tier, offset=slot.offset, size=slot.size))
            else:
                out.append(node_pb2.ResidentBlock(tier=tier, offset=slot.offset, size=slot.size, key=entry.key,
                                                  checksum=entry.checksum, namespace_id=entry.ns))
        return out, self._journal_base + len(batch), len(self._journal) > limit

    def free_slots_for(self, tier: str, size: int) -> int:
        if tier in self._memory:
            return self._memory[tier].free_slots_for(size)
        return 0 if self._nvme is None else self._nvme.free_bytes // size

    def usage(self) -> list[TierUsage]:
        out = [TierUsage(name, a.capacity, a.used_bytes, a.used_slots) for name, a in self._memory.items()]
        if self._nvme is not None:
            out.append(self._nvme)
        return out

    def endpoint(self) -> NodeEndpoint:
        return self._endpoint

    def recover(self) -> list[tuple[bytes, Slot, int, str]]:
        recovered, self._recovered = self._recovered, []
        return recovered

    def recover_memory(self, blocks) -> list[tuple[bytes, Slot, int, str, str]]:
        """Claim the slots of the memory blocks a node reported at registration; returns the
        (key, slot, checksum, namespace, tier) of those claimed. A slot that cannot be
        claimed (off the grid, overlapping) is told to the node as empty."""
        out = []
        for b in blocks:
            slot = Slot(b.offset, b.size)
            if len(b.key) == 16 and self.claim(b.tier, slot):
                out.append((b.key, slot, b.checksum, b.namespace_id, b.tier))
            else:
                self._journal.append((b.tier, slot, None))
        return out

    # NodeHandle: tier movement (over gRPC) ----------------------------------

    async def _call(self, name: str, request):
        try:
            if self._stub is None:
                self._channel = open_aio_channel(self.control_address, self.tls)
                self._stub = node_pb2_grpc.NodeControlStub(self._channel)
            return await getattr(self._stub, name)(request, timeout=60, metadata=bearer_metadata(self.token))
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"node {self.name} ({self.control_address}) did not answer {name}: "
                              f"{exc.code().name}: {exc.details()}") from None

    async def demote(self, items, *, keep_dram: bool) -> DemoteResult:
        req = node_pb2.DemoteRequest(keep_memory=keep_dram, epoch=self.epoch, items=[
            node_pb2.MoveItem(key=k, offset=s.offset, size=s.size, checksum=c, namespace_id=ns)
            for k, s, c, ns in items])
        resp = await self._call("Demote", req)
        self._update_nvme(resp.nvme)
        return DemoteResult(moved=[(b.key, Slot(b.offset, b.size)) for b in resp.moved],
                            no_space=list(resp.no_space),
                            failed=[(k, resp.first_error) for k in resp.failed], keep_dram=keep_dram)

    async def promote(self, items) -> PromoteResult:
        req = node_pb2.PromoteRequest(epoch=self.epoch, items=[
            node_pb2.MoveItem(key=k, offset=s.offset, size=s.size, checksum=c, target_offset=d.offset)
            for k, s, c, d in items])
        resp = await self._call("Promote", req)
        self._update_nvme(resp.nvme)
        return PromoteResult(promoted=list(resp.promoted),
                             corrupt=list(zip(resp.corrupt, resp.corrupt_reasons)))

    async def drop_nvme(self, items) -> None:
        req = node_pb2.DropNvmeRequest(epoch=self.epoch, blocks=[node_pb2.StoredBlock(key=k, offset=s.offset, size=s.size)
                                               for k, s in items])
        resp = await self._call("DropNvme", req)
        self._update_nvme(resp.nvme)
        if self.tombstones is not None:
            self.tombstones.nvme_dropped(self, items)

    async def push_changes(self) -> None:
        """Have the node apply every change journaled so far now (``ApplyChanges``), instead
        of with the answer to its next heartbeat."""
        while self._journal:
            changes, seq, _ = self.changes()
            resp = await self._call("ApplyChanges", node_pb2.ApplyChangesRequest(
                epoch=self.epoch, changes=changes, changes_seq=seq))
            self.applied(resp.applied_seq)
            if resp.applied_seq < seq:  # cannot happen with a node of this release; do not spin
                break
        if self.tombstones is not None:
            self.tombstones.confirm(self)

    async def verify(self, records) -> set[bytes]:
        """Which of these memory blocks (Redis records) the node holds, bytes checked."""
        req = node_pb2.VerifyBlocksRequest(epoch=self.epoch, blocks=[
            node_pb2.ResidentBlock(tier=r.tier, offset=r.offset, size=r.size, key=r.key, checksum=r.checksum,
                                   namespace_id=r.namespace_id) for r in records])
        return set((await self._call("VerifyBlocks", req)).held)

    async def pull(self, source: NodeEndpoint, access, tier: str, slots, keys=(), namespace_ids=()) -> list[int]:
        req = node_pb2.PullRequest(tier=tier, records=access.records, grant_id=access.grant_id,
                                   expires_unix_ms=access.expires_unix_ms, mac=access.mac,
                                   target_offsets=[s.offset for s in slots], tenant=access.tenant,
                                   epoch=self.epoch, keys=keys, namespace_ids=namespace_ids)
        source.fill(req.source)
        resp = await self._call("Pull", req)
        return list(resp.corrupt)

    async def move_tier(self, items, source_tier: str, target_tier: str) -> tuple[list[bytes], list[bytes]]:
        req = node_pb2.MoveTierRequest(epoch=self.epoch, source_tier=source_tier, target_tier=target_tier, items=[
            node_pb2.MoveItem(key=k, offset=src.offset, size=src.size, checksum=c, namespace_id=ns,
                              target_offset=dst.offset) for k, src, c, ns, dst in items])
        resp = await self._call("MoveTier", req)
        return list(resp.moved), list(resp.corrupt)

    async def disconnect(self) -> None:
        if self._channel is not None:
            await self._channel.close()


class RegistryServicer(node_pb2_grpc.RegistryServicer):
    """Nodes join, heartbeat, and are forgotten when they restart or go silent."""

    def __init__(self, index: BlockIndex, metrics: Metrics, *, heartbeat_interval: float = 1.0,
                 missed_heartbeats: int = 5, tls: TlsFiles | None = None) -> None:
        self.index = index
        self.tls = tls  # how the master reaches nodes' control services
        self.metrics = metrics
        self.heartbeat_interval = heartbeat_interval
        self.missed_heartbeats = missed_heartbeats
        # Ids below 100 are for nodes inside this process. Clients cache a node's endpoint
        # by id, so ids must not repeat across masters either: a master that restarts or
        # takes over starts at a random point of the u32 range (with Redis: a block of ids
        # of its own, see kvpool.server).
        self._next_id = 100 + secrets.randbelow(1 << 31)
        self._closing: list[RemoteNode] = []
        #: The nodes this registry admitted (its own records: no need to tell handle kinds apart).
        self._joined: dict[int, RemoteNode] = {}
        #: The fencing epoch of this master (0 without Redis).
        self.epoch = 0
        #: Redis metadata (kvpool.master.metastore), when the master has it.
        self.meta = None
        #: Blocks Redis lists, by node name, not yet reconciled with that node's report.
        self.candidates: dict[str, list] = {}
        #: Copies of removed blocks that their nodes may still report (kvpool.master.tombstones).
        self.tombstones = Tombstones(self._joined.get)
        index.observers.append(self.tombstones)

    def first_node_id(self, first: int) -> None:
        """Number the nodes that register from here on from ``first``."""
        self._next_id = first

    def _remote_nodes(self) -> list[RemoteNode]:
        return list(self._joined.values())

    def _forget(self, node: RemoteNode, why: str) -> None:
        # A node that was only cut off (same process) comes back with the blocks it knows of;
        # those committed since its last applied change are checked against it then.
        self.candidates.setdefault(node.name, []).extend(
            BlockRecord(e.key, c.mem_tier, c.mem.offset, c.mem.size, e.checksum, node.name, node.incarnation, e.ns)
            for e in self.index.entries() if e.node_id == node.node_id and (c := e.copies[0]).mem is not None)
        forgotten = self.index.forget_node(node.node_id)
        self.index.nodes.remove(node.node_id)
        self._joined.pop(node.node_id, None)
        self._closing.append(node)
        log.warning("node %s (id %d) %s: forgot its %d blocks", node.name, node.node_id, why, forgotten)

    @staticmethod
    def _check(request: node_pb2.RegisterNodeRequest) -> None:
        """Refuse a registration the master could not act on, before it replaces anything."""
        if not request.name or not request.incarnation:
            raise InvalidArgument("RegisterNode: a node sends its name and incarnation")
        names = [t.tier for t in request.tiers]
        if not names or len(set(names)) != len(names) or not set(names) <= TIER_CODES.keys():
            raise InvalidArgument(f"RegisterNode: tiers must be distinct ones of {', '.join(TIER_CODES)}; "
                                  f"got {names}")
        for t in request.tiers:
            # Memory tiers are mirrored here in slabs; the persistent tier's slots are the node's.
            slabbed = TierCaps.PERSISTENT not in TierCaps(t.caps)
            if t.capacity_bytes == 0 or (slabbed and not 0 < t.chunk_bytes <= t.capacity_bytes):
                raise InvalidArgument(f"RegisterNode: tier {t.tier} needs a capacity and a chunk size "
                                      f"(0 < chunk_bytes <= capacity_bytes)")
        if request.data_key and len(request.data_key) != DATA_KEY_BYTES:
            raise InvalidArgument(f"RegisterNode: data_key is {DATA_KEY_BYTES} bytes; got {len(request.data_key)}")
        for b in request.nvme_blocks:
            if not KEY_BYTES <= len(b.key) <= KEY_BYTES + MAX_TENANT_BYTES or b.size == 0:
                raise InvalidArgument("RegisterNode: an NVMe block needs a 16-byte key (and a tenant) and a size")

    @rpc
    async def RegisterNode(self, request, context):
        if request.epoch > self.epoch:
            # Refuse, and let the lease say whether this master still leads (it renews every
            # third of a TTL): a node's word alone does not depose a leader.
            raise FailedPrecondition(
                f"RegisterNode: this master's epoch {self.epoch} is older than the epoch {request.epoch} the node "
                f"has seen: another master leads; register with it")
        self._check(request)
        for old in self._remote_nodes():
            if old.name == request.name or old.control_address == request.control_address:
                self._forget(old, "registered again (restarted)")
        node_id = self._next_id
        self._next_id += 1
        node = RemoteNode(node_id, request, self.index.clock, epoch=self.epoch, tls=self.tls)
        caller = current_caller()
        node.token = caller.token if caller is not None else ""
        node.tombstones = self.tombstones
        self.index.nodes.add(node)
        self._joined[node_id] = node
        # Blocks removed while the node had not applied it yet are not adopted again.
        memory, nvme, dead_memory, dead_nvme = self.tombstones.sift(node, request.memory_blocks, node.recover())
        in_memory = self.index.adopt_memory(node_id, node.recover_memory(memory))
        adopted = self.index.adopt(node_id, nvme)
        if self.meta is not None:
            self.meta.node_joined(node.name, node.control_address, node.incarnation)
        in_memory += await self._reconcile(node)
        self.tombstones.free_on(node, dead_memory, dead_nvme, self.index.nvme_drops)
        log.info("node %s joined as id %d at %s; %d blocks in its memory, %d on its NVMe", node.name, node_id,
                 request.control_address, in_memory, adopted)
        return node_pb2.RegisterNodeResponse(node_id=node_id, heartbeat_interval_s=self.heartbeat_interval,
                                             epoch=self.epoch)

    async def _reconcile(self, node: RemoteNode) -> int:
        """Serve blocks this node may hold in memory without knowing it (their change had not
        reached it): those Redis lists for it (the master before this one died), and those
        this master forgot when it declared the node dead. Each is served again only if the
        node is the same process and its slot holds bytes with the recorded checksum. Other
        records are forgotten."""
        records = self.candidates.pop(node.name, [])
        if not records:
            return 0
        memory = {t for t, caps in node.tier_caps().items() if TierCaps.PERSISTENT not in caps}
        # Their slots are claimed before the node is asked (an await): a put placed on this
        # node meanwhile (the leader may serve by then) must not get a slot that holds one.
        ours = [r for r in records if r.incarnation == node.incarnation and r.tier in memory
                and self.index.entry(r.key) is None and node.claim(r.tier, Slot(r.offset, r.size))]
        held: set[bytes] = set()
        if ours:
            try:
                held = await node.verify(ours)
            except Unavailable as exc:
                log.warning("cannot reconcile node %s with Redis: %s", node.name, exc)
        for r in ours:
            if r.key not in held:
                node.free(r.tier, Slot(r.offset, r.size))  # not there after all: the slot is free
        blocks = [(r.key, Slot(r.offset, r.size), r.checksum, r.namespace_id, r.tier) for r in ours
                  if r.key in held]
        adopted = self.index.adopt_memory(node.node_id, blocks)
        served = {b[0] for b in blocks}
        if self.meta is not None:  # records of an earlier incarnation, and blocks the node no longer holds, go
            self.meta.forget(r.key for r in records if r.key not in served and self.index.entry(r.key) is None)
        if adopted:
            log.info("node %s: %d blocks from Redis confirmed by the node and served again", node.name, adopted)
        return adopted

    @rpc
    def Heartbeat(self, request, context):
        node = self._joined.get(request.node_id)
        if node is None or node.incarnation != request.incarnation:
            return node_pb2.HeartbeatResponse(register_again=True)
        node.heartbeat(request.tiers)
        node.applied(request.applied_seq)
        self.tombstones.confirm(node)
        changes, seq, more = node.changes()
        return node_pb2.HeartbeatResponse(changes=changes, changes_seq=seq, more=more, epoch=self.epoch)

    async def push_removals(self, node_ids, timeout: float = 5.0) -> None:
        """Make removals durable at the nodes that held the blocks before a client hears that
        they are done: the changes that free their memory slots are applied now
        (``ApplyChanges``), their NVMe copies dropped now. Without Redis this is what keeps a
        removed block from coming back after a master restart (the node would report it).
        A node that does not answer within ``timeout`` learns of it with its next heartbeat.
        A leased block's storage is freed at its last release, so this cannot cover it."""
        async def one(node: RemoteNode) -> None:
            drops = self.index.nvme_drops.pop(node.node_id, [])
            try:
                await asyncio.wait_for(node.push_changes(), timeout)
                if drops:
                    await asyncio.wait_for(node.drop_nvme(drops), timeout)
            except (Unavailable, asyncio.TimeoutError) as exc:
                log.warning("node %s did not confirm a removal (%s); it applies it with its next heartbeat",
                            node.name, str(exc) or "timed out")
                if drops:  # the tiering task tries again
                    self.index.nvme_drops.setdefault(node.node_id, []).extend(drops)

        nodes = [n for n in (self._joined.get(i) for i in set(node_ids)) if n is not None]
        if nodes:
            await asyncio.gather(*(one(n) for n in nodes))

    async def sweep(self) -> None:
        """Forget nodes that stopped sending heartbeats; close channels of forgotten ones."""
        deadline = self.index.clock() - self.heartbeat_interval * self.missed_heartbeats
        for node in self._remote_nodes():
            if node.last_seen < deadline:
                self._forget(node, f"missed {self.missed_heartbeats} heartbeats")
        closing, self._closing = self._closing, []
        for node in closing:
            await node.disconnect()
