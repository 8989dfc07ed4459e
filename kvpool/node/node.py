"""A storage node: owns the tier arenas and tells clients how to reach them.

The node holds memory and disk; the master holds metadata. The master reserves and frees
DRAM slots through the :class:`kvpool.master.nodes.NodeHandle` interface, which
:class:`Node` implements, and asks it to move blocks between its tiers (``demote``,
``promote``, ``drop_nvme``). Clients copy bytes straight into the DRAM arena over the
data plane: clients on the node's host map it (shared memory, CUDA IPC), clients on other
hosts go through the node's TCP data server, or UCX where it is on (:meth:`serve_data`).
:meth:`endpoint` describes all of it, for the master to hand to clients.

The data server checks the capability the master signed for each transfer, under the data
key the node makes for each registration (:mod:`kvpool.capability`); ``set_identity``
installs the id and key the master knows the node by.

With an NVMe tier, the node's :class:`~kvpool.node.mover.TierMover` does the I/O and keeps
the LMDB catalog, so blocks on NVMe survive a restart: ``recover()`` reports them.

Invariant: ``close()`` unlinks every shared-memory segment the node created, so a clean
shutdown leaves nothing in /dev/shm.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
from typing import Sequence

import numpy as np
import xxhash

from kvpool.capability import new_data_key
from kvpool.node.catalog import NvmeCatalog
from kvpool.node.mover import DemoteItem, DemoteResult, PromoteItem, PromoteResult, TierMover
from kvpool.node.resident import ResidentBlock, ResidentMap
from kvpool.tiers.base import Arena, Slot, TierCaps, TierUsage
from kvpool.tiers.dram import DramArena
from kvpool.tiers.nvme import NvmeArena
from kvpool.transport.base import Access, BlockIntegrityError, Share, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint, SharedSegment
from kvpool.transport.shm import host_id
from kvpool.transport.tcp import TcpTransport
from kvpool.wire import unpack_records

__all__ = ["Node"]

log = logging.getLogger("kvpool.node")


class Node:
    #: The node inside ``kvpool serve`` shares its master's fate, so it takes no replicas,
    #: has no incarnation of its own and needs no journal of its memory slots.
    pulls_replicas = False
    incarnation = ""
    unapplied_changes = 0

    def __init__(self, node_id: int, name: str, tiers: list[Arena], mover: TierMover | None = None) -> None:
        if not tiers:
            raise ValueError("a node needs at least one tier")
        self.node_id = node_id
        self.name = name
        self.tiers: dict[str, Arena] = {t.name: t for t in tiers}
        self.mover = mover
        self._ipc_handle: str | None = None
        #: Key of this node's data-plane capabilities (kvpool.capability), shared with the master.
        self.data_key = new_data_key()
        self.data_server = None
        self.ucx = None
        #: Client-side TLS context for the data ports of other nodes this node pulls from.
        self.peer_tls = None
        self._endpoint: NodeEndpoint | None = None
        #: Committed blocks in the memory tiers, as the master reported them (kvpool.node.resident).
        self.resident = ResidentMap()
        #: The highest fencing epoch of a master seen; requests of lower epochs are refused.
        self.epoch = 0
        if mover is not None:
            self.tiers[mover.nvme.name] = mover.nvme

    @classmethod
    def with_dram(cls, node_id: int, name: str, dram_bytes: int, *, chunk_bytes: int = 64 << 20,
                  prefault: bool = True) -> "Node":
        return cls(node_id, name, [DramArena(dram_bytes, chunk_bytes=chunk_bytes, prefault=prefault)])

    @classmethod
    def build(cls, node_id: int, name: str, *, dram_bytes: int, nvme_bytes: int = 0, hbm_bytes: int = 0,
              data_dir: str = ".", chunk_bytes: int = 64 << 20, prefault: bool = True) -> "Node":
        """A node with a DRAM tier and, if asked, an HBM tier (needs CUDA) and an NVMe tier
        in ``data_dir/nvme``. Tiers are listed fastest first."""
        made: list[Arena] = []
        try:
            if hbm_bytes:
                from kvpool.tiers.hbm import HbmArena

                made.append(HbmArena(hbm_bytes, chunk_bytes=chunk_bytes))
            dram = DramArena(dram_bytes, chunk_bytes=chunk_bytes, prefault=prefault)
            made.append(dram)
            mover = None
            if nvme_bytes:
                # data_dir/nvme/ holds the slot file (NvmeArena) and the LMDB catalog.
                nvme = NvmeArena(data_dir, nvme_bytes, chunk_bytes=chunk_bytes)
                mover = TierMover(dram, nvme, NvmeCatalog(os.path.join(data_dir, "nvme")))
        except BaseException:
            for arena in made:
                arena.close()
            raise
        return cls(node_id, name, made, mover)

    # NodeHandle: slots --------------------------------------------------------

    #: NodeHandle: the master calls this node in its own process, and it sends no heartbeats.
    control_address = ""
    last_seen = None

    def tier_names(self) -> list[str]:
        return list(self.tiers)

    def tier_caps(self) -> dict[str, TierCaps]:
        return {name: arena.caps for name, arena in self.tiers.items()}

    async def disconnect(self) -> None:
        """NodeHandle: nothing to release; the process that owns the node closes it."""

    def allocate(self, tier: str, size: int) -> Slot | None:
        return self._memory_tier(tier).allocate(size)

    def free(self, tier: str, slot: Slot) -> None:
        self._memory_tier(tier).free(slot)

    def _memory_tier(self, tier: str) -> Arena:
        arena = self.tiers[tier]
        if TierCaps.PERSISTENT in arena.caps:
            # NVMe slots belong to the mover: a slot is allocated iff the catalog names it.
            raise ValueError(f"{tier} slots are allocated and freed only by the tier mover")
        return arena

    def free_slots_for(self, tier: str, size: int) -> int:
        return self.tiers[tier].slots.free_slots_for(size)

    def note_resident(self, entries) -> None:
        # A node inside the master's process dies with its master: nothing to remember.
        pass

    def usage(self) -> list[TierUsage]:
        return [t.usage() for t in self.tiers.values()]

    def endpoint(self) -> NodeEndpoint:
        if self._endpoint is None:
            self._endpoint = self._describe()
        return self._endpoint

    def _describe(self) -> NodeEndpoint:
        segments: list[SharedSegment] = []
        for arena in self.tiers.values():
            if TierCaps.HOST_SHARED in arena.caps:
                segments.append(SharedSegment(arena.name, "shm", arena.describe()["shm_name"], arena.capacity))
            if TierCaps.CUDA_IPC in arena.caps:
                if self._ipc_handle is None:  # export once: every client maps the same handle
                    self._ipc_handle = json.dumps(arena.ipc_handle().to_dict(), sort_keys=True)
                segments.append(SharedSegment(arena.name, "cuda_ipc", self._ipc_handle, arena.capacity))
        ucx_address, ucx_regions = self.ucx.describe() if self.ucx is not None else (b"", [])
        return NodeEndpoint(node_id=self.node_id, name=self.name, host_id=host_id(), segments=tuple(segments),
                            tcp_address=self.data_server.address if self.data_server is not None else "",
                            tcp_tls=self.data_server is not None and self.data_server.tls is not None,
                            ucx_worker_address=ucx_address, ucx_regions=tuple(ucx_regions))

    # Data plane for other hosts --------------------------------------------------

    def host_arenas(self) -> dict[str, np.ndarray]:
        """Host-memory tiers a network data plane can serve: tier name -> the arena's bytes."""
        return {name: arena.array for name, arena in self.tiers.items()
                if TierCaps.ADDRESSABLE in arena.caps and TierCaps.DEVICE not in arena.caps}

    def serve_data(self, host: str, port: int = 0, *, advertise_host: str | None = None,
                   ucx: bool = False, tls=None, peer_tls=None) -> None:
        """Start the TCP data server (and, with ``ucx``, register the arenas with UCX).
        ``tls`` (an ``ssl.SSLContext`` for the server side) makes the data port TLS only;
        ``peer_tls`` (client side, :func:`kvpool.tls.peer_context`) is how this node dials the
        data ports of the nodes it copies from (:meth:`peer_options`).

        Capabilities are checked against ``node_id`` and ``data_key``; call
        :meth:`set_identity` when the master assigns new ones.
        """
        from kvpool.node.data_server import DataServer

        self._endpoint = None
        self.peer_tls = peer_tls
        if port >= 0:
            self.data_server = DataServer(self.host_arenas(), host, port, advertise_host=advertise_host, tls=tls)
            self.data_server.set_identity(self.node_id, self.data_key)
            self.data_server.start()
        if ucx:
            from kvpool.node.ucx_server import UcxArenaServer

            ok, reason = UcxArenaServer.available()
            if not ok:
                log.warning("UCX data plane off: %s", reason)
            else:
                self.ucx = UcxArenaServer(self.host_arenas())
                self.ucx.start()

    def peer_options(self) -> TransportOptions:
        """Options for the transports this node opens to copy from another node's data server
        (a drain's pull, a replica). Nodes of one pool share their TLS files, so a peer whose
        data port is TLS-only is dialled with this node's own CA and certificate; without
        them the transport refuses a TLS peer (it never falls back to plaintext)."""
        return TransportOptions(tls=self.peer_tls)

    def set_identity(self, node_id: int, data_key: bytes) -> None:
        """The id and capability key the master knows this node incarnation by."""
        self.node_id, self.data_key = node_id, data_key
        self._endpoint = None
        if self.data_server is not None:
            self.data_server.set_identity(node_id, data_key)

    # NodeHandle: tier movement (nodes with an NVMe tier) -------------------------

    def recover(self) -> list[tuple[bytes, Slot, int, str]]:
        """Blocks found on NVMe at start: (key, slot, checksum, namespace)."""
        if self.mover is None:
            return []
        return [(e.key, e.slot, e.checksum, e.namespace) for e in self.mover.recover()]

    def nvme_blocks(self) -> list[tuple[bytes, Slot, int, str]]:
        """Every block on NVMe now (the catalog), for a master that asks again."""
        if self.mover is None:
            return []
        return [(e.key, e.slot, e.checksum, e.namespace) for e in self.mover.catalog]

    async def demote(self, items: Sequence[tuple], *, keep_dram: bool) -> DemoteResult:
        """Copy (key, dram_slot, checksum, namespace) blocks to NVMe; keep DRAM if asked."""
        batch = [DemoteItem(*item) for item in items]
        if keep_dram:
            return await self.mover.write_through(batch)
        return await self.mover.demote(batch)

    async def promote(self, items: Sequence[tuple]) -> PromoteResult:
        """Read (key, nvme_slot, checksum, dram_slot) blocks into DRAM, verifying checksums."""
        return await self.mover.promote([PromoteItem(*item) for item in items], keep_nvme=True)

    async def pull(self, source: NodeEndpoint, access: Access, tier: str, slots: Sequence[Slot],
                   keys: Sequence[bytes] = (), namespace_ids: Sequence[str] = ()) -> list[int]:
        """Copy the blocks of ``access.records`` from ``source``'s data server into ``slots`` of
        this node's ``tier`` (a replica, or a drain moving blocks here). Returns the positions
        of blocks that failed their checksum on the way: their slots hold nothing to serve.

        The master allocated ``slots`` and signed ``access`` with the source's key; the bytes go
        straight from the source's arena into this one, never through the master. With
        ``keys`` and ``namespace_ids`` (one per record), the good copies become resident
        blocks of this node (reported again after a master restart).
        """
        arena = self.host_arenas().get(tier)
        if arena is None:
            raise ValueError(f"node {self.name} has no host-memory tier {tier!r} to pull into")
        records = unpack_records(access.records)
        if len(records) != len(slots):
            raise ValueError(f"pull of {len(records)} blocks into {len(slots)} slots")
        if (keys or namespace_ids) and not len(keys) == len(namespace_ids) == len(records):
            raise ValueError(f"pull of {len(records)} blocks with {len(keys)} keys and {len(namespace_ids)} "
                             f"namespaces: give one of each per record, or none")
        if any(s.offset + s.size > len(arena) for s in slots):
            raise ValueError(f"a target slot lies outside this node's {tier} tier ({len(arena)} bytes)")
        if not source.tcp_address:
            raise ValueError(f"node {source.name!r} has no data server to pull from (started with --data-port -1)")
        outs = [arena[s.offset:s.offset + s.size] for s in slots]
        share = Share(records, np.arange(len(records), dtype=np.uint32), access)

        def copy() -> list[int]:
            transport = TcpTransport.open(source, tier, self.peer_options())
            try:
                transport.read(share, outs)
            except BlockIntegrityError as exc:
                return list(exc.positions)
            finally:
                transport.close()
            return []

        corrupt = await asyncio.to_thread(copy)
        bad = set(corrupt)
        for i, key in enumerate(keys):
            if i not in bad:
                r = records[i]
                self.resident.add(ResidentBlock(tier, slots[i].offset, slots[i].size, key, int(r["checksum"]),
                                                namespace_ids[i]))
        return corrupt

    async def move_tier(self, items: Sequence[tuple], source_tier: str,
                        target_tier: str) -> tuple[list[bytes], list[bytes]]:
        """Copy (key, source slot, checksum, namespace, target slot) blocks from one memory
        tier to another of this node (HBM over its watermark -> DRAM). Returns (moved keys,
        corrupt keys): a moved block's target slot holds its bytes, checksum verified, and is
        now a resident block of this node; a corrupt one's target holds nothing to serve.
        The source slots are left alone: the master frees them once it serves the new copies.
        """
        source, target = self.tiers.get(source_tier), self.host_arenas().get(target_tier)
        if source is None or TierCaps.PERSISTENT in source.caps:
            raise ValueError(f"node {self.name} has no memory tier {source_tier!r} to move blocks from")
        if target is None:
            raise ValueError(f"node {self.name} has no host-memory tier {target_tier!r} to move blocks into")
        for key, src, _, _, dst in items:
            if src.size != dst.size or src.offset + src.size > source.capacity or dst.offset + dst.size > len(target):
                raise ValueError(f"block {bytes(key).hex()}: slot {src} of {source_tier} or {dst} of {target_tier} "
                                 f"lies outside its tier or sizes differ")

        def copy() -> tuple[list[bytes], list[bytes]]:
            moved, corrupt = [], []
            for key, src, checksum, ns, dst in items:
                out = target[dst.offset : dst.offset + dst.size]
                source.read_into(src, out)
                if xxhash.xxh3_64_intdigest(out) != checksum:
                    corrupt.append(key)
                    continue
                self.resident.add(ResidentBlock(target_tier, dst.offset, dst.size, key, checksum, ns))
                moved.append(key)
            return moved, corrupt

        return await asyncio.to_thread(copy)

    async def drop_nvme(self, items: Sequence[tuple[bytes, Slot]]) -> None:
        await self.mover.drop(items)

    def close(self) -> None:
        if self.data_server is not None:
            self.data_server.close()
        if self.ucx is not None:
            self.ucx.close()
        if self.mover is not None:
            self.mover.close()
            self.mover.catalog.close()
        for arena in self.tiers.values():
            arena.close()
