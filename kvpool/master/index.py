"""The master's block index: two-phase puts, read leases, longest-prefix lookup, eviction.

Life of a block entry::

    put_start ──► PENDING ──put_commit──► COMMITTED ──evict/remove/flush──► freed
                     │                        │
                     └─abort / grant expiry─► freed      remove while leased ─► DOOMED
                                                          (invisible) ── last release ─► freed

Invariants (each one is tested):

* Only COMMITTED entries live in ``_blocks``; Lookup and Get read nothing else, so a block
  that was not committed is never readable.
* An entry with ``pins > 0`` (a live read lease) is never evicted or freed. Removing it
  makes it invisible at once and frees it when the last lease ends.
* Every slot the index allocates is freed exactly once (``_free_slot``).
* A key is granted to at most one writer at a time; others get PUT_IN_FLIGHT.

All methods run on the master's event-loop thread: the index takes no locks.
Errors are raised as :mod:`kvpool.errors` exceptions with messages a person can act on.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from kvpool.errors import FailedPrecondition, InvalidArgument, NotFound, PoolFull
from kvpool.identity import KEY_BYTES, Namespace, split_keys
from kvpool.master.eviction import DEFAULT_POLICY, BlockInfo, EvictionPolicy, make_policy
from kvpool.master.nodes import NodeHandle, NodeRegistry
from kvpool.tiers.base import Slot
from kvpool.wire import pack_record

__all__ = ["BlockIndex", "IndexConfig", "Entry", "PutGrant", "ReadLease", "PUT_GRANTED", "PUT_PRESENT", "PUT_IN_FLIGHT"]

PUT_GRANTED, PUT_PRESENT, PUT_IN_FLIGHT = 1, 2, 3
PENDING, COMMITTED = "pending", "committed"


@dataclass
class IndexConfig:
    grant_ttl_s: float = 30.0
    lease_ttl_s: float = 30.0
    max_batch: int = 65536
    #: Evict down to ``low_watermark`` once a tier's usage passes ``high_watermark``.
    high_watermark: float = 0.95
    low_watermark: float = 0.90
    eviction_policy: str = DEFAULT_POLICY


class Entry:
    """One block (one replica) in the index."""

    __slots__ = ("key", "ns", "node_id", "tier", "slot", "checksum", "state", "pins",
                 "doomed", "position", "created", "last_access", "hits", "record", "policy")

    def __init__(self, key: bytes, ns: str, node_id: int, tier: str, slot: Slot,
                 position: int, now: float, policy: EvictionPolicy) -> None:
        self.key = key
        self.ns = ns
        self.node_id = node_id
        self.tier = tier
        self.slot = slot
        self.checksum = 0
        self.state = PENDING
        self.pins = 0
        self.doomed = False
        self.position = position
        self.created = now
        self.last_access = now
        self.hits = 0
        self.policy = policy
        self.record = pack_record(node_id, tier, slot.offset, slot.size, 0)


@dataclass
class PutGrant:
    put_id: str
    entries: dict[bytes, Entry]
    expires_at: float


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


@dataclass(frozen=True)
class NamespaceInfo:
    namespace: Namespace
    block_bytes: int


class BlockIndex:
    def __init__(self, nodes: NodeRegistry, config: IndexConfig | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.nodes = nodes
        self.config = config or IndexConfig()
        self.clock = clock
        self.started = clock()
        make_policy(self.config.eviction_policy)  # fail fast on an unknown name
        self._namespaces: dict[str, NamespaceInfo] = {}
        self._blocks: dict[bytes, Entry] = {}        # committed, visible
        self._pending: dict[bytes, Entry] = {}       # granted, not yet committed
        self._grants: dict[str, PutGrant] = {}
        self._leases: dict[str, ReadLease] = {}
        self._policies: dict[tuple[int, str], EvictionPolicy] = {}
        self._tier_blocks: dict[tuple[int, str], int] = {}
        self.counters = Counters()

    # ------------------------------------------------------------------ namespaces

    def register_namespace(self, ns: Namespace) -> NamespaceInfo:
        info = NamespaceInfo(ns, ns.layout.block_bytes)
        self._namespaces.setdefault(ns.id, info)
        return info

    def namespace(self, ns_id: str) -> NamespaceInfo:
        info = self._namespaces.get(ns_id)
        if info is None:
            raise NotFound(
                f"namespace {ns_id!r} is not registered with this master; call "
                f"RegisterNamespace first (the kvpool client does this on connect)"
            )
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
                  first_position: int | None = None) -> tuple[PutGrant, list[int]]:
        """Grant slots for the keys that are neither present nor in flight.

        All-or-nothing: if the pool cannot make room for every grant (after evicting what
        the policy allows), nothing is granted and :class:`PoolFull` is raised.
        """
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
        now = self.clock()
        statuses: list[int] = []
        wanted: list[int] = []
        seen: set[bytes] = set()
        for i, key in enumerate(keys):
            entry = self._blocks.get(key)
            if entry is not None:
                statuses.append(PUT_PRESENT)
                entry.policy.access(key)  # about to be reused: keep it out of this put's evictions
                self.counters.dedup_blocks += 1
            elif key in self._pending or key in seen:
                statuses.append(PUT_IN_FLIGHT)
            else:
                statuses.append(PUT_GRANTED)
                wanted.append(i)
                seen.add(key)
        granted: dict[bytes, Entry] = {}
        if wanted:
            node, tier = self._place(info.block_bytes, len(wanted))
            policy = self._policy(node.node_id, tier)
            base = first_position if first_position is not None else None
            try:
                for i in wanted:
                    slot = node.allocate(tier, info.block_bytes)
                    if slot is None:
                        self._make_room(node, tier, info.block_bytes, len(wanted) - len(granted))
                        slot = node.allocate(tier, info.block_bytes)
                        if slot is None:
                            raise PoolFull(self._full_message(node, tier, info.block_bytes, len(wanted)))
                    position = base + i if base is not None else -1
                    granted[keys[i]] = Entry(keys[i], ns_id, node.node_id, tier, slot, position, now, policy)
            except BaseException:
                for entry in granted.values():
                    node.free(tier, entry.slot)
                raise
        grant = PutGrant(secrets.token_hex(8), granted, now + self.config.grant_ttl_s)
        if granted:
            self._pending.update(granted)
            self._grants[grant.put_id] = grant
        return grant, statuses

    def put_commit(self, put_id: str, keys: list[bytes] | None, checksums: list[int]) -> tuple[int, int]:
        """Make granted blocks visible. Grants of the put that are not committed are released."""
        grant = self._grants.get(put_id)
        if grant is None:
            raise NotFound(
                f"PutCommit: no open put {put_id!r}; it was committed or aborted already, or its "
                f"grant expired after {self.config.grant_ttl_s:g}s (call PutStart again)"
            )
        if keys is None or not keys:
            keys = list(grant.entries)
        if len(checksums) != len(keys):
            raise InvalidArgument(
                f"PutCommit: {len(keys)} blocks to commit but {len(checksums)} checksums; send one "
                f"xxh3-64 checksum per block"
            )
        for key in keys:
            if key not in grant.entries:
                raise FailedPrecondition(
                    f"PutCommit: key {key.hex()} was not granted by put {put_id}; commit only keys "
                    f"that PutStart answered with PUT_GRANTED"
                )
        del self._grants[put_id]
        now = self.clock()
        for key, checksum in zip(keys, checksums):
            entry = grant.entries.pop(key)
            del self._pending[key]
            entry.state = COMMITTED
            entry.checksum = checksum
            entry.record = pack_record(entry.node_id, entry.tier, entry.slot.offset, entry.slot.size, checksum)
            entry.last_access = now
            self._blocks[key] = entry
            tk = (entry.node_id, entry.tier)
            self._tier_blocks[tk] = self._tier_blocks.get(tk, 0) + 1
            entry.policy.insert(key, BlockInfo(entry.slot.size, entry.position, entry.ns))
            self.counters.put_blocks += 1
            self.counters.put_bytes += entry.slot.size
        released = self._release_grant_entries(grant)
        self.enforce_watermarks()
        return len(keys), released

    def put_abort(self, put_id: str) -> int:
        grant = self._grants.pop(put_id, None)
        if grant is None:
            raise NotFound(f"PutAbort: no open put {put_id!r} (already committed, aborted or expired)")
        return self._release_grant_entries(grant)

    def _release_grant_entries(self, grant: PutGrant) -> int:
        for key, entry in grant.entries.items():
            self._pending.pop(key, None)
            self._free_slot(entry)
        n = len(grant.entries)
        grant.entries.clear()
        return n

    def abort_all(self) -> int:
        """Release every open grant (shutdown)."""
        return sum(self.put_abort(put_id) for put_id in list(self._grants))

    # ------------------------------------------------------------------ read

    def lookup(self, ns_id: str, keys: list[bytes], lease: bool = True) -> tuple[int, ReadLease | None]:
        """The longest present prefix of ``keys``; with ``lease``, pinned under a read lease."""
        self.namespace(ns_id)
        self._check_keys(keys, "Lookup")
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
        self.namespace(ns_id)
        self._check_keys(keys, "Get")
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
        lease = ReadLease(secrets.token_hex(8), entries, self.clock() + self.config.lease_ttl_s)
        self._leases[lease.lease_id] = lease
        return lease

    def release(self, lease_ids: Iterable[str]) -> int:
        """End leases. Unknown ids (already released or expired) are ignored: release is idempotent."""
        released = 0
        for lease_id in lease_ids:
            lease = self._leases.pop(lease_id, None)
            if lease is not None:
                self._unpin(lease)
                released += 1
        return released

    def _unpin(self, lease: ReadLease) -> None:
        now = self.clock()
        for entry in lease.entries:
            entry.pins -= 1
            if entry.doomed:
                if entry.pins == 0:
                    self._free_slot(entry)
                continue
            entry.hits += 1
            entry.last_access = now
            entry.policy.access(entry.key)

    # ------------------------------------------------------------------ removal and eviction

    def remove(self, keys: Iterable[bytes]) -> tuple[int, int]:
        """Remove committed blocks. Leased ones vanish now and are freed on their last release."""
        removed = deferred = 0
        for key in keys:
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
        keys = [k for k, e in self._blocks.items() if not ns_id or e.ns == ns_id]
        return self.remove(keys)

    def _drop(self, entry: Entry) -> bool:
        """Take a committed entry out of the index. True if freed now, False if deferred."""
        del self._blocks[entry.key]
        entry.policy.remove(entry.key)
        tk = (entry.node_id, entry.tier)
        self._tier_blocks[tk] -= 1
        if entry.pins:
            entry.doomed = True
            return False
        self._free_slot(entry)
        return True

    def _free_slot(self, entry: Entry) -> None:
        node = self.nodes.get(entry.node_id)
        if node is not None:
            node.free(entry.tier, entry.slot)

    def _evictable(self, key: bytes) -> bool:
        entry = self._blocks.get(key)
        return entry is not None and entry.pins == 0

    def _evict_from(self, node_id: int, tier: str, want_bytes: int | None, size: int | None = None) -> tuple[int, int]:
        """Evict unleased blocks of one tier, policy order, until ``want_bytes`` are freed."""
        policy = self._policies.get((node_id, tier))
        if policy is None:
            return 0, 0
        blocks = freed = 0
        while want_bytes is None or freed < want_bytes:
            victims = policy.select_victims(64, self._evictable)
            if not victims:
                break
            for key in victims:
                entry = self._blocks[key]
                self._drop(entry)
                blocks += 1
                freed += entry.slot.size
                if want_bytes is not None and freed >= want_bytes:
                    break
        if blocks:
            tk = (node_id, tier)
            self.counters.evictions[tk] = self.counters.evictions.get(tk, 0) + blocks
        return blocks, freed

    def _make_room(self, node: NodeHandle, tier: str, size: int, count: int) -> None:
        need = count - node.free_slots_for(tier, size)
        if need > 0:
            self._evict_from(node.node_id, tier, need * size)

    def evict(self, want_bytes: int | None) -> tuple[int, int, int]:
        """Admin eviction across all tiers. ``None`` evicts everything evictable."""
        blocks = freed = 0
        for node in self.nodes:
            for tier in node.tier_names():
                remaining = None if want_bytes is None else want_bytes - freed
                if remaining is not None and remaining <= 0:
                    break
                b, f = self._evict_from(node.node_id, tier, remaining)
                blocks += b
                freed += f
        leased = sum(1 for e in self._blocks.values() if e.pins)
        return blocks, freed, leased

    def enforce_watermarks(self) -> int:
        """Evict tiers above the high watermark down to the low one. Returns blocks evicted."""
        evicted = 0
        for node in self.nodes:
            for usage in node.usage():
                if usage.capacity_bytes and usage.used_bytes > self.config.high_watermark * usage.capacity_bytes:
                    target = usage.used_bytes - int(self.config.low_watermark * usage.capacity_bytes)
                    evicted += self._evict_from(node.node_id, usage.name, target)[0]
        return evicted

    # ------------------------------------------------------------------ placement

    def _policy(self, node_id: int, tier: str) -> EvictionPolicy:
        policy = self._policies.get((node_id, tier))
        if policy is None:
            policy = self._policies[(node_id, tier)] = make_policy(self.config.eviction_policy)
        return policy

    def _place(self, size: int, count: int) -> tuple[NodeHandle, str]:
        """New blocks go to the top tier of the node with the most room for them."""
        best = None
        for node in self.nodes:
            tier = node.tier_names()[0]
            room = node.free_slots_for(tier, size)
            if best is None or room > best[0]:
                best = (room, node, tier)
        if best is None:
            raise PoolFull("no storage node is registered with this master; start a kvpool node")
        return best[1], best[2]

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
        self.counters.expired_grants += len(grants)
        self.counters.expired_leases += len(leases)
        return len(grants), len(leases)

    def entry(self, key: bytes) -> Entry | None:
        return self._blocks.get(key) or self._pending.get(key)

    def entries(self, ns_id: str = ""):
        for entry in self._blocks.values():
            if not ns_id or entry.ns == ns_id:
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
        return sum(e.slot.size for e in self._blocks.values())
