"""Replay a FAST'25 (Mooncake) trace through the master's index and its eviction policy,
and against Belady's MIN.

The trace format is one JSON object per line with ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids``: one id per 512-token prompt block, remapped prefix hashes,
so two requests share ids exactly as far as their prompts share a prefix.

What the replay measures
------------------------
A request's *prefix hit* is the leading run of its ``hash_ids`` that is resident; the first
miss ends it. The hit rate is ``hit blocks / all blocks`` over the whole trace.

How a policy is driven
----------------------
:func:`replay` runs the master's real :class:`~kvpool.master.index.BlockIndex` over a
:class:`ReplayNode`, a node with one DRAM tier of ``capacity`` slots and no bytes (the master
never touches bytes, so it cannot tell). Each request does what a worker does through the
client, in this order:

1. ``lookup(keys, lease=True)``: the leading resident run is the hit, and it is leased;
2. if anything missed, ``put_start(keys, first_position=0)`` with the whole chain, as
   ``AsyncClient.publish`` sends it: present blocks are deduplicated, the rest granted,
   evicting what the tier's policy chooses when the tier is full (the leased prefix is
   pinned, so a request never evicts its own hit);
3. ``put_commit`` of every grant;
4. ``release`` of the lease, which is when the index reports the reads to the policy.

If one request needs more room than the tier has once its own blocks are pinned, its tail
is not cached (``uncached``), as a worker whose put is refused would do.

The policy is whatever the index builds from its registry name, wrapped by
:class:`CheckedPolicy`, which times every call (``us_per_ref``: policy CPU per block
reference, the master's eviction bookkeeping: every call the index makes to the policy,
with the index's ``evictable`` predicate that the policy calls back) and checks every
answer (a victim must be resident, evictable, distinct and within the count asked; ``len``
must track the tier), so a broken policy fails loudly instead of reporting a rosy number.
The index's own work around those calls is not in ``us_per_ref``; the whole loop's CPU per
reference is reported beside it (``loop_us_per_ref``).
"""

from __future__ import annotations

import heapq
import json
import math
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

from kvpool.errors import PoolFull
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.eviction import BlockInfo, EvictionPolicy, make_policy
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from kvpool.tiers.base import Slot, TierCaps, TierUsage
from kvpool.transport.endpoint import NodeEndpoint

__all__ = [
    "Trace",
    "ReplayResult",
    "load_trace",
    "replay",
    "belady",
    "compare",
    "compare_runs",
    "Progress",
    "PROGRESS_EVERY",
    "block_key",
    "geomean",
    "PolicyContractError",
    "CheckedPolicy",
    "ReplayNode",
]

_INF = 1 << 62

#: ``progress(n)``: n more requests were replayed (the CLI's progress bar).
Progress = Callable[[int], None]
#: Requests between two progress calls: rare enough to cost nothing beside a request's work.
PROGRESS_EVERY = 512


@dataclass(frozen=True)
class Trace:
    """A trace in memory: per request, the block ids of its prompt, in order."""

    requests: tuple[tuple[int, ...], ...]
    timestamps: tuple[int, ...] = ()
    name: str = ""

    @property
    def total_blocks(self) -> int:
        return sum(len(r) for r in self.requests)

    def __len__(self) -> int:
        return len(self.requests)


@dataclass
class ReplayResult:
    name: str
    capacity: int
    hit_blocks: int = 0
    total_blocks: int = 0
    inserts: int = 0
    evictions: int = 0
    uncached: int = 0  # blocks that could not be cached because one request exceeded capacity
    seconds: float = 0.0
    #: Seconds spent inside the policy's calls (the master's eviction bookkeeping).
    policy_seconds: float = 0.0
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0

    @property
    def us_per_ref(self) -> float:
        """Policy CPU per block reference, in microseconds."""
        return self.policy_seconds / self.total_blocks * 1e6 if self.total_blocks else 0.0


def load_trace(path: str | os.PathLike, limit: int | None = None) -> Trace:
    """Read a FAST'25 jsonl trace. ``limit`` keeps only the first requests."""
    reqs: list[tuple[int, ...]] = []
    stamps: list[int] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                obj = json.loads(line)
                ids = tuple(int(h) for h in obj["hash_ids"])
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a FAST'25 trace record ({e})") from None
            reqs.append(ids)
            stamps.append(int(obj.get("timestamp", 0)))
            if limit is not None and len(reqs) >= limit:
                break
    return Trace(tuple(reqs), tuple(stamps), name=os.path.basename(os.fspath(path)))


