"""Replay a FAST'25 (Mooncake) trace against an eviction policy, and against Belady's MIN.

The trace format is one JSON object per line with ``timestamp`` (ms), ``input_length``,
``output_length`` and ``hash_ids``: one id per 512-token prompt block, remapped prefix hashes,
so two requests share ids exactly as far as their prompts share a prefix.

What the replay measures
------------------------
A request's *prefix hit* is the leading run of its ``hash_ids`` that is resident; the first
miss ends it. The hit rate is ``hit blocks / all blocks`` over the whole trace.

How a policy is driven
----------------------
:func:`replay` plays the part of the master's index and makes exactly the calls the index
makes, on a real :class:`~kvpool.master.eviction.EvictionPolicy` instance:

1. *Lookup*: ``access(key)`` for each block of the leading resident run, head first.
2. *Publish*: every block of the request that is not resident is committed, head first, with
   ``insert(key, BlockInfo(size=block_size, position=i))``. Blocks past the first miss that are
   still resident are deduplicated by the publish step, which calls ``access`` on them (the
   master's ``put_start`` does the same, so that the put cannot evict them).
3. *Room*: before the inserts, if they would take the tier past ``capacity`` blocks, the index
   asks ``select_victims(n, evictable)`` where ``evictable`` protects every block of the request
   being served (they are leased or being written), then evicts what it got and calls
   ``remove`` for each. If the policy cannot free enough (only possible when one request
   holds more blocks than the capacity), the request's tail is not cached.

The replay checks the policy's answers (a victim must be resident and evictable, ``len`` must
track the resident set), so a broken policy fails loudly instead of reporting a rosy number.
"""

from __future__ import annotations

import heapq
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from kvpool.master.eviction import BlockInfo, EvictionPolicy, make_policy

__all__ = [
    "Trace",
    "ReplayResult",
    "load_trace",
    "replay",
    "belady",
    "compare",
    "block_key",
    "geomean",
    "PolicyContractError",
]

_INF = 1 << 62


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
    extra: dict = field(default_factory=dict)

    @property
    def hit_rate(self) -> float:
        return self.hit_blocks / self.total_blocks if self.total_blocks else 0.0


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
    """The index key the replay uses for a trace block id (the master's keys are bytes)."""
    return block_id.to_bytes(8, "little", signed=False)


def _as_trace(trace: Trace | Iterable[Sequence[int]]) -> Trace:
    if isinstance(trace, Trace):
        return trace
    return Trace(tuple(tuple(int(h) for h in r) for r in trace))


class PolicyContractError(AssertionError):
    """The policy answered something the index would reject."""


def replay(
    trace: Trace | Iterable[Sequence[int]],
    policy: EvictionPolicy | str | None,
    capacity: int,
    *,
    block_size: int = 1,
    check: bool = True,
) -> ReplayResult:
    """Replay ``trace`` against ``policy`` (an instance, or a registry name) at ``capacity`` blocks.

    Returns the prefix hit rate and counters. ``block_size`` is the ``BlockInfo.size`` given to
    the policy; capacity is always counted in blocks. See the module docstring for the exact calls.
    """
    if capacity < 0:
        raise ValueError("capacity must be >= 0")
    trace = _as_trace(trace)
    if policy is None or isinstance(policy, str):
        policy = make_policy(policy)
    name = getattr(policy, "name", type(policy).__name__)
    t0 = time.perf_counter()

    # One bytes key per distinct block id, made once.
    keys: dict[int, bytes] = {}
    resident: set[bytes] = set()
    access = policy.access
    insert = policy.insert
    remove = policy.remove
    select = policy.select_victims
    infos: dict[int, BlockInfo] = {}

    hits = total = inserts = evictions = uncached = 0
    for ids in trace.requests:
        n = len(ids)
        total += n
        rkeys = []
        for h in ids:
            k = keys.get(h)
            if k is None:
                k = keys[h] = block_key(h)
            rkeys.append(k)
        # Lookup: leading resident run.
        i = 0
        while i < n and rkeys[i] in resident:
            access(rkeys[i])
            i += 1
        hits += i
        if i == n:
            continue
        missing = []
        for j in range(i, n):
            if rkeys[j] in resident:
                access(rkeys[j])  # publish dedup: the master touches a present block
            else:
                missing.append(j)
        need = len(resident) + len(missing) - capacity
        if need > 0:
            protected = set(rkeys)
            evictable = lambda k, _p=protected: k not in _p  # noqa: E731
            victims = select(need, evictable)
            if check:
                if len(victims) > need:
                    raise PolicyContractError(f"{name}: asked for {need} victims, got {len(victims)}")
                seen = set()
                for v in victims:
                    if v not in resident or v in protected or v in seen:
                        raise PolicyContractError(f"{name}: bad victim {v!r}")
                    seen.add(v)
            for v in victims:
                resident.discard(v)
                remove(v)
            evictions += len(victims)
            room = capacity - len(resident)
            if room < len(missing):
                uncached += len(missing) - max(room, 0)
                missing = missing[: max(room, 0)]
        for j in missing:
            k = rkeys[j]
            info = infos.get(j)
            if info is None:
                info = infos[j] = BlockInfo(size=block_size, position=j)
            insert(k, info)
            resident.add(k)
        inserts += len(missing)
        if check and len(policy) != len(resident):
            raise PolicyContractError(f"{name}: len(policy)={len(policy)} but {len(resident)} resident")

    res = ReplayResult(name, capacity, hits, total, inserts, evictions, uncached)
    res.seconds = time.perf_counter() - t0
    return res


def belady(trace: Trace | Iterable[Sequence[int]], capacity: int) -> ReplayResult:
    """Belady's MIN at ``capacity`` blocks, under the same protocol as :func:`replay`.

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
    res = ReplayResult("belady", capacity, hits, total, inserts, evictions, uncached)
    res.seconds = time.perf_counter() - t0
    return res


def geomean(xs: Sequence[float]) -> float:
    if not xs or any(x <= 0 for x in xs):
        return 0.0
    return math.exp(sum(math.log(x) for x in xs) / len(xs))


def compare(
    trace: Trace,
    capacities: Sequence[int],
    policy: str | None = None,
    *,
    with_belady: bool = True,
) -> dict:
    """Policy vs LRU vs Belady at each capacity. Returns the report dict used by the CLI."""
    from kvpool.master.eviction import DEFAULT_POLICY

    pname = policy or DEFAULT_POLICY
    make_policy(pname)  # validate the name early
    rows = []
    for cap in capacities:
        p = replay(trace, make_policy(pname), cap)
        lru = p if pname == "lru" else replay(trace, make_policy("lru"), cap)
        b = belady(trace, cap) if with_belady else None
        rows.append((cap, p, lru, b))
    gains = [p.hit_rate / l.hit_rate for _, p, l, _ in rows if l.hit_rate > 0]
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
        "geomean_gain_vs_lru": round(geomean(gains), 6) if len(gains) == len(rows) else None,
        "_rows": rows,
    }
