"""The master's block index: two-phase puts, read leases, longest-prefix lookup, eviction.

Life of a block entry::

    put_start ──► PENDING ──put_commit──► COMMITTED ──evict/remove/flush──► gone
                     │                        │
                     └─abort / grant expiry─► freed      remove while pinned ─► DOOMED
                                                          (invisible) ── last unpin ─► freed

A committed entry holds one or more copies of its block (``entry.copies``), at most one
per node, each a :class:`Copy` with its own tier chain on its node: a memory slot (DRAM or
HBM) and/or an NVMe slot. The copy the block was written to and the replicas on other hosts
(kvpool.master.replication) are the same kind of record, and the same code here demotes,
promotes, evicts and frees each of them: every copy sits in its node's tier policies, and
that node's evictions and watermarks take it without touching the other copies. A block
leaves the index only when its last copy goes. ``copies[0]`` is the copy reads go to by
default, and it is in memory whenever any copy is; Lookup may send a reader to a nearer
memory copy instead. Clients read only memory copies; a block with no copy in memory is
promoted into DRAM (the copy on the reader's host first) before it is served
(:mod:`kvpool.master.tiering` drives demotion, promotion and write-through; this module
keeps the books synchronously).

Invariants (each one is tested):

* Only COMMITTED entries live in ``_blocks``; Lookup and Get read nothing else, so a block
  that was not committed is never readable.
* An entry with ``pins > 0`` is never evicted, moved or freed, nor is any of its copies
  (a lease may be served from any of them). Read leases pin; so does the tier mover for the
  duration of a copy. Removing a pinned entry makes it invisible at once and frees its
  storage at the last unpin.
* Every slot is released exactly once: memory slots through ``NodeHandle.free``, NVMe copies
  through the node's catalog-aware drop (queued in ``nvme_drops``).
* A key is granted to at most one writer at a time; others get PUT_IN_FLIGHT.
* A block has at most one copy per node, and every copy holds the same bytes (one checksum
  per entry): a copy reported by a node is adopted only with the entry's checksum.
* Tenant usage (quotas) counts a block once, in the tiers of its first copy.
* Tenants share nothing. The index holds a block under its *scoped* key: the client's 16-byte
  key followed by its namespace's tenant (the bare key for the default tenant ""). So a
  tenant who knows another's keys finds, deduplicates against and removes nothing of theirs:
  every answer is the one for a block that does not exist.
* A tenant with a quota on a memory tier never holds more than it there, counting granted
  and committed blocks. A put past it first evicts that tenant's own unleased blocks of the
  tier (policy order), never another tenant's; if that is not enough it fails with
  RESOURCE_EXHAUSTED naming the quota.

All methods run on the master's event-loop thread: the index takes no locks.
Errors are raised as :mod:`kvpool.errors` exceptions with messages a person can act on.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from kvpool.errors import FailedPrecondition, InvalidArgument, NotFound, PoolFull, Unavailable
from kvpool.identity import KEY_BYTES, MAX_TENANT_BYTES, Namespace, split_keys
from kvpool.master.eviction import DEFAULT_POLICY, POLICIES, BlockInfo, EvictionPolicy, make_policy
from kvpool.master.nodes import NodeHandle, NodeRegistry, has_durable_tier, memory_tiers
from kvpool.tiers.base import Slot, TierCaps
from kvpool.wire import pack_record, pack_slot

__all__ = ["BlockIndex", "IndexConfig", "Entry", "Copy", "CopyView", "PutGrant", "ReadLease", "PUT_GRANTED", "PUT_PRESENT", "PUT_IN_FLIGHT"]

PUT_GRANTED, PUT_PRESENT, PUT_IN_FLIGHT = 1, 2, 3
PENDING, COMMITTED = "pending", "committed"
DRAM, NVME = "dram", "nvme"


@dataclass
class IndexConfig:
    grant_ttl_s: float = 30.0
    lease_ttl_s: float = 30.0
    max_batch: int = 65536
    #: Evict down to ``low_watermark`` once a tier's usage passes ``high_watermark``.
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    eviction_policy: str = DEFAULT_POLICY
    #: Copy every committed block to NVMe as well (when the node has an NVMe tier).
    write_through: bool = False
    #: Byte quotas: tenant -> memory tier ("dram", "hbm") -> bytes (kvpool.config.parse_quotas).
    quotas: dict[str, dict[str, int]] = field(default_factory=dict)
    #: Copies of each committed block for namespaces without a setting of their own
    #: (``kvpool master --replicas``; kvpool.master.replication makes them).
    replicas: int = 1
    #: Extra copies a block may gain on hosts that read it often (kvpool.master.replication).
    read_replicas: int = 0


#: The most copies a namespace may ask for.
MAX_REPLICAS = 8


class Copy:
    """One copy of a block on one node, with its own tier chain there: a memory slot
    (``mem``, in ``mem_tier``: "hbm" or "dram") and/or an NVMe slot (``nvme``).

    Every copy of a block is this record, the one clients read by default included, and the
    same index code demotes, promotes, evicts and frees it whichever copy it is. A copy
    with neither slot does not exist: it leaves its entry's ``copies``.
    """

    __slots__ = ("node_id", "mem", "mem_tier", "nvme")

    def __init__(self, node_id: int, mem: Slot | None, nvme: Slot | None, mem_tier: str = "dram") -> None:
        self.node_id = node_id
        self.mem = mem
        self.mem_tier = mem_tier
        self.nvme = nvme

    @property
    def tier(self) -> str:
        """Where a reader of this copy reads it: its memory tier, or "nvme" (promote first)."""
        return self.mem_tier if self.mem is not None else NVME

    @property
    def slot(self) -> Slot:
        return self.mem if self.mem is not None else self.nvme

    @property
    def tiers(self) -> tuple[str, ...]:
        """The tiers of its node that this copy occupies (each one's policy holds it)."""
        if self.mem is None:
            return () if self.nvme is None else (NVME,)
        return (self.mem_tier,) if self.nvme is None else (self.mem_tier, NVME)

    def holds(self, tier: str) -> bool:
        return self.nvme is not None if tier == NVME else (self.mem is not None and self.mem_tier == tier)

    def __repr__(self) -> str:
        return f"Copy(node={self.node_id}, {self.mem_tier}={self.mem}, nvme={self.nvme})"


class Entry:
    """One block in the index: its copies, one per node, each with its own tier chain.

    ``copies[0]`` is the copy a read goes to unless a nearer one is chosen (Lookup's
    location records are cached for it: ``record``, ``loc``). It is kept in memory whenever
    any copy is: a copy that loses its memory slot gives the front to one that has it. The
    other copies are ``replicas``; a block with no copy left is not in the index.
    ``node_id``, ``mem``, ``mem_tier``, ``nvme``, ``tier`` and ``slot`` read ``copies[0]``.
    """

    __slots__ = ("key", "ns", "copies", "checksum", "state", "pins",
                 "doomed", "position", "created", "last_access", "hits", "record", "loc")

    def __init__(self, key: bytes, ns: str, node_id: int, mem: Slot | None, nvme: Slot | None,
                 position: int, now: float, mem_tier: str = "dram") -> None:
        self.key = key
        self.ns = ns
        #: Every copy of the block, at most one per node (see the class docstring). A pin on
        #: the entry pins them all: a lease may be served from any of them.
        self.copies: list[Copy] = [Copy(node_id, mem, nvme, mem_tier)]
        self.checksum = 0
        self.state = PENDING
        self.pins = 0
        self.doomed = False
        self.position = position
        self.created = now
        self.last_access = now
        self.hits = 0
        self.record = self.loc = b""
        self.update_record()

    @property
    def node_id(self) -> int:
        return self.copies[0].node_id

    @property
    def mem(self) -> Slot | None:
        """The first copy's memory slot; None when no copy of the block is in memory."""
        return self.copies[0].mem

    @property
    def mem_tier(self) -> str:
        return self.copies[0].mem_tier

    @property
    def nvme(self) -> Slot | None:
        return self.copies[0].nvme

    @property
    def replicas(self) -> list[Copy]:
        """The copies other than the first."""
        return self.copies[1:]

    def copy_on(self, node_id: int) -> Copy | None:
        for c in self.copies:
            if c.node_id == node_id:
                return c
        return None

    @property
    def tier(self) -> str:
        """Where clients read it: its memory tier, or "nvme" for a block to promote first."""
        return self.copies[0].tier

    @property
    def slot(self) -> Slot:
        return self.copies[0].slot

    @property
    def size(self) -> int:
        return self.slot.size

    @property
    def tenant(self) -> str:
        return self.key[KEY_BYTES:].decode()

    @property
    def client_key(self) -> bytes:
        """The key as its tenant's clients know it (16 bytes)."""
        return self.key[:KEY_BYTES]

    def update_record(self) -> None:
        first = self.copies[0]
        slot = first.slot
        # Both wire forms are cached: a Lookup then only joins bytes (see kvpool.wire).
        self.record = pack_record(first.node_id, first.tier, slot.offset, slot.size, self.checksum)
        self.loc = pack_slot(slot.offset, self.checksum)


class CopyView:
    """One copy dressed as its entry (key, checksum, namespace, node and slots): the location
    records of a read served from it, and the resident-block note to its node."""

    __slots__ = ("key", "ns", "checksum", "node_id", "mem", "mem_tier", "tier", "size", "record", "loc")

    def __init__(self, entry: Entry, copy: Copy) -> None:
        slot = copy.slot
        self.key, self.ns, self.checksum = entry.key, entry.ns, entry.checksum
        self.node_id, self.mem, self.mem_tier, self.tier, self.size = (copy.node_id, copy.mem, copy.mem_tier,
                                                                       copy.tier, slot.size)
        self.record = pack_record(copy.node_id, copy.tier, slot.offset, slot.size, entry.checksum)
        self.loc = pack_slot(slot.offset, entry.checksum)


@dataclass
class PutGrant:
    put_id: str
    entries: dict[bytes, Entry]
    expires_at: float
    tenant: str = ""
    #: Where each granted block sits in the chain the writer sent: (parent key, last in the
    #: batch). The eviction policy hears it at commit (BlockInfo.parent, BlockInfo.last).
    links: dict[bytes, tuple[bytes | None, bool]] = field(default_factory=dict)


@dataclass
class ReadLease:
    lease_id: str
    entries: list[Entry]
    expires_at: float


@dataclass
class Counters:
    hit_blocks: int = 0
    miss_blocks: int = 0
    put_blocks: int = 0
    put_bytes: int = 0
    dedup_blocks: int = 0
    evictions: dict[tuple[int, str], int] = field(default_factory=dict)
    expired_grants: int = 0
    expired_leases: int = 0
    demoted_blocks: int = 0
    promoted_blocks: int = 0
    written_through_blocks: int = 0
    corrupt_blocks: int = 0
    #: Copies made on other hosts (kvpool.master.replication), not those adopted back.
    replicated_blocks: int = 0


@dataclass(frozen=True)
class NamespaceInfo:
    namespace: Namespace
    block_bytes: int
    #: The namespace's own ``replicas`` setting; 0: the pool default (IndexConfig.replicas).
    replicas: int = 0

    @property
    def tenant(self) -> str:
        return self.namespace.tenant


def unknown_namespace(ns_id: str) -> NotFound:
    return NotFound(f"namespace {ns_id!r} is not registered with this master; call "
                    f"RegisterNamespace first (the kvpool client does this on connect)")


def scope_keys(keys: list[bytes], tenant: str) -> list[bytes]:
    """Client keys -> the index's keys for ``tenant`` (see the module docstring)."""
    if not tenant:
        return keys
    suffix = tenant.encode()
    return [k + suffix for k in keys]


class BlockIndex:
    def __init__(self, nodes: NodeRegistry, config: IndexConfig | None = None,
                 clock: Callable[[], float] = time.monotonic,
                 policy_factory: Callable[[str], EvictionPolicy] = make_policy) -> None:
        self.nodes = nodes
        self.config = config or IndexConfig()
        self.clock = clock
        self.started = clock()
        #: Makes each tier's policy from its name (``kvpool replay`` wraps it to time and check calls).
        self.policy_factory = policy_factory
        if self.config.eviction_policy not in POLICIES:
            make_policy(self.config.eviction_policy)  # raises, naming the known policies
        # Compiled code is loaded now, before the master answers: not in its first commit,
        # and its memory does not grow once it serves.
        POLICIES[self.config.eviction_policy].prepare(wait=True)
        self._namespaces: dict[str, NamespaceInfo] = {}
        self._blocks: dict[bytes, Entry] = {}        # committed, visible
        self._pending: dict[bytes, Entry] = {}       # granted, not yet committed
        self._grants: dict[str, PutGrant] = {}
        #: Puts that lost slots with a node that left: put id -> (node name, grant expiry).
        self._lost_grants: dict[str, tuple[str, float]] = {}
        self._leases: dict[str, ReadLease] = {}
        #: Pins per key, summed over the entries of that key (a removed, still leased entry
        #: and its republished successor share one): the keys a policy may not propose. The
        #: predicate a policy calls per candidate reads this small dict, hot in cache, where
        #: the entry would cost a cache miss; each victim is then checked against its entry.
        self._pinned: dict[bytes, int] = {}
        self._policies: dict[tuple[int, str], EvictionPolicy] = {}
        self._tier_blocks: dict[tuple[int, str], int] = {}
        #: While an eviction drops its victims: the keys each policy is to hear of, told in
        #: one ``remove_many`` per policy when the drops are done (None: tell at once).
        self._leaving: dict[tuple[int, str], list[bytes]] | None = None
        #: NVMe copies to drop, per node: (key, slot). Dropping touches the node's catalog,
        #: which is I/O, so the tiering task does it off this (synchronous) path.
        self.nvme_drops: dict[int, list[tuple[bytes, Slot]]] = {}
        #: Entries committed since the tiering task last looked (for write-through).
        self.committed: list[Entry] = []
        #: Nodes being drained (kvpool.master.drain): placement gives them no new blocks.
        self.draining: set[int] = set()
        self.counters = Counters()
        #: Told of blocks entering and leaving the index (Redis metadata, KV events): objects
        #: with ``namespace(info)`` (a NamespaceInfo: registered, or its settings changed),
        #: ``stored(entries)``, ``removed(entries)`` and
        #: ``node_lost(entries)`` (a node left: its blocks may come back if it was only
        #: cut off), called synchronously, so they only queue the work.
        self.observers: list = []
        #: (tenant, tier) -> [bytes, blocks] of committed copies, and bytes granted, not committed.
        self._usage: dict[tuple[str, str], list[int]] = {}
        self._granted: dict[tuple[str, str], int] = {}
        #: Called with a namespace id when its replicas setting goes up, so that the blocks
        #: it has already get their new copies (the Replicator listens).
        self.replicas_raised: list[Callable[[str], None]] = []
        #: Called with the entries that lost a copy with a node that left (forget_node), so
        #: that they get it back elsewhere (the Replicator listens).
        self.copies_lost: list[Callable[[list[Entry]], None]] = []
        #: Whether some namespace asks for more than one copy (kept by set_replicas, so that
        #: Lookup's check costs nothing however many namespaces there are).
        self._ns_replicated = False
        #: Namespaces whose blocks kept copies reported before the namespace was registered
        #: here (after a master restart): trimmed to its setting when it is (_joins_as_copy).
        self._untrimmed: set[str] = set()

    # ------------------------------------------------------------------ namespaces

    def register_namespace(self, ns: Namespace, replicas: int = 0) -> NamespaceInfo:
        """Declare ``ns``; ``replicas`` > 0 sets its replicas (see :meth:`set_replicas`), 0
        keeps its setting (the pool default for a new one)."""
        if len(ns.tenant.encode()) > MAX_TENANT_BYTES:
            raise InvalidArgument(f"RegisterNamespace: tenant names are at most {MAX_TENANT_BYTES} bytes; "
                                  f"got {len(ns.tenant.encode())}")
        self._check_replicas(replicas, "RegisterNamespace")
        known = self._namespaces.get(ns.id)
        if known is None:
            known = self._namespaces[ns.id] = NamespaceInfo(ns, ns.layout.block_bytes)
            if not replicas:  # otherwise set_replicas tells them, with the setting
                self._tell_namespace(known)
        if replicas and replicas != known.replicas:
            known = self.set_replicas(ns.id, replicas)
        if ns.id in self._untrimmed:  # copies adopted before its setting was known
            self._untrimmed.discard(ns.id)
            self._trim_copies(ns.id)
        return known

    def _tell_namespace(self, info: NamespaceInfo) -> None:
        for observer in self.observers:
            observer.namespace(info)

    @staticmethod
    def _check_replicas(replicas: int, what: str) -> None:
        if not 0 <= replicas <= MAX_REPLICAS:
            raise InvalidArgument(f"{what}: replicas must be between 1 and {MAX_REPLICAS} (0 keeps the setting); "
                                  f"got {replicas}")

    def replicas_of(self, ns_id: str) -> int:
        """Copies each committed block of ``ns_id`` should have (its setting or the pool default)."""
        info = self._namespaces.get(ns_id)
        return (info.replicas if info is not None and info.replicas else 0) or self.config.replicas

    @property
    def replicated(self) -> bool:
        """Whether any block may have replicas (Lookup then looks for the nearest copy)."""
        return self.config.replicas > 1 or self.config.read_replicas > 0 or self._ns_replicated

    def set_replicas(self, ns_id: str, replicas: int) -> NamespaceInfo:
        """Change how many copies the blocks of ``ns_id`` get. Raising it tells
        ``replicas_raised`` (the blocks there get copies at the next replication cycles);
        lowering it frees the extra copies of unleased blocks now (a leased block keeps its
        copies until it leaves memory: a leased copy is never freed)."""
        self._check_replicas(replicas, "SetReplicas")
        if replicas == 0:
            raise InvalidArgument("SetReplicas: replicas must be at least 1 (a block's one copy)")
        info = self.namespace(ns_id)
        before = self.replicas_of(ns_id)
        changed = replicas != info.replicas
        info = self._namespaces[ns_id] = NamespaceInfo(info.namespace, info.block_bytes, replicas)
        self._ns_replicated = any(i.replicas > 1 for i in self._namespaces.values())
        if changed:
            self._tell_namespace(info)
        if replicas > before:
            for call in self.replicas_raised:
                call(ns_id)
        elif replicas < before:
            for entry in self.entries(ns_id):
                if entry.pins == 0 and len(entry.copies) > replicas:
                    for c in entry.copies[replicas:]:
                        self._discard_copy(entry, c)
        return info

    def namespace(self, ns_id: str) -> NamespaceInfo:
        info = self._namespaces.get(ns_id)
        if info is None:
            raise unknown_namespace(ns_id)
        return info

    @property
    def namespaces(self) -> dict[str, NamespaceInfo]:
        return self._namespaces

    # ------------------------------------------------------------------ validation

    def _check_keys(self, keys: list[bytes], what: str) -> None:
        if not keys:
            raise InvalidArgument(f"{what}: the key batch is empty; send at least one 16-byte key")
        if len(keys) > self.config.max_batch:
            raise InvalidArgument(
                f"{what}: batch of {len(keys)} keys exceeds the limit of {self.config.max_batch}; "
                f"split it into several calls"
            )

    @staticmethod
    def split_packed(packed: bytes, what: str) -> list[bytes]:
        if len(packed) % KEY_BYTES:
            raise InvalidArgument(
                f"{what}: keys must be 16-byte block keys concatenated; got {len(packed)} bytes, "
                f"which is not a multiple of 16"
            )
        return split_keys(packed)

    # ------------------------------------------------------------------ publish

    def put_start(self, ns_id: str, keys: list[bytes], sizes: list[int],
                  first_position: int | None = None, tier: str = "", client_host: str = "",
                  exclude: Iterable[int] = ()) -> tuple[PutGrant, list[int]]:
        """Grant slots for the keys that are neither present nor in flight.

        All-or-nothing: if the pool cannot make room for every grant (after evicting what
        the policy allows), nothing is granted and :class:`PoolFull` is raised.

        ``tier`` is the writer's preference ("hbm" for a GPU writer on the node's host); a node
        without that tier places the blocks in DRAM. ``client_host`` and ``exclude`` steer
        placement (see :meth:`_place`).
        """
        if tier and tier not in (DRAM, "hbm"):
            raise InvalidArgument(f"PutStart: cannot put into tier {tier!r}; ask for \"dram\" or \"hbm\"")
        info = self.namespace(ns_id)
        self._check_keys(keys, "PutStart")
        if len(sizes) != len(keys):
            raise InvalidArgument(f"PutStart: {len(keys)} keys but {len(sizes)} sizes; send one size per key")
        for size in sizes:
            if size != info.block_bytes:
                raise InvalidArgument(
                    f"PutStart: block size {size} does not match namespace {ns_id[:12]}…, whose "
                    f"layout makes blocks of {info.block_bytes} bytes"
                )
        keys = scope_keys(keys, info.tenant)
        now = self.clock()
        statuses: list[int] = []
        wanted: list[int] = []
        seen: set[bytes] = set()
        present: list[Entry] = []
        for i, key in enumerate(keys):
            entry = self._blocks.get(key)
            if entry is not None:
                statuses.append(PUT_PRESENT)
                present.append(entry)
                self.counters.dedup_blocks += 1
            elif key in self._pending or key in seen:
                statuses.append(PUT_IN_FLIGHT)
            else:
                statuses.append(PUT_GRANTED)
                wanted.append(i)
                seen.add(key)
        # Present blocks are about to be reused: touch them so this put's evictions spare
        # them. A pinned one is safe anyway and its reader's access is counted when the
        # lease ends, so touching it too would count one use twice.
        self._touch_many([e for e in present if e.pins == 0])
        granted: dict[bytes, Entry] = {}
        if wanted:
            node, tier = self._place(info.block_bytes, len(wanted), tier, client_host, set(exclude))
            self._within_quota(info.tenant, tier, info.block_bytes * len(wanted))
            try:
                for i in wanted:
                    slot = node.allocate(tier, info.block_bytes)
                    if slot is None:
                        self._make_room(node, tier, info.block_bytes, len(wanted) - len(granted))
                        slot = node.allocate(tier, info.block_bytes)
                        if slot is None:
                            raise PoolFull(self._full_message(node, tier, info.block_bytes, len(wanted)))
                    position = first_position + i if first_position is not None else -1
                    granted[keys[i]] = Entry(keys[i], ns_id, node.node_id, slot, None, position, now, tier)
            except BaseException:
                for entry in granted.values():
                    node.free(tier, entry.mem)
                raise
        grant = PutGrant(secrets.token_hex(8), granted, now + self.config.grant_ttl_s, info.tenant)
        if granted:
            # Consecutive keys of one batch are parent and child (a key names its prefix).
            last = len(keys) - 1
            grant.links = {keys[i]: (keys[i - 1] if i else None, i == last) for i in wanted}
            self._pending.update(granted)
            self._grants[grant.put_id] = grant
            tk = (info.tenant, tier)
            self._granted[tk] = self._granted.get(tk, 0) + info.block_bytes * len(granted)
        return grant, statuses

    def _grant(self, put_id: str, tenant: str | None) -> PutGrant | None:
        """The open put ``put_id``; None if there is none, or (``tenant`` given) it is another tenant's."""
        grant = self._grants.get(put_id)
        return grant if grant is None or tenant is None or grant.tenant == tenant else None

    def put_commit(self, put_id: str, keys: list[bytes] | None, checksums: list[int],
                   tenant: str | None = None) -> tuple[int, int]:
        """Make granted blocks visible. Grants of the put that are not committed are released."""
        grant = self._grant(put_id, tenant)
        if grant is None and put_id in self._lost_grants:
            raise Unavailable(
                f"PutCommit: node {self._lost_grants[put_id][0]} holding slots of put {put_id} left the pool "
                f"(it stopped answering heartbeats or restarted), so those blocks were not stored; call "
                f"PutStart again and they are placed on another node"
            )
        if grant is None:
            raise NotFound(
                f"PutCommit: no open put {put_id!r}; it was committed or aborted already, or its "
                f"grant expired after {self.config.grant_ttl_s:g}s (call PutStart again)"
            )
        if keys is None or not keys:
            keys = list(grant.entries)
        else:
            keys = scope_keys(keys, grant.tenant)
        if len(checksums) != len(keys):
            raise InvalidArgument(
                f"PutCommit: {len(keys)} blocks to commit but {len(checksums)} checksums; send one "
                f"xxh3-64 checksum per block"
            )
        if len(set(keys)) != len(keys):
            raise InvalidArgument("PutCommit: a key is listed twice; list each granted key once")
        for key in keys:
            if key not in grant.entries:
                raise FailedPrecondition(
                    f"PutCommit: key {key.hex()} was not granted by put {put_id}; commit only keys "
                    f"that PutStart answered with PUT_GRANTED"
                )
        del self._grants[put_id]
        now = self.clock()
        entering: dict[tuple[int, str], tuple[list[bytes], list[BlockInfo]]] = {}
        committed: list[Entry] = []
        for key, checksum in zip(keys, checksums):
            entry = grant.entries.pop(key)
            del self._pending[key]
            self._ungrant(entry)
            entry.state = COMMITTED
            entry.checksum = checksum
            entry.update_record()
            entry.last_access = now
            self._blocks[key] = entry
            self._count(entry, entry.mem_tier, 1)  # the tenant's use of the tier (quotas)
            parent, last = grant.links.get(key, (None, False))
            batch = entering.setdefault((entry.node_id, entry.mem_tier), ([], []))
            batch[0].append(key)
            batch[1].append(BlockInfo(entry.size, entry.position, entry.ns, parent, last))
            if self.config.write_through:
                self.committed.append(entry)
            self.counters.put_blocks += 1
            self.counters.put_bytes += entry.slot.size
            committed.append(entry)
        # One batched call per policy, in chain order: a policy learns parents from it.
        for tk, (batch_keys, infos) in entering.items():
            self._tier_blocks[tk] = self._tier_blocks.get(tk, 0) + len(batch_keys)
            self._policy(*tk).insert_many(batch_keys, infos)
        if committed:  # one grant places all its blocks on one node
            self.nodes.get(committed[0].node_id).note_resident(committed)
            for observer in self.observers:
                observer.stored(committed)
        released = self._release_grant_entries(grant)
        self.enforce_watermarks()
        return len(keys), released

    def put_abort(self, put_id: str, tenant: str | None = None) -> int:
        grant = self._grant(put_id, tenant)
        if grant is not None:
            del self._grants[put_id]
        if grant is None:
            raise NotFound(f"PutAbort: no open put {put_id!r} (already committed, aborted or expired)")
        return self._release_grant_entries(grant)

    def _release_grant_entries(self, grant: PutGrant) -> int:
        for key, entry in grant.entries.items():
            self._pending.pop(key, None)
            self._ungrant(entry)
            self._release_storage(entry)
        n = len(grant.entries)
        grant.entries.clear()
        return n

    def abort_all(self) -> int:
        """Release every open grant (shutdown)."""
        return sum(self.put_abort(put_id) for put_id in list(self._grants))

    # ------------------------------------------------------------------ read

    def lookup(self, ns_id: str, keys: list[bytes], lease: bool = True) -> tuple[int, ReadLease | None]:
        """The longest present prefix of ``keys``; with ``lease``, pinned under a read lease."""
        info = self.namespace(ns_id)
        self._check_keys(keys, "Lookup")
        keys = scope_keys(keys, info.tenant)
        # map() keeps the per-key work in C: this is the hot loop of a 128K-token Lookup.
        hits = list(map(self._blocks.get, keys))
        try:
            hits = hits[: hits.index(None)]
        except ValueError:
            pass
        self.counters.hit_blocks += len(hits)
        self.counters.miss_blocks += len(keys) - len(hits)
        if not lease or not hits:
            return len(hits), None
        return len(hits), self._lease(hits)

    def get(self, ns_id: str, keys: list[bytes]) -> tuple[list[bool], ReadLease | None]:
        """Locate any subset of keys; those found are leased."""
        info = self.namespace(ns_id)
        self._check_keys(keys, "Get")
        keys = scope_keys(keys, info.tenant)
        found_entries: list[Entry] = []
        found: list[bool] = []
        for key in keys:
            entry = self._blocks.get(key)
            found.append(entry is not None)
            if entry is not None:
                found_entries.append(entry)
        self.counters.hit_blocks += len(found_entries)
        self.counters.miss_blocks += len(keys) - len(found_entries)
        return found, (self._lease(found_entries) if found_entries else None)

    def _lease(self, entries: list[Entry]) -> ReadLease:
        # Only the pin is taken here, on the RPC's critical path. Hits, recency and the
        # policy's access() are recorded when the lease ends (_unpin): the block cannot be
        # evicted in between, so the policy loses nothing by hearing of the read later.
        for entry in entries:
            entry.pins += 1
            self._pin_key(entry.key)
        lease = ReadLease(secrets.token_hex(8), entries, self.clock() + self.config.lease_ttl_s)
        self._leases[lease.lease_id] = lease
        return lease

    def shrink_lease(self, lease: ReadLease, keep) -> ReadLease | None:
        """Unpin the entries of ``lease`` not kept: ``keep`` is a prefix length or a list of
        positions. Returns the lease, or None if nothing is left (it is then ended)."""
        positions = range(keep) if isinstance(keep, int) else keep
        kept = [lease.entries[i] for i in positions]
        kept_ids = {id(e) for e in kept}
        for entry in lease.entries:
            if id(entry) not in kept_ids:
                self.unpin(entry)
        lease.entries = kept
        if not kept:
            self._leases.pop(lease.lease_id, None)
            return None
        return lease

    def release(self, lease_ids: Iterable[str], corrupt: Iterable[bytes] = (),
                tenant: str | None = None) -> tuple[int, int]:
        """End leases. Unknown ids (already released or expired) are ignored: release is idempotent.
        With ``tenant``, leases of other tenants count as unknown.

        ``corrupt`` are keys a reader found damaged (checksum mismatch over the network): those
        held under one of the leases lose that replica, counted as corrupt. Returns (leases
        released, blocks dropped).
        """
        bad = set(corrupt)
        released = dropped = 0
        for lease_id in lease_ids:
            lease = self._leases.get(lease_id)
            if lease is None or (tenant is not None and lease.entries[0].tenant != tenant):
                continue
            del self._leases[lease_id]
            for entry in lease.entries if bad else ():
                if entry.client_key in bad and not entry.doomed and self._blocks.get(entry.key) is entry:
                    self._drop(entry)  # pinned by this lease: freed at the unpin below
                    self.counters.corrupt_blocks += 1
                    dropped += 1
            self._unpin(lease)
            released += 1
        return released, dropped

    def _unpin(self, lease: ReadLease) -> None:
        now = self.clock()
        touched: dict[tuple[int, str], list[bytes]] = {}
        for entry in lease.entries:
            entry.pins -= 1
            self._unpin_key(entry.key)
            if entry.doomed:
                if entry.pins == 0:
                    self._release_storage(entry)
                continue
            entry.hits += 1
            entry.last_access = now
            for c in entry.copies:  # a read is a use of the block on every node that holds it
                if c.mem is not None:
                    touched.setdefault((c.node_id, c.mem_tier), []).append(entry.key)
                if c.nvme is not None:
                    touched.setdefault((c.node_id, NVME), []).append(entry.key)
        # One batched call per policy: a 128K-token read is 8,192 accesses.
        for tk, keys in touched.items():
            self._policy(*tk).access_many(keys)

    def _pin_key(self, key: bytes) -> None:
        """Count one more pin of ``key`` in ``_pinned`` (with every ``entry.pins += 1``)."""
        self._pinned[key] = self._pinned.get(key, 0) + 1

    def _unpin_key(self, key: bytes) -> None:
        """Count one pin of ``key`` less in ``_pinned`` (with every ``entry.pins -= 1``)."""
        n = self._pinned[key] - 1
        if n:
            self._pinned[key] = n
        else:
            del self._pinned[key]

    def pin(self, entry: Entry) -> None:
        entry.pins += 1
        self._pin_key(entry.key)

    def unpin(self, entry: Entry) -> bool:
        """Drop one pin. Returns False if the entry is gone (its storage freed at last unpin)."""
        entry.pins -= 1
        self._unpin_key(entry.key)
        if entry.doomed:
            if entry.pins == 0:
                self._release_storage(entry)
            return False
        return True

    def _touch_many(self, entries: list[Entry]) -> None:
        touched: dict[tuple[int, str], list[bytes]] = {}
        for entry in entries:
            for c in entry.copies:
                if c.mem is not None:
                    touched.setdefault((c.node_id, c.mem_tier), []).append(entry.key)
                if c.nvme is not None:
                    touched.setdefault((c.node_id, NVME), []).append(entry.key)
        for tk, keys in touched.items():
            self._policy(*tk).access_many(keys)

    # ------------------------------------------------------------------ removal and eviction

    def remove(self, keys: Iterable[bytes], tenant: str = "") -> tuple[int, int]:
        """Remove committed blocks of ``tenant`` (``keys`` as its clients know them). Leased
        ones vanish now and are freed on their last release."""
        removed = deferred = 0
        for key in scope_keys(list(keys), tenant):
            entry = self._blocks.get(key)
            if entry is None:
                continue
            if self._drop(entry):
                removed += 1
            else:
                deferred += 1
        return removed, deferred

    def flush(self, ns_id: str = "") -> tuple[int, int]:
        if ns_id:
            self.namespace(ns_id)
        removed = deferred = 0
        for entry in [e for e in self._blocks.values() if not ns_id or e.ns == ns_id]:
            if self._drop(entry):
                removed += 1
            else:
                deferred += 1
        return removed, deferred

    def _drop(self, entry: Entry) -> bool:
        """Take a committed entry out of the index. True if freed now, False if deferred."""
        del self._blocks[entry.key]
        for observer in self.observers:
            observer.removed((entry,))
        for c in entry.copies:  # out of their policies now; their slots go with the rest
            for tier in c.tiers:
                self._leave(entry, tier, c)
        entry.doomed = True
        if entry.pins:
            return False
        self._release_storage(entry)
        return True

    # ------------------------------------------------------------------ copies
    #
    # Every copy goes through these, the first one included. Usage (tenant quotas) counts a
    # block once: in the tiers of its first copy; so whatever changes which copy is first
    # moves the count with it (_set_first).

    def _free_slot(self, entry: Entry, c: Copy, tier: str) -> None:
        """Release ``c``'s slot in ``tier`` on its node (NVMe through the catalog-aware drop)."""
        if tier == NVME:
            self.nvme_drops.setdefault(c.node_id, []).append((entry.key, c.nvme))
            c.nvme = None
        else:
            node = self.nodes.get(c.node_id)
            if node is not None:
                node.free(c.mem_tier, c.mem)
            c.mem = None

    def _release_tier(self, entry: Entry, c: Copy, tier: str) -> None:
        """``c`` leaves ``tier`` of its node: out of the policy, its slot freed."""
        self._leave(entry, tier, c)
        self._free_slot(entry, c, tier)

    def _set_first(self, entry: Entry, c: Copy, moved: list[Entry] | None = None) -> None:
        """Make ``c`` the copy reads go to (and the one usage counts). Observers are told
        now, or, with ``moved``, the entry is added to it for the caller to tell them once."""
        old = entry.copies[0]
        if old is c:
            return
        for tier in old.tiers:
            self._count(entry, tier, -1)
        entry.copies.remove(c)
        entry.copies.insert(0, c)
        for tier in c.tiers:
            self._count(entry, tier, 1)
        entry.update_record()
        self._moved(entry, moved)

    def _moved(self, entry: Entry, moved: list[Entry] | None) -> None:
        """The block is read from another copy now: observers (Redis, events) hear of it."""
        if moved is not None:
            moved.append(entry)
            return
        for observer in self.observers:
            observer.stored((entry,))

    def _settle(self, entry: Entry, moved: list[Entry] | None = None) -> None:
        """After a copy changed: copies with no slot left leave the entry, and the first copy
        is one in memory when any copy is (so an NVMe-only first copy means that no copy is
        in memory, and a read promotes one). The caller never empties an entry this way: a
        block losing its last copy is dropped (``_drop``). ``moved``: see :meth:`_set_first`."""
        first = entry.copies[0]
        entry.copies[1:] = [c for c in entry.copies[1:] if c.mem is not None or c.nvme is not None]
        if first.mem is None and first.nvme is None:
            # The first copy is gone (its tiers were left, and uncounted, already).
            entry.copies.pop(0)
            best = next((c for c in entry.copies if c.mem is not None), entry.copies[0])
            entry.copies.remove(best)
            entry.copies.insert(0, best)
            for tier in best.tiers:
                self._count(entry, tier, 1)
            entry.update_record()
            self._moved(entry, moved)
            return
        if first.mem is None:
            for c in entry.copies[1:]:
                if c.mem is not None:
                    self._set_first(entry, c, moved)
                    return
        entry.update_record()

    def _discard_copy(self, entry: Entry, c: Copy) -> None:
        """Let one copy of a live entry go (it has others): out of its policies, slots freed."""
        for tier in c.tiers:
            self._release_tier(entry, c, tier)
        self._settle(entry)

    def add_replica(self, entry: Entry, node_id: int, tier: str, slot: Slot) -> bool:
        """Record a copy the node made (kvpool.master.replication); False if the entry's memory
        copy went meanwhile, or the node holds a copy already (the caller frees the slot)."""
        if entry.doomed or entry.mem is None or self._blocks.get(entry.key) is not entry:
            return False
        if entry.copy_on(node_id) is not None:
            return False
        c = Copy(node_id, slot, None, tier)
        entry.copies.append(c)
        self._enter(entry, tier, c)
        self.counters.replicated_blocks += 1
        return True

    def _release_storage(self, entry: Entry) -> None:
        """Free whatever copies an unpinned entry still has (exactly once)."""
        for c in entry.copies:
            if c.mem is not None:
                self._free_slot(entry, c, c.mem_tier)
            if c.nvme is not None:
                self._free_slot(entry, c, NVME)

    def _ungrant(self, entry: Entry) -> None:
        """A granted entry was committed or released: it no longer counts as granted."""
        tk = (entry.tenant, entry.mem_tier)
        self._granted[tk] = self._granted.get(tk, 0) - entry.size

    def _count(self, entry: Entry, tier: str, sign: int) -> None:
        use = self._usage.setdefault((entry.tenant, tier), [0, 0])
        use[0] += sign * entry.size
        use[1] += sign

    def _enter(self, entry: Entry, tier: str, c: Copy | None = None) -> None:
        """Count a new slot of copy ``c`` (default: the first) in ``tier`` and hand it to that
        tier's policy on its node."""
        if c is None or c is entry.copies[0]:
            c = entry.copies[0]
            self._count(entry, tier, 1)
        tk = (c.node_id, tier)
        self._tier_blocks[tk] = self._tier_blocks.get(tk, 0) + 1
        self._policy(*tk).insert(entry.key, BlockInfo(entry.size, entry.position, entry.ns))

    def _leave(self, entry: Entry, tier: str, c: Copy | None = None) -> None:
        if c is None or c is entry.copies[0]:
            c = entry.copies[0]
            self._count(entry, tier, -1)
        tk = (c.node_id, tier)
        if tk not in self._policies:  # the node was forgotten, and its policies with it
            return
        self._tier_blocks[tk] -= 1
        if self._leaving is not None:
            self._leaving.setdefault(tk, []).append(entry.key)
        else:
            self._policies[tk].remove(entry.key)

    def _drop_victims(self, victims: list[Entry], tier: str, node_id: int | None = None) -> None:
        """``drop_copy`` of each victim's copy in ``tier`` of ``node_id``, the policies told of
        the removals in one batch each (an eviction nested in this one adds to the same batch)."""
        outer = self._leaving
        leaving = self._leaving = {} if outer is None else outer
        try:
            for entry in victims:
                self.drop_copy(entry, tier, node_id)
        finally:
            if outer is None:
                self._leaving = None
                for tk, keys in leaving.items():
                    self._policy(*tk).remove_many(keys)

    @staticmethod
    def _holds(entry: Entry, node_id: int, tier: str) -> bool:
        """Whether ``entry`` has a copy in this node's ``tier``."""
        for c in entry.copies:
            if c.node_id == node_id:
                return c.holds(tier)
        return False

    def victims(self, node_id: int, tier: str, want_bytes: int | None, block_bytes: int = 0,
                tenant: str | None = None) -> list[Entry]:
        """Unpinned entries of a tier in policy order, until ``want_bytes`` (None: all); with
        ``tenant``, only that tenant's.

        ``block_bytes`` (the size of the blocks being placed, when known) sizes the request
        to the policy: sampling policies choose better when asked for what is needed.

        Two checks, so that the one per candidate is cheap and the one per victim is whole:
        the predicate the policy calls refuses a key that is pinned (``_pinned``), already
        taken, or of another tenant; then every key the policy proposes is checked against
        its entry (committed, unpinned, with a copy in this tier) before it is evicted. A
        key that fails that check is refused for the rest of the call, so a policy that
        proposes it again is asked for others: a key that is not an unpinned, committed
        block of this index is never evicted, whatever the policy says.
        """
        policy = self._policies.get((node_id, tier))
        if policy is None:
            return []
        chosen: list[Entry] = []
        taken: set[bytes] = set()  # keys proposed so far: chosen or refused
        total = 0
        blocks = self._blocks
        pinned = self._pinned
        suffix = None if tenant is None else tenant.encode()

        def evictable(key: bytes) -> bool:  # called per candidate: kept to one frame
            return key not in pinned and key not in taken and (suffix is None or key[KEY_BYTES:] == suffix)

        while want_bytes is None or total < want_bytes:
            if want_bytes is not None and block_bytes > 0:
                ask = -(-(want_bytes - total) // block_bytes)
            else:
                ask = 64 + len(taken)
            proposed = [k for k in policy.select_victims(ask, evictable) if k not in taken]
            if not proposed:
                break
            for key in proposed:
                taken.add(key)
                entry = blocks.get(key)
                if (entry is None or entry.pins or not self._holds(entry, node_id, tier)
                        or (suffix is not None and key[KEY_BYTES:] != suffix)):
                    continue  # refused: not a block this call may evict
                chosen.append(entry)
                total += entry.size
                if want_bytes is not None and total >= want_bytes:
                    break
        return chosen

    def drop_copy(self, entry: Entry, tier: str, node_id: int | None = None) -> None:
        """Evict one slot of one copy: the one in ``tier`` of ``node_id`` (default: the first
        copy's node). A block that loses its last slot of its last copy leaves the index; one
        that loses its first copy is read from another."""
        c = entry.copies[0] if node_id is None else entry.copy_on(node_id)
        if c is None or not c.holds(tier):
            return
        if len(entry.copies) == 1 and len(c.tiers) == 1:
            self._drop(entry)
            return
        self._release_tier(entry, c, tier)
        self._settle(entry)

    def _evict_from(self, node_id: int, tier: str, want_bytes: int | None, block_bytes: int = 0) -> tuple[int, int]:
        """Evict unpinned copies of one tier, policy order, until ``want_bytes`` are freed."""
        victims = self.victims(node_id, tier, want_bytes, block_bytes)
        freed = sum(e.size for e in victims)
        self._drop_victims(victims, tier, node_id)
        if victims:
            tk = (node_id, tier)
            self.counters.evictions[tk] = self.counters.evictions.get(tk, 0) + len(victims)
        return len(victims), freed

    # ------------------------------------------------------------------ quotas

    def tenant_usage(self) -> list[tuple[str, str, int, int, int | None]]:
        """(tenant, tier, committed bytes, blocks, quota or None) for every tenant with blocks or a quota."""
        rows = {tk: (use[0], use[1]) for tk, use in self._usage.items() if use[1]}
        for tenant, tiers in self.config.quotas.items():
            for tier in tiers:
                rows.setdefault((tenant, tier), (0, 0))
        return [(t, tier, b, n, self.config.quotas.get(t, {}).get(tier))
                for (t, tier), (b, n) in sorted(rows.items())]

    def _within_quota(self, tenant: str, tier: str, need: int) -> None:
        """Make ``need`` more bytes of ``tier`` fit the tenant's quota, evicting only its own
        unleased blocks there; RESOURCE_EXHAUSTED if they do not suffice."""
        quota = self.config.quotas.get(tenant, {}).get(tier)
        if quota is None:
            return
        used = self._usage.get((tenant, tier), [0, 0])[0] + self._granted.get((tenant, tier), 0)
        over = used + need - quota
        if over > 0 and need <= quota:
            for node in self.nodes:
                if over <= 0:
                    break
                if tier in node.tier_names():
                    blocks, freed = self._evict_tenant(node.node_id, tier, over, tenant)
                    over -= freed
        if over > 0:
            who = repr(tenant) if tenant else "the default tenant"
            raise PoolFull(
                f"quota exceeded: {who} may hold {quota} bytes in {tier} and holds {used} (committed and "
                f"granted); {need} more do not fit, and none of its other {tier} blocks can be evicted (they are "
                f"leased or not yet committed). Release leases, put fewer blocks, or raise the quota "
                f"(--quotas {tenant}:{tier}=SIZE)")

    def _evict_tenant(self, node_id: int, tier: str, want: int, tenant: str) -> tuple[int, int]:
        victims = self.victims(node_id, tier, want, tenant=tenant)
        freed = sum(e.size for e in victims)
        self._drop_victims(victims, tier, node_id)
        if victims:
            tk = (node_id, tier)
            self.counters.evictions[tk] = self.counters.evictions.get(tk, 0) + len(victims)
        return len(victims), freed

    def _make_room(self, node: NodeHandle, tier: str, size: int, count: int) -> None:
        need = count - node.free_slots_for(tier, size)
        if need > 0:
            self._evict_from(node.node_id, tier, need * size, size)

    def evict_from(self, node_id: int, tier: str, want_bytes: int | None) -> tuple[int, int]:
        """Evict one tier of one node in policy order (the tiering task's NVMe eviction): the
        same path as watermark and admin eviction. Returns (blocks, bytes) freed."""
        return self._evict_from(node_id, tier, want_bytes)

    def make_room(self, node: NodeHandle, tier: str, size: int, count: int) -> None:
        """Evict from ``tier`` until ``count`` blocks of ``size`` fit (promotion makes room so)."""
        self._make_room(node, tier, size, count)

    def evict(self, want_bytes: int | None) -> tuple[int, int, int]:
        """Admin eviction of memory copies (None: all evictable). NVMe copies are kept."""
        blocks = freed = 0
        for node in self.nodes:
            for tier in memory_tiers(node):
                remaining = None if want_bytes is None else want_bytes - freed
                if remaining is not None and remaining <= 0:
                    continue
                b, f = self._evict_from(node.node_id, tier, remaining)
                blocks += b
                freed += f
        leased = sum(1 for e in self._blocks.values() if e.pins)
        return blocks, freed, leased

    def over_watermark(self, node: NodeHandle, tier: str) -> int:
        """Bytes to free in a tier above its high watermark to reach the low one (0 if under)."""
        for usage in node.usage():
            if usage.name == tier and usage.capacity_bytes:
                if usage.used_bytes > self.config.high_watermark * usage.capacity_bytes:
                    return usage.used_bytes - int(self.config.low_watermark * usage.capacity_bytes)
        return 0

    def enforce_watermarks(self) -> int:
        """Evict tiers above the high watermark down to the low one. Returns blocks evicted.

        Tiers that have a next tier on their node are left to the tiering task, which demotes
        them instead: the host-memory tier of a node with a durable tier (to NVMe), and a
        device tier (HBM) of a node with a host-memory tier (to DRAM).
        """
        evicted = 0
        for node in self.nodes:
            caps = node.tier_caps()
            demotes = has_durable_tier(node)
            hosts = any(TierCaps.HOST_SHARED in c for c in caps.values())
            for tier, tier_caps in caps.items():
                if demotes and TierCaps.HOST_SHARED in tier_caps:
                    continue
                if hosts and TierCaps.DEVICE in tier_caps:
                    continue
                excess = self.over_watermark(node, tier)
                if excess:
                    evicted += self._evict_from(node.node_id, tier, excess)[0]
        return evicted

    # ------------------------------------------------------------------ tier movement

    def _moving(self, entry: Entry, node_id: int | None) -> Copy | None:
        """The copy a tier move on ``node_id`` (default: the first copy's node) was about."""
        return entry.copies[0] if node_id is None else entry.copy_on(node_id)

    def demoted(self, entry: Entry, nvme_slot: Slot, node_id: int | None = None) -> None:
        """The mover copied the memory copy of ``entry`` on ``node_id`` (default: its first
        copy's node) to ``nvme_slot`` there; drop the memory slot if nobody reads it."""
        c = self._moving(entry, node_id)
        if c is None:  # its node left meanwhile (forget_node): nothing there to keep
            return
        if entry.doomed:  # removed while moving: the new copy goes when the entry is freed
            c.nvme = c.nvme or nvme_slot
            return
        if c.nvme is None:
            c.nvme = nvme_slot
            self._enter(entry, NVME, c)
        self.counters.demoted_blocks += 1
        if entry.pins == 1 and c.mem is not None:  # only the mover's own pin
            self._release_tier(entry, c, c.mem_tier)  # the other copies stay: each is its node's own
            self._settle(entry)

    def moved_tier(self, entry: Entry, tier: str, slot: Slot, node_id: int | None = None) -> bool:
        """The node copied the memory copy of ``entry`` on ``node_id`` (default: the first
        copy's node) into ``slot`` of its memory tier ``tier`` (HBM demoted to DRAM),
        checksum verified: serve it from there and free the old slot.

        Only when the mover's pin is the only one (a reader may be reading the old slot) and
        the copy still has its memory slot where it was; otherwise returns False and the
        caller frees ``slot``. The other copies stay: they mirror the bytes, not the slot.
        """
        c = self._moving(entry, node_id)
        if (entry.doomed or entry.pins != 1 or c is None or c.mem is None
                or self._blocks.get(entry.key) is not entry):
            return False
        self._release_tier(entry, c, c.mem_tier)
        c.mem, c.mem_tier = slot, tier
        self._enter(entry, tier, c)
        self._settle(entry)
        self.nodes.get(c.node_id).note_resident([CopyView(entry, c)])
        self.counters.demoted_blocks += 1
        return True

    def written_through(self, entry: Entry, nvme_slot: Slot) -> None:
        c = entry.copies[0]
        if entry.doomed:
            c.nvme = c.nvme or nvme_slot
            return
        if c.nvme is None:
            c.nvme = nvme_slot
            self._enter(entry, NVME, c)
            self.counters.written_through_blocks += 1

    def promoted(self, entry: Entry, dram_slot: Slot, node_id: int | None = None) -> None:
        """The node of ``node_id`` (default: the first copy's) read its NVMe copy of ``entry``
        back into ``dram_slot``, checksum verified."""
        c = self._moving(entry, node_id)
        if entry.doomed or c is None or c.mem is not None:
            node = self.nodes.get(node_id if node_id is not None else entry.node_id)
            if node is not None:
                node.free(DRAM, dram_slot)
            return
        c.mem, c.mem_tier = dram_slot, DRAM
        self._enter(entry, DRAM, c)
        self._settle(entry)
        self.nodes.get(c.node_id).note_resident([CopyView(entry, c)])
        self.counters.promoted_blocks += 1

    def corrupt(self, entry: Entry, dram_slot: Slot | None, node_id: int | None = None) -> None:
        """The NVMe copy on ``node_id`` (default: the first copy's node) failed its checksum:
        the node already dropped it from its NVMe. That copy is forgotten; the block lives on
        in its other copies (each checked on its own), or leaves the index with its last."""
        c = self._moving(entry, node_id)
        node = self.nodes.get(c.node_id if c is not None else node_id if node_id is not None else entry.node_id)
        if dram_slot is not None and node is not None:
            node.free(DRAM, dram_slot)
        self.counters.corrupt_blocks += 1
        if c is None or c.nvme is None:
            return
        if not entry.doomed:
            self._leave(entry, NVME, c)
        c.nvme = None  # the mover freed the slot and its catalog entry
        if entry.doomed:
            return
        if c.mem is None and len(entry.copies) == 1:
            self._drop(entry)
        else:
            self._settle(entry)

    def forget_node(self, node_id: int) -> int:
        """Forget every block and grant of a node process that is gone. Returns blocks forgotten.

        Its memory died with it, and what survived on its NVMe comes back when its next
        incarnation registers (under a new id). Nothing is freed or dropped on the node: it
        is not there to ask, and a drop sent to its next incarnation could delete a block
        that survived.
        """
        gone, lost, moved = [], [], []
        for entry in self._blocks.values():
            c = entry.copy_on(node_id)
            if c is None:
                continue
            if len(entry.copies) == 1:
                gone.append(entry)
                continue
            lost.append(entry)
            if c is entry.copies[0]:
                for tier in c.tiers:  # usage counts the first copy; the node's policies go below
                    self._count(entry, tier, -1)
            c.mem = c.nvme = None  # not freed: the node is not there to ask (see above)
            self._settle(entry, moved)  # a copy on a live node is read now
        for observer in self.observers if moved else ():
            observer.stored(moved)
        for call in self.copies_lost if lost else ():
            call(lost)
        for observer in self.observers if gone else ():
            observer.node_lost(gone)
        for entry in gone:
            for tier in entry.copies[0].tiers:
                self._count(entry, tier, -1)
            del self._blocks[entry.key]
            entry.doomed = True
            entry.copies[0].mem = entry.copies[0].nvme = None
        node = self.nodes.get(node_id)
        name = node.name if node is not None else str(node_id)
        for grant in list(self._grants.values()):
            lost = [k for k, e in grant.entries.items() if e.node_id == node_id]
            for key in lost:
                self._ungrant(grant.entries.pop(key))
                self._pending.pop(key, None)
            if lost:
                # The writer is told why at commit, and its next PutStart goes elsewhere.
                self._lost_grants[grant.put_id] = (name, grant.expires_at)
                del self._grants[grant.put_id]
                for entry in grant.entries.values():  # slots on other nodes: free them now
                    self._pending.pop(entry.key, None)
                    self._ungrant(entry)
                    self._release_storage(entry)
        self.nvme_drops.pop(node_id, None)
        self.draining.discard(node_id)
        for tk in [tk for tk in self._policies if tk[0] == node_id]:
            del self._policies[tk]
            self._tier_blocks.pop(tk, None)
        return len(gone)

    def adopt(self, node_id: int, blocks) -> int:
        """Index blocks a node found on NVMe at start (``key, slot, checksum, namespace``).

        A key the index has already becomes one more copy of that block when
        :meth:`_joins_as_copy` allows it (a replica on another host, adopted back after a
        master restart); another stale or surplus copy is dropped from the node's NVMe."""
        now = self.clock()
        adopted = 0
        fresh: list[Entry] = []
        for key, slot, checksum, ns in blocks:
            entry = self._blocks.get(key)
            if entry is not None:
                c = entry.copy_on(node_id)
                if c is not None and c.nvme is None and entry.checksum == checksum:
                    c.nvme = slot  # its memory copy came back too (adopt_memory)
                    self._enter(entry, NVME, c)
                    adopted += 1
                elif c is None and self._joins_as_copy(entry, node_id, checksum):
                    c = Copy(node_id, None, slot)
                    entry.copies.append(c)
                    self._enter(entry, NVME, c)
                    adopted += 1
                elif c is None or c.nvme != slot:
                    self.nvme_drops.setdefault(node_id, []).append((key, slot))
                continue
            fresh.append(self._adopted(Entry(key, ns, node_id, None, slot, -1, now), checksum, NVME))
            adopted += 1
        for observer in self.observers if fresh else ():
            observer.stored(fresh)
        return adopted

    def _adopted(self, entry: Entry, checksum: int, tier: str) -> Entry:
        """Index a block a node reported holding (committed, in ``tier``)."""
        entry.state = COMMITTED
        entry.checksum = checksum
        entry.update_record()
        self._blocks[entry.key] = entry
        self._enter(entry, tier)
        return entry

    def adopt_memory(self, node_id: int, blocks) -> int:
        """Index blocks a node still holds in memory (``key, slot, checksum, namespace, tier``),
        reported when it registers again with the same process: its master restarted. The
        slots are claimed on the node's handle already. A key the index has already becomes
        one more copy of that block when :meth:`_joins_as_copy` allows it; otherwise the
        index keeps the copies it has, and this slot is freed."""
        now = self.clock()
        node = self.nodes.get(node_id)
        adopted = 0
        fresh: list[Entry] = []
        for key, slot, checksum, ns, tier in blocks:
            entry = self._blocks.get(key)
            if entry is not None:
                if entry.copy_on(node_id) is None and self._joins_as_copy(entry, node_id, checksum):
                    c = Copy(node_id, slot, None, tier)
                    entry.copies.append(c)
                    self._enter(entry, tier, c)
                    self._settle(entry)  # served from memory if its first copy is on NVMe only
                    adopted += 1
                else:
                    node.free(tier, slot)
                continue
            fresh.append(self._adopted(Entry(key, ns, node_id, slot, None, -1, now, tier), checksum, tier))
            adopted += 1
        for observer in self.observers if fresh else ():
            observer.stored(fresh)
        return adopted

    def _joins_as_copy(self, entry: Entry, node_id: int, checksum: int) -> bool:
        """Whether a node's report of a block the index has (from another node) is kept as
        one more copy of it: the same bytes (checksum), on a host where the block has no
        copy yet, and fewer copies than the namespace may have (its replicas, plus the
        read-driven ones). Before a namespace's setting is known again (a client registers
        it after a master restart), copies are kept, and trimmed to the setting then."""
        if entry.doomed or entry.checksum != checksum or entry.state != COMMITTED:
            return False
        node = self.nodes.get(node_id)
        if node is None:
            return False
        host = node.endpoint().host_id
        for c in entry.copies:
            other = self.nodes.get(c.node_id)
            if other is None or other.endpoint().host_id == host:
                return False
        if entry.ns not in self._namespaces:
            self._untrimmed.add(entry.ns)
            return len(entry.copies) < MAX_REPLICAS
        return len(entry.copies) < self._copies_allowed(entry.ns)

    def _copies_allowed(self, ns_id: str) -> int:
        return self.replicas_of(ns_id) + self.config.read_replicas

    def _trim_copies(self, ns_id: str) -> None:
        """Free the copies beyond what ``ns_id`` allows of its unleased blocks (kept when
        adopted before its setting was known)."""
        allowed = self._copies_allowed(ns_id)
        for entry in list(self.entries(ns_id)):
            if entry.pins == 0 and len(entry.copies) > allowed:
                for c in entry.copies[allowed:]:
                    self._discard_copy(entry, c)

    # ------------------------------------------------------------------ placement

    def _policy(self, node_id: int, tier: str) -> EvictionPolicy:
        policy = self._policies.get((node_id, tier))
        if policy is None:
            policy = self._policies[(node_id, tier)] = self.policy_factory(self.config.eviction_policy)
        return policy

    def _place(self, size: int, count: int, prefer: str = "", client_host: str = "",
               exclude: set[int] = frozenset()) -> tuple[NodeHandle, str]:
        """Choose the node and memory tier for ``count`` new blocks of a writer on ``client_host``.

        Only nodes the writer can reach are candidates: those on its host, and those with a
        network data plane (nodes in ``exclude``, which the writer failed to reach, are not).
        Among them, a node with room for the whole batch wins over one without; then a node
        on the writer's host (its copy is one memcpy); then the most free room. The writer's
        tier preference (HBM) holds only on its own host, where CUDA IPC reaches it.
        """
        best = None
        reachable = 0
        for node in self.nodes:
            if node.node_id in exclude or node.node_id in self.draining:
                continue
            ep = node.endpoint()
            local = not client_host or ep.host_id == client_host
            if not local and not (ep.tcp_address or ep.ucx_worker_address):
                continue
            reachable += 1
            caps = node.tier_caps()
            host = [t for t, c in caps.items() if TierCaps.HOST_SHARED in c]
            if local and prefer in caps and TierCaps.PERSISTENT not in caps[prefer]:
                tier = prefer  # the writer's own host reaches any memory tier (HBM by CUDA IPC)
                if (host and prefer != host[0] and node.free_slots_for(prefer, size) < count
                        and node.free_slots_for(host[0], size) >= count):
                    # A full HBM would evict to make room; host memory takes the batch instead
                    # (a GPU writer reaches it by DMA), and HBM's demotion frees slots meanwhile.
                    tier = host[0]
            else:  # host memory: what shared memory and every network data plane serve
                tier = host[0] if host else memory_tiers(node)[0]
            room = node.free_slots_for(tier, size)
            rank = (room >= count, local, room)
            if best is None or rank > best[0]:
                best = (rank, node, tier)
        if best is None:
            if len(self.nodes) == 0:
                raise PoolFull("no storage node is registered with this master; start a kvpool node")
            skipped = f" (excluding nodes {sorted(exclude)}, which this writer could not reach)" if exclude else ""
            raise Unavailable(
                f"no storage node can take this writer's blocks{skipped}: nodes on other hosts need a data "
                f"server (kvpool node --data-port), and nodes on the writer's host ({client_host}) have none left"
            )
        return best[1], best[2]

    def place(self, size: int, count: int, exclude: Iterable[int] = ()) -> tuple[NodeHandle, str]:
        """Where ``count`` blocks of ``size`` moved off the nodes in ``exclude`` go (a drain):
        the rule of :meth:`_place` for a writer that reaches every node with a data server."""
        return self._place(size, count, exclude=set(exclude))

    def relocate(self, entry: Entry, node_id: int, tier: str, slot: Slot) -> None:
        """``entry``'s bytes were copied and verified into ``slot`` of ``tier`` on ``node_id``:
        serve them from there, and free the old copies.

        The caller holds the only pin (it copied under it), so no reader holds the old slot.
        """
        if entry.pins != 1 or entry.doomed or self._blocks.get(entry.key) is not entry:
            raise FailedPrecondition(f"block {entry.key.hex()} cannot move: it is leased or gone")
        first = entry.copies[0]
        there = entry.copy_on(node_id)
        if there is not None and there is not first:  # one copy per node: the moved one stays
            self._discard_copy(entry, there)
        for tier_ in first.tiers:
            self._release_tier(entry, first, tier_)
        first.node_id, first.mem, first.mem_tier = node_id, slot, tier
        entry.update_record()
        self._enter(entry, tier, first)

    def _full_message(self, node: NodeHandle, tier: str, size: int, count: int) -> str:
        leased = sum(1 for e in self._blocks.values() if e.pins and e.node_id == node.node_id)
        return (
            f"pool full: cannot place {count} blocks of {size} bytes in {tier} on node "
            f"{node.name}: {len(self._pending)} blocks are pending commit and {leased} are leased, "
            f"so nothing more is evictable; release leases, commit or abort open puts, or start "
            f"the node with a larger tier (e.g. --dram)"
        )

    # ------------------------------------------------------------------ expiry and stats

    def expire(self) -> tuple[int, int]:
        """Release grants and leases past their deadline. Returns (grants, leases) expired."""
        now = self.clock()
        grants = [g for g in self._grants.values() if g.expires_at <= now]
        for grant in grants:
            del self._grants[grant.put_id]
            self._release_grant_entries(grant)
        leases = [l for l in self._leases.values() if l.expires_at <= now]
        for lease in leases:
            del self._leases[lease.lease_id]
            self._unpin(lease)
        for put_id in [p for p, (_, exp) in self._lost_grants.items() if exp <= now]:
            del self._lost_grants[put_id]
        self.counters.expired_grants += len(grants)
        self.counters.expired_leases += len(leases)
        return len(grants), len(leases)

    def entry(self, key: bytes, tenant: str = "") -> Entry | None:
        key = scope_keys([key], tenant)[0]
        return self._blocks.get(key) or self._pending.get(key)

    def entries(self, ns_id: str = "", tenant: str | None = None):
        """Committed entries, of one namespace and/or one tenant (None: every tenant)."""
        for entry in self._blocks.values():
            if (not ns_id or entry.ns == ns_id) and (tenant is None or entry.tenant == tenant):
                yield entry

    @property
    def block_count(self) -> int:
        return len(self._blocks)

    @property
    def pending_count(self) -> int:
        return len(self._pending)

    @property
    def lease_count(self) -> int:
        return len(self._leases)

    def tier_blocks(self, node_id: int, tier: str) -> int:
        return self._tier_blocks.get((node_id, tier), 0)

    def committed_bytes(self) -> int:
        return sum(e.size for e in self._blocks.values())