def block_key(block_id: int) -> bytes:
    """The 16-byte index key the replay uses for a trace block id."""
    return block_id.to_bytes(16, "little", signed=False)


def _as_trace(trace: Trace | Iterable[Sequence[int]]) -> Trace:
    if isinstance(trace, Trace):
        return trace
    return Trace(tuple(tuple(int(h) for h in r) for r in trace))


class PolicyContractError(AssertionError):
    """The policy answered something the index would reject."""


class ReplayNode:
    """A :class:`~kvpool.master.nodes.NodeHandle` with one DRAM tier of ``capacity`` slots
    and no memory behind them: slot accounting is all the master asks of a node on this
    path. A double free raises, as in a real arena."""

    pulls_replicas = False
    incarnation = ""
    unapplied_changes = 0
    control_address = ""
    last_seen = None

    def __init__(self, capacity: int, block_bytes: int, node_id: int = 1) -> None:
        self.node_id = node_id
        self.name = "replay"
        self.data_key = bytes(32)
        self.capacity = capacity
        self.block_bytes = block_bytes
        self._free = list(range(capacity - 1, -1, -1))
        self._used: set[int] = set()

    def tier_names(self) -> list[str]:
        return ["dram"]

    def tier_caps(self) -> dict[str, TierCaps]:
        return {"dram": TierCaps.HOST_SHARED | TierCaps.ADDRESSABLE}  # as a DRAM arena declares

    def note_resident(self, entries) -> None:
        pass  # no process behind it to tell

    def allocate(self, tier: str, size: int) -> Slot | None:
        if not self._free:
            return None
        i = self._free.pop()
        self._used.add(i)
        return Slot(i * size, size)

    def free(self, tier: str, slot: Slot) -> None:
        i = slot.offset // slot.size
        if i not in self._used:
            raise AssertionError(f"replay node: slot {i} freed twice")
        self._used.remove(i)
        self._free.append(i)

    def free_slots_for(self, tier: str, size: int) -> int:
        return len(self._free)

    def usage(self) -> list[TierUsage]:
        n = len(self._used)
        return [TierUsage("dram", self.capacity * self.block_bytes, n * self.block_bytes, n)]

    def endpoint(self) -> NodeEndpoint:
        return NodeEndpoint(self.node_id, self.name, "replay")

    def recover(self) -> list:
        return []

    async def demote(self, items, *, keep_dram: bool):  # pragma: no cover - no NVMe tier
        raise NotImplementedError("the replay node has no NVMe tier")

    async def promote(self, items):  # pragma: no cover
        raise NotImplementedError("the replay node has no NVMe tier")

    async def drop_nvme(self, items) -> None:  # pragma: no cover
        raise NotImplementedError("the replay node has no NVMe tier")

    async def pull(self, source, access, tier: str, slots, keys=(), namespace_ids=()) -> list[int]:  # pragma: no cover
        raise NotImplementedError("the replay node holds no bytes to copy")

    async def move_tier(self, items, source_tier: str, target_tier: str):  # pragma: no cover
        raise NotImplementedError("the replay node has one memory tier")

    async def disconnect(self) -> None:
        pass


class CheckedPolicy(EvictionPolicy):
    """Wraps a policy: times each call (``seconds``) and checks each answer against the
    contract; the checks run outside the timed part."""

    def __init__(self, inner: EvictionPolicy) -> None:
        self.inner = inner
        self.name = getattr(inner, "name", type(inner).__name__)
        self.seconds = 0.0
        self.resident: set[bytes] = set()

    def insert(self, key: bytes, info: BlockInfo) -> None:
        self.insert_many([key], [info])

    def insert_many(self, keys, infos) -> None:
        t0 = time.perf_counter()
        self.inner.insert_many(keys, infos)
        self.seconds += time.perf_counter() - t0
        self.resident.update(keys)

    def access(self, key: bytes) -> None:
        self.access_many([key])

    def access_many(self, keys) -> None:
        t0 = time.perf_counter()
        self.inner.access_many(keys)
        self.seconds += time.perf_counter() - t0

    def remove(self, key: bytes) -> None:
        t0 = time.perf_counter()
        self.inner.remove(key)
        self.seconds += time.perf_counter() - t0
        self.resident.discard(key)

    def remove_many(self, keys) -> None:
        t0 = time.perf_counter()
        self.inner.remove_many(keys)
        self.seconds += time.perf_counter() - t0
        self.resident.difference_update(keys)

    def select_victims(self, count: int, evictable: Callable[[bytes], bool]) -> list[bytes]:
        t0 = time.perf_counter()
        out = self.inner.select_victims(count, evictable)
        self.seconds += time.perf_counter() - t0
        if len(out) > count:
            raise PolicyContractError(f"{self.name}: asked for {count} victims, got {len(out)}")
        if len(set(out)) != len(out):
            raise PolicyContractError(f"{self.name}: a victim is listed twice")
        for key in out:
            if key not in self.resident or not evictable(key):
                raise PolicyContractError(f"{self.name}: bad victim {key!r} (not resident or not evictable)")
        return out

    def __len__(self) -> int:
        return len(self.inner)


def replay(
    trace: Trace | Iterable[Sequence[int]],
    policy: EvictionPolicy | str | None,
    capacity: int,
    *,
    block_size: int = 1,
    check: bool = True,
    progress: Progress | None = None,
) -> ReplayResult:
    """Replay ``trace`` through the master's index with ``policy`` (an instance, or a
    registry name) at ``capacity`` blocks. See the module docstring for the exact calls.

    ``block_size`` is kept for compatibility and ignored: capacity is counted in blocks and
    the index sees blocks of one namespace's size. ``progress(n)`` is told of every
    :data:`PROGRESS_EVERY` requests replayed, and of the rest at the end (n sums to the
    trace's length).
    """
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    trace = _as_trace(trace)
    if policy is None or isinstance(policy, str):
        policy = make_policy(policy)
    type(policy).prepare(wait=True)  # compiled code is loaded before the clock starts
    checked = CheckedPolicy(policy)
    name = checked.name
    layout = KVLayout(1, 1, 8, "float16", 16)  # 512-byte blocks: the size never matters here
    ns = Namespace("replay", layout)
    nodes = NodeRegistry()
    node = ReplayNode(capacity, layout.block_bytes)
    nodes.add(node)
    made: list[EvictionPolicy] = []

    def factory(_name: str) -> EvictionPolicy:
        if made:
            raise PolicyContractError("the replay index asked for a second policy (it has one tier)")
        made.append(checked)
        return checked

    # Watermarks at 1.0: the tier is used to its last slot, as the capacity says.
    index = BlockIndex(nodes, IndexConfig(high_watermark=1.0, low_watermark=1.0, max_batch=1 << 30),
                       policy_factory=factory)
    index.register_namespace(ns)
    ns_id = ns.id
    size = layout.block_bytes
    t0 = time.perf_counter()
    cpu0 = time.thread_time()

    keys: dict[int, bytes] = {}
    hits = total = inserts = uncached = 0
    for r, ids in enumerate(trace.requests):
        if progress is not None and r and r % PROGRESS_EVERY == 0:
            progress(PROGRESS_EVERY)
        n = len(ids)
        if not n:
            continue
        total += n
        rkeys = []
        for h in ids:
            k = keys.get(h)
            if k is None:
                k = keys[h] = block_key(h)
            rkeys.append(k)
        hit, lease = index.lookup(ns_id, rkeys, lease=True)
        hits += hit
        if hit < n:
            cut = n
            while True:
                try:
                    grant, _ = index.put_start(ns_id, rkeys[:cut], [size] * cut, 0)
                    break
                except PoolFull:
                    # One request needs more room than the tier has beside its own pinned
                    # blocks: cache the head of its chain.
                    cut = min(cut - 1, capacity)
                    if cut <= hit:
                        grant = None
                        break
            uncached += n - cut if grant is not None else n - hit
            if grant is not None and grant.entries:
                inserts += index.put_commit(grant.put_id, None, [0] * len(grant.entries))[0]
        if lease is not None:
            index.release([lease.lease_id])
        if check and len(checked) != index.tier_blocks(node.node_id, "dram"):
            raise PolicyContractError(
                f"{name}: len(policy)={len(checked)} but {index.tier_blocks(node.node_id, 'dram')} resident")

    if progress is not None and trace.requests:
        progress(len(trace.requests) - (len(trace.requests) - 1) // PROGRESS_EVERY * PROGRESS_EVERY)
    evictions = sum(index.counters.evictions.values())
    res = ReplayResult(name, capacity, hits, total, inserts, evictions, uncached)
    res.seconds = time.perf_counter() - t0
    # Policy calls are timed on the wall clock (a CPU clock costs a system call, more than
    # some calls it would time). On a shared machine the thread is not always running, so
    # the wall time is scaled by the share of the replay's wall time it ran on a CPU.
    cpu = time.thread_time() - cpu0
    share = min(1.0, cpu / res.seconds) if res.seconds > 0 else 1.0
    res.policy_seconds = checked.seconds * share
    res.extra["cpu_share"] = share
    # The whole loop's CPU per reference: the index's lookup, put, commit, eviction and
    # release work, the policy, and this driver's own checks (an upper bound on the master's).
    res.extra["loop_us_per_ref"] = cpu / total * 1e6 if total else 0.0
    return res


def belady(trace: Trace | Iterable[Sequence[int]], capacity: int, progress: Progress | None = None) -> ReplayResult:
    """Belady's MIN at ``capacity`` blocks, under the same protocol as :func:`replay`
    (``progress`` as there).

    What this computes, exactly: each request *references* all of its blocks. The cache is run
    with the same publish rule as the master (every non-resident block of a request is inserted,
    a request's own blocks cannot be evicted while it is served, a request larger than the
    capacity leaves its tail uncached), and the same prefix-hit accounting (leading resident
    run). The only difference from a real policy is the victim choice: when room is needed, MIN
    evicts the resident block whose next reference lies farthest in the future (never
    referenced again counts as infinitely far), ties broken by evicting the deeper block.

    Why it is a fair upper reference: it is the classic offline-optimal rule applied to the very
    reference stream the policies see, with the same constraints, and it has perfect knowledge
    of the future. In this trace a block id stands for a whole prefix, so every request that
    references a block also references all of its ancestors: an ancestor's next reference is
    never later than its descendant's. MIN therefore never keeps a descendant while evicting
    its ancestor for a future reference (ties go to the deeper block), which is exactly what a
    prefix cache wants; it keeps the chains that are reused soonest. MIN is provably optimal for
    the count of *all* block hits on the stream; the prefix hit count equals the block hit
    count whenever the cached set is closed under ancestors, which the rule above keeps for
    every block with a future use (unless one request alone exceeds the capacity). It is not
    a formal bound on the prefix metric for every possible trace, so a policy could in
    principle exceed it slightly; reports show ``policy / belady`` so that would be visible.
    """
    trace = _as_trace(trace)
    t0 = time.perf_counter()
    reqs = trace.requests
    # next_use[r][i]: index of the next request (after r) that references reqs[r][i], or _INF.
    nxt: list[list[int]] = [None] * len(reqs)  # type: ignore[list-item]
    last: dict[int, int] = {}
    for r in range(len(reqs) - 1, -1, -1):
        ids = reqs[r]
        nxt[r] = [last.get(h, _INF) for h in ids]
        for h in ids:
            last[h] = r
    resident: dict[int, int] = {}  # block id -> its current next reference
    heap: list[tuple[int, int, int]] = []  # (-next_use, -position, block id); lazy deletion
    push, pop = heapq.heappush, heapq.heappop
    hits = total = inserts = evictions = uncached = 0
    for r, ids in enumerate(reqs):
        if progress is not None and r and r % PROGRESS_EVERY == 0:
            progress(PROGRESS_EVERY)
        n = len(ids)
        total += n
        nr = nxt[r]
        i = 0
        while i < n and ids[i] in resident:
            i += 1
        hits += i
        missing = [j for j in range(i, n) if ids[j] not in resident]
        # Every referenced block's next reference moves forward.
        for j in range(n):
            h = ids[j]
            if h in resident:
                resident[h] = nr[j]
                push(heap, (-nr[j], -j, h))
        need = len(resident) + len(missing) - capacity
        if need > 0:
            protected = set(ids)
            stash = []
            while need > 0 and heap:
                e = pop(heap)
                h = e[2]
                if resident.get(h, -1) != -e[0]:
                    continue  # stale
                if h in protected:
                    stash.append(e)
                    continue
                del resident[h]
                evictions += 1
                need -= 1
            for e in stash:
                push(heap, e)
            room = capacity - len(resident)
            if room < len(missing):
                uncached += len(missing) - max(room, 0)
                missing = missing[: max(room, 0)]
        for j in missing:
            h = ids[j]
            resident[h] = nr[j]
            push(heap, (-nr[j], -j, h))
        inserts += len(missing)
        if len(heap) > 4 * capacity + 1024:  # keep lazy garbage bounded
            heap = [(-nu, -p, h) for (nu, p, h) in ((-a, -b, c) for a, b, c in heap) if resident.get(h, -1) == nu]
            heapq.heapify(heap)
    if progress is not None and reqs:
        progress(len(reqs) - (len(reqs) - 1) // PROGRESS_EVERY * PROGRESS_EVERY)
    res = ReplayResult("belady", capacity, hits, total, inserts, evictions, uncached)
    res.seconds = time.perf_counter() - t0
    return res


def geomean(xs: Sequence[float]) -> float:
    if not xs or any(x <= 0 for x in xs):
        return 0.0
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def compare_runs(policy: str | None = None, *, with_belady: bool = True, repeat: int = 1) -> int:
    """How many replays of the whole trace :func:`compare` makes per capacity."""
    from kvpool.master.eviction import DEFAULT_POLICY

    return repeat * (1 + ((policy or DEFAULT_POLICY) != "lru")) + with_belady


def _replays(trace: Trace, name: str, capacity: int, repeat: int, progress: Progress | None) -> ReplayResult:
    """``repeat`` replays of one policy at one capacity: the first's result, with the median
    of the runs' costs (their hits must agree: a replay is deterministic)."""
    runs = [replay(trace, make_policy(name), capacity, progress=progress) for _ in range(repeat)]
    first = runs[0]
    for r in runs[1:]:
        if (r.hit_blocks, r.evictions) != (first.hit_blocks, first.evictions):
            raise PolicyContractError(f"{name}: two replays of the same trace differ ({first.hit_blocks} and "
                                      f"{r.hit_blocks} hits): the policy is not deterministic")
    first.extra["us_per_ref_runs"] = [r.us_per_ref for r in runs]
    first.policy_seconds = statistics.median(r.policy_seconds for r in runs)
    first.extra["loop_us_per_ref"] = statistics.median(r.extra["loop_us_per_ref"] for r in runs)
    return first


def compare(
    trace: Trace,
    capacities: Sequence[int],
    policy: str | None = None,
    *,
    with_belady: bool = True,
    progress: Progress | None = None,
    repeat: int = 1,
) -> dict:
    """Policy vs LRU vs Belady at each capacity. Returns the report dict used by the CLI.

    ``progress(n)`` counts requests replayed over every run: :func:`compare_runs` runs per
    capacity, ``len(trace)`` requests each.

    With ``repeat`` > 1 the policy and LRU are each replayed that many times per capacity and
    their costs are the medians (the runs' own figures are in ``us_per_ref_runs``): on a
    shared machine one run's timing can be off by a third, while the hits never change.

    ``us_per_ref`` is the policy's cost per block reference at its costliest capacity (each
    capacity's is in ``us_per_ref_by_capacity``); ``min_gain_vs_lru`` the worst cell.
    ``loop_us_per_ref_by_capacity`` is the CPU of the policy's whole replay per reference:
    the index's own work around the policy, the policy, and the replay's checks.
    """
    from kvpool.master.eviction import DEFAULT_POLICY

    pname = policy or DEFAULT_POLICY
    make_policy(pname)  # validate the name early
    rows = []
    if repeat < 1:
        raise ValueError("repeat must be >= 1")
    for cap in capacities:
        p = _replays(trace, pname, cap, repeat, progress)
        lru = p if pname == "lru" else _replays(trace, "lru", cap, repeat, progress)
        b = belady(trace, cap, progress) if with_belady else None
        rows.append((cap, p, lru, b))
    gains = [p.hit_rate / l.hit_rate for _, p, l, _ in rows if l.hit_rate > 0]
    complete = len(gains) == len(rows)
    return {
        "bench": "replay",
        "trace": trace.name,
        "requests": len(trace),
        "blocks": trace.total_blocks,
        "policy_name": pname,
        "capacities": [c for c, *_ in rows],
        "policy": [round(p.hit_rate, 6) for _, p, _, _ in rows],
        "lru": [round(l.hit_rate, 6) for _, _, l, _ in rows],
        "belady": [round(b.hit_rate, 6) if b else None for *_, b in rows],
        "geomean_gain_vs_lru": round(geomean(gains), 6) if complete else None,
        "min_gain_vs_lru": round(min(gains), 6) if complete and gains else None,
        "us_per_ref": round(max(p.us_per_ref for _, p, _, _ in rows), 3) if rows else None,
        "us_per_ref_by_capacity": [round(p.us_per_ref, 3) for _, p, _, _ in rows],
        "lru_us_per_ref_by_capacity": [round(l.us_per_ref, 3) for _, _, l, _ in rows],
        "loop_us_per_ref_by_capacity": [round(p.extra["loop_us_per_ref"], 3) for _, p, _, _ in rows],
        "repeat": repeat,
        "us_per_ref_runs": [[round(u, 3) for u in p.extra["us_per_ref_runs"]] for _, p, _, _ in rows],
        "_rows": rows,
    }
