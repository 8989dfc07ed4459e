"""KVPoolConnector: a vLLM v1 KV connector backed by a kvpool pool.

Enable it with::

    vllm serve MODEL --kv-transfer-config '{"kv_connector": "KVPoolConnector",
        "kv_connector_module_path": "kvpool.integrations.vllm", "kv_role": "kv_both",
        "kv_load_failure_policy": "recompute",
        "kv_connector_extra_config": {"address": "127.0.0.1:50051"}}'

The protocol, one engine step at a time (vLLM builds one connector per role):

Scheduler side
  ``get_num_new_matched_tokens`` keys the request's full blocks (all but its last token, which
  the engine must compute itself) with kvpool's identity and sends **one batched Lookup** per
  tensor-parallel rank. The answer is a prefix length in blocks; the load counts from the
  engine's own block-aligned prefix hit. If the Lookup has not answered within
  ``lookup_wait_ms`` it returns ``None`` ("ask again later") and vLLM asks again next step;
  the answer is kept for that request until its blocks are allocated.
  ``update_state_after_alloc`` turns a hit into a load plan for the engine blocks vLLM just
  allocated. ``build_connector_meta`` hands the workers the step's loads and saves (in
  ``kv_producer``/``kv_both``). Saves come two ways:

  * a step that fills blocks of a request that certainly goes on (a prefill chunk that does
    not reach the request's last token) saves them at once: the worker copies them out of
    the cache within the step, because a running request's blocks can be freed under it (a
    preemption) and vLLM says nothing to the connector when that happens;
  * every other full block (the prompt's last chunk, the blocks decoding filled) is
    published when the request finishes: ``request_finished`` plans a *finish save* and
    returns True, so vLLM keeps the request's blocks; the next step's metadata hands the
    save to the workers, and ``has_pending_push_work`` keeps the engine stepping until each
    worker has reported the request in ``get_finished`` (its blocks copied out and put), at
    which point vLLM frees them.

  A block becomes a ``BlockStored`` event (``take_events``) once every worker reports it
  committed (``build_connector_worker_meta``).

Worker side
  ``register_kv_caches`` binds the tensors vLLM allocated, in whatever layout they are
  (:class:`~kvpool.integrations.block_mover.PagedBlockMover` recognises flash-attention,
  FlashInfer, the CPU backend's and MLA's), once.
  ``start_load_kv`` reads each planned load from the pool and scatters it into the cache
  before the forward runs (so ``wait_for_layer_load`` has nothing to wait for).
  ``wait_for_save`` never waits on the pool: a save is handed to a
  :class:`~kvpool.integrations.publisher.BackgroundPublisher` that puts it (every layer of a
  block in one copy) while the engine runs its next steps. An at-once save is gathered into
  a staging buffer first (the job then owns its bytes); a finish save is gathered by the
  publisher itself, from blocks vLLM keeps until ``get_finished`` names the request.
  ``save_kv_layer`` has nothing to do per layer.
  Copies use :mod:`kvpool.kernels.paged_copy` (through the mover): the Triton kernels on a
  GPU, the torch references elsewhere.

Invariants
  * Keys come from token ids through :class:`kvpool.identity.Namespace` (model, layout,
    TP rank and size, LoRA, cache salt): vLLM's own block hashes are seeded per process and
    never reach the pool.
  * A load that fails (a block evicted since the Lookup, a node gone, a checksum that does
    not match) puts its engine blocks in ``get_block_ids_with_load_errors``; with
    ``kv_load_failure_policy="recompute"`` vLLM recomputes them and never uses their bytes.
  * Pool blocks hold exactly one vLLM block (``block_tokens`` = vLLM ``block_size``); any
    other ``block_tokens`` in the extra config is refused when the connector is built.
  * A publish is a two-phase put: another engine's Lookup counts a block only once it is
    committed, so a block still on its way is a miss, never half-read.
  * The publisher never reads an engine block after vLLM may reuse it: at-once saves are
    copied within their step, finish saves only while vLLM holds the request's blocks.
  * ``kv_role``: ``kv_producer`` only publishes, ``kv_consumer`` only loads, ``kv_both`` does
    both (a plain prefix cache).
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_events import BlockStored
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
    KVConnectorWorkerMetadata,
)
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats

from kvpool.client import Client
from kvpool.client.async_client import DEFAULT_ADDRESS
from kvpool.identity import Namespace
from kvpool.integrations.publisher import BackgroundPublisher
from kvpool.integrations.block_mover import PagedBlockMover
from kvpool.layout import KVLayout

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KVPoolConnector", "KVPoolConnectorMetadata", "KVPoolConnectorStats", "KVPoolWorkerMetadata",
           "BlockTransfer"]

# A child of vLLM's logger, so these lines appear where vLLM's own do, formatted alike.
log = logging.getLogger("vllm.kvpool")

#: The medium named in BlockStored events for blocks that went to the pool.
EVENT_MEDIUM = "kvpool"


@dataclass
class BlockTransfer:
    """Pool blocks ``[start, end)`` of one request and the engine blocks that hold them.

    ``tokens`` covers blocks ``[0, end)``: keys are chained, so block ``i``'s key needs every
    token before it. The worker derives keys with its own TP rank's namespace.
    """

    req_id: str
    tokens: list[int]
    start: int
    end: int
    block_ids: list[int]
    lora: str = ""
    salt: str = ""


@dataclass
class KVPoolConnectorMetadata(KVConnectorMetadata):
    """What the scheduler tells the workers for one step."""

    loads: list[BlockTransfer] = field(default_factory=list)
    #: copy out within this step (the request goes on; its blocks may be freed under us)
    saves: list[BlockTransfer] = field(default_factory=list)
    #: of finished requests whose blocks vLLM keeps until get_finished names them
    finish_saves: list[BlockTransfer] = field(default_factory=list)


@dataclass
class KVPoolWorkerMetadata(KVConnectorWorkerMetadata):
    """What the workers published this step, as (request id, first block) of each save.

    Across TP workers a save counts only where every worker's shard went in."""

    published: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, int]] = field(default_factory=list)

    def aggregate(self, other: KVConnectorWorkerMetadata) -> "KVPoolWorkerMetadata":
        failed = set(map(tuple, self.failed)) | set(map(tuple, getattr(other, "failed", ())))
        ok = (set(map(tuple, self.published)) | set(map(tuple, getattr(other, "published", ())))) - failed
        return KVPoolWorkerMetadata(sorted(ok), sorted(failed))


@dataclass
class KVPoolConnectorStats(KVConnectorStats):
    """Counters for one logging interval (summed across workers)."""

    _KEYS = ("blocks_loaded", "blocks_saved", "blocks_load_failed", "save_failures", "bytes_loaded",
             "bytes_saved")

    def __post_init__(self) -> None:
        for k in self._KEYS:
            self.data.setdefault(k, 0)

    def reset(self) -> None:
        self.data = {k: 0 for k in self._KEYS}

    def aggregate(self, other: KVConnectorStats) -> "KVPoolConnectorStats":
        for k, v in other.data.items():
            self.data[k] = self.data.get(k, 0) + v
        return self

    def reduce(self) -> dict[str, int | float]:
        return dict(self.data)

    def is_empty(self) -> bool:
        return not any(self.data.values())


def pool_layout_from_config(kv_cache_config: "KVCacheConfig") -> KVLayout:
    """The pool block layout both roles agree on, from vLLM's KV cache spec."""
    from vllm.v1.kv_cache_interface import AttentionSpec, MLAAttentionSpec

    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1 or not isinstance(groups[0].kv_cache_spec, AttentionSpec):
        raise ValueError(
            f"KVPoolConnector supports models with one full-attention KV cache group; this model "
            f"has {len(groups)} group(s) ({', '.join(type(g.kv_cache_spec).__name__ for g in groups)})"
        )
    spec = groups[0].kv_cache_spec
    mla = isinstance(spec, MLAAttentionSpec)
    return KVLayout(
        num_layers=len(groups[0].layer_names),
        num_kv_heads=1 if mla else spec.num_kv_heads,
        head_dim=spec.head_size,
        dtype=str(spec.dtype).removeprefix("torch."),
        block_tokens=spec.block_size,
        kv_kind="mla" if mla else "kv",
    )


class KVPoolConnector(KVConnectorBase_V1):
    """vLLM v1 KV connector that loads and publishes prefix blocks through kvpool."""

    def __init__(self, vllm_config: "VllmConfig", role: KVConnectorRole,
                 kv_cache_config: "KVCacheConfig") -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        extra = dict(self._kv_transfer_config.kv_connector_extra_config or {})
        self._block_size = vllm_config.cache_config.block_size
        self._layout = pool_layout_from_config(kv_cache_config)
        asked = extra.get("block_tokens")
        if asked is not None and int(asked) != self._layout.block_tokens:
            raise ValueError(
                f"KVPoolConnector: kv_connector_extra_config block_tokens={asked} differs from vLLM's "
                f"block_size={self._layout.block_tokens}; a pool block holds exactly one vLLM block. "
                f"Drop block_tokens, or start vLLM with --block-size {asked}"
            )
        model = extra.get("model_id") or _served_name(vllm_config)
        self._tenant = str(extra.get("tenant", ""))
        self._tp_size = vllm_config.parallel_config.tensor_parallel_size
        self._model = model
        self._tp_rank = 0  # the worker learns its rank in register_kv_caches
        self._loads_enabled = self._kv_transfer_config.is_kv_consumer
        self._saves_enabled = self._kv_transfer_config.is_kv_producer
        self._lookup_wait_s = float(extra.get("lookup_wait_ms", 50)) / 1000.0
        address = extra.get("address") or os.environ.get("KVPOOL_ADDRESS") or DEFAULT_ADDRESS
        self._client = Client(address, self._namespace(), transport=extra.get("transport"),
                              timeout=float(extra.get("timeout_s", 30.0)))
        # scheduler side
        self._lookups: dict[str, tuple[int, concurrent.futures.Future]] = {}
        self._asked_from: dict[str, int] = {}
        self._pool_hit: dict[str, int] = {}
        self._loads: list[BlockTransfer] = []
        self._saves: list[BlockTransfer] = []
        self._finish_saves: list[BlockTransfer] = []
        self._held: set[str] = set()  # finished requests whose blocks vLLM keeps for us
        self._step_loads: dict[str, BlockTransfer] = {}
        self._reqs: dict[str, "Request"] = {}
        self._saved: dict[str, int] = {}  # blocks of each request known to be in the pool
        self._unconfirmed: dict[tuple[str, int], BlockTransfer] = {}
        self._events: list[BlockStored] = []
        # worker side
        self._mover: PagedBlockMover | None = None
        self._load_errors: set[int] = set()
        self._published: list[tuple[str, int]] = []
        self._failed: list[tuple[str, int]] = []
        self._publisher: BackgroundPublisher | None = None
        self._holding: dict[str, tuple[str, int]] = {}  # req id -> tag of its finish save
        self._stats = KVPoolConnectorStats()
        log.info("KVPoolConnector %s: pool %s, model %r, layout %s, role %s", role.name, address, model,
                 self._layout.canonical(), self._kv_transfer_config.kv_role)

    # ------------------------------------------------------------------ identity

    def _namespace(self, lora: str = "", salt: str = "", tp_rank: int | None = None) -> Namespace:
        return Namespace(self._model, self._layout, self._tp_rank if tp_rank is None else tp_rank,
                         self._tp_size, tenant=self._tenant, lora=lora, salt=salt)

    @staticmethod
    def _request_ns_fields(request: "Request") -> tuple[str, str]:
        lora = request.lora_request.lora_name if getattr(request, "lora_request", None) else ""
        return lora, request.cache_salt or ""

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: "Request",
                                   num_computed_tokens: int) -> tuple[int | None, bool]:
        if not self._loads_enabled:
            return 0, False
        bs = self._block_size
        keyable = (request.num_tokens - 1) // bs  # the engine computes the last token itself
        if keyable <= num_computed_tokens // bs:
            return 0, False
        rid = request.request_id
        entry = self._lookups.get(rid)
        if entry is None or entry[0] != keyable:
            lora, salt = self._request_ns_fields(request)
            tokens = request.all_token_ids[: keyable * bs]
            futures = [self._client.submit("lookup", self._namespace(lora, salt, r).keys(tokens),
                                           namespace=self._namespace(lora, salt, r))
                       for r in range(self._tp_size)]
            entry = (keyable, _all_of(futures))
            self._lookups[rid] = entry
            if self._lookup_wait_s > 0:
                concurrent.futures.wait([entry[1]], timeout=self._lookup_wait_s)
        fut = entry[1]
        if not fut.done():
            return None, False  # ask again next step; the Lookup is in flight
        try:
            hit = min(fut.result())  # a block counts only if every TP rank has its shard
        except Exception as exc:  # the pool is down: a miss, never a failed request
            log.warning("kvpool lookup failed for request %s (%s); computing it instead", rid, exc)
            hit = 0
        self._pool_hit[rid] = hit
        self._asked_from[rid] = num_computed_tokens
        return max(0, hit * bs - num_computed_tokens), False

    def update_state_after_alloc(self, request: "Request", blocks: "KVCacheBlocks",
                                 num_external_tokens: int) -> None:
        rid = request.request_id
        self._lookups.pop(rid, None)
        self._reqs[rid] = request
        self._saved.setdefault(rid, self._pool_hit.get(rid, 0))  # those blocks are in the pool
        if num_external_tokens <= 0:
            return
        bs = self._block_size
        first_tok = self._asked_from.get(rid, 0)
        start = first_tok // bs
        end = -(-(first_tok + num_external_tokens) // bs)
        block_ids = list(blocks.get_block_ids()[0])
        lora, salt = self._request_ns_fields(request)
        self._loads.append(BlockTransfer(rid, list(request.all_token_ids[: end * bs]), start, end,
                                         block_ids[start:end], lora, salt))

    def build_connector_meta(self, scheduler_output: "SchedulerOutput") -> KVConnectorMetadata:
        if self._saves_enabled:
            counts = scheduler_output.num_scheduled_tokens
            for new in scheduler_output.scheduled_new_reqs:
                self._plan_save(new.req_id, new.num_computed_tokens + counts[new.req_id])
            cached = scheduler_output.scheduled_cached_reqs
            for rid, done in zip(cached.req_ids, cached.num_computed_tokens):
                self._plan_save(rid, done + counts[rid])
        meta = KVPoolConnectorMetadata(loads=self._loads, saves=self._saves, finish_saves=self._finish_saves)
        for load in self._loads:
            self._step_loads[load.req_id] = load
        self._loads, self._saves, self._finish_saves = [], [], []
        return meta

    def _plan_save(self, rid: str, computed: int) -> None:
        """Save at once the blocks a prefill chunk fills when the request certainly goes on.

        A step that reaches the request's last known token may end it, and then its blocks
        are published (without delaying the step) by the finish save of ``request_finished``.
        """
        request = self._reqs.get(rid)
        if request is None or computed >= len(request.all_token_ids):
            return
        save = self._new_save(request, computed // self._block_size,
                              self._kv_cache_manager.get_block_ids(rid)[0])
        if save is not None:
            self._saves.append(save)

    def _new_save(self, request: "Request", full: int, block_ids: list[int]) -> BlockTransfer | None:
        """A save of the request's blocks from the first not yet published up to ``full``."""
        rid = request.request_id
        start = self._saved.get(rid, 0)
        if full <= start:
            return None
        lora, salt = self._request_ns_fields(request)
        save = BlockTransfer(rid, list(request.all_token_ids[: full * self._block_size]), start, full,
                             list(block_ids[start:full]), lora, salt)
        self._unconfirmed[(rid, start)] = save
        self._saved[rid] = full
        return save

    def request_finished(self, request: "Request", block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Plan the finish save of the request's unpublished full blocks; True keeps them alive.

        vLLM then frees the blocks only once every worker names the request in
        ``get_finished``, which a worker does when its copy of them has gone to the pool.
        """
        rid = request.request_id
        held = False
        if self._saves_enabled and rid in self._reqs:
            # Tokens whose KV a forward has written (with async scheduling, num_computed_tokens
            # also counts tokens of a step still running).
            done = request.num_computed_tokens - getattr(request, "num_in_flight_tokens", 0)
            full = min(done, len(request.all_token_ids), len(block_ids) * self._block_size) // self._block_size
            save = self._new_save(request, full, block_ids)
            if save is not None:
                self._finish_saves.append(save)
                self._held.add(rid)
                held = True
        for table in (self._lookups, self._asked_from, self._pool_hit, self._reqs, self._saved):
            table.pop(rid, None)
        return held, None

    def has_pending_push_work(self) -> bool:
        # A held request's blocks are freed only through a later step's get_finished: keep
        # the engine stepping (empty steps when nothing else runs) until every one is.
        return bool(self._held)

    def update_connector_output(self, connector_output) -> None:
        self._held.difference_update(connector_output.finished_sending or ())
        bad = connector_output.invalid_block_ids
        for rid, load in self._step_loads.items():  # loads are synchronous: done this step
            lost = [i for i, b in enumerate(load.block_ids) if b in bad] if bad else []
            if lost and rid in self._saved:
                # Blocks from here on are recomputed, not loaded: publish them once they are.
                self._saved[rid] = min(self._saved[rid], load.start + lost[0])
        self._step_loads = {}
        worker = connector_output.kv_connector_worker_meta
        if isinstance(worker, KVPoolWorkerMetadata):
            for ident in worker.published:
                save = self._unconfirmed.pop(tuple(ident), None)
                if save is not None:
                    self._events.append(self._stored_event(save))
            for ident in worker.failed:
                save = self._unconfirmed.pop(tuple(ident), None)
                if save is not None and save.req_id in self._saved:
                    self._saved[save.req_id] = min(self._saved[save.req_id], save.start)

    def _stored_event(self, save: BlockTransfer) -> BlockStored:
        keys = self._namespace(save.lora, save.salt, 0).keys(save.tokens)
        bs = self._block_size
        return BlockStored(
            block_hashes=keys[save.start:save.end],
            parent_block_hash=keys[save.start - 1] if save.start else None,
            token_ids=save.tokens[save.start * bs:], block_size=bs, lora_id=None,
            medium=EVENT_MEDIUM, lora_name=save.lora or None,
        )

    def take_events(self):
        events, self._events = self._events, []
        return events

    # ------------------------------------------------------------------ worker side

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        try:
            from vllm.distributed.parallel_state import get_tensor_model_parallel_rank

            self._tp_rank = get_tensor_model_parallel_rank()
        except Exception:  # no model-parallel group (a single process): rank 0
            self._tp_rank = 0
        try:
            self._mover = PagedBlockMover(kv_caches, self._layout)
        except ValueError as exc:
            raise ValueError(f"KVPoolConnector: {exc}") from None
        self._publisher = BackgroundPublisher()
        paged = self._mover.paged
        log.info("KVPoolConnector worker (TP rank %d): %s cache, %d blocks, copies by %s", self._tp_rank,
                 paged.plane_order if paged.kv_kind == "kv" else "mla", paged.num_blocks, self._mover.kernel)

    def start_load_kv(self, forward_context, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVPoolConnectorMetadata):
            return
        for load in meta.loads:
            self._load_one(load)

    def _load_one(self, load: BlockTransfer) -> None:
        ns = self._namespace(load.lora, load.salt)
        keys = ns.keys(load.tokens)[load.start:load.end]
        n = len(keys)
        started = time.perf_counter()
        staging = self._mover.staging(n)
        got = 0
        try:
            blocks = self._client.get_blocks(keys, staging if staging.is_cuda else staging.numpy(),
                                             namespace=ns, allow_missing=True)
            while got < n and blocks[got] is not None:
                got += 1
        except Exception as exc:  # evicted, node gone, checksum mismatch: recompute, never use
            log.warning("kvpool load of %d blocks for request %s failed (%s); vLLM recomputes them",
                        n, load.req_id, exc)
            got = 0
        if got:
            read = time.perf_counter()
            self._mover.scatter(staging[:got], load.block_ids[:got])
            done = time.perf_counter()
            self._stats.data["blocks_loaded"] += got
            log.info("kvpool: loaded %d blocks for request %s in %.1f ms (read %.1f ms, scatter %.1f ms)", got,
                     load.req_id, (done - started) * 1000, (read - started) * 1000, (done - read) * 1000)
            self._stats.data["bytes_loaded"] += got * self._layout.block_bytes
        if got < n:
            if got:
                log.warning("kvpool had %d of %d blocks for request %s; vLLM recomputes the rest",
                            got, n, load.req_id)
            self._load_errors.update(load.block_ids[got:])
            self._stats.data["blocks_load_failed"] += n - got

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv loads every layer before the forward begins

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs: Any) -> None:
        return  # wait_for_save gathers all layers of a finished request at once

    def wait_for_save(self) -> None:
        """Hand the step's saves to the publisher; wait on neither the copy-out nor the pool."""
        if not self.has_connector_metadata():
            return
        meta = self._get_connector_metadata()
        if not isinstance(meta, KVPoolConnectorMetadata):
            return
        for save in meta.saves:  # the request goes on: copy its blocks out now
            staging = None
            try:
                staging = self._mover.staging(len(save.block_ids))
                self._mover.gather(save.block_ids, staging)
            except Exception as exc:  # noqa: BLE001 - a failed copy-out is a failed publish
                staging = exc
            self._publisher.submit((save.req_id, save.start), self._put_job(save, staging, _step_done()))
        for save in meta.finish_saves:  # vLLM keeps these blocks until get_finished names the request
            tag = (save.req_id, save.start)
            self._holding[save.req_id] = tag
            self._publisher.submit(tag, self._put_job(save, None, _step_done()))

    def _put_job(self, save: BlockTransfer, staging, ready):
        """The publisher's job for one save: gather (unless given the bytes), put, commit."""

        def job():
            if isinstance(staging, Exception):
                raise staging
            ns = self._namespace(save.lora, save.salt)
            keys = ns.keys(save.tokens)[save.start:save.end]
            if ready is not None:  # the step's kernels (the forward, an at-once gather) are done
                ready.synchronize()
            buf = staging
            if buf is None:
                buf = self._mover.staging(len(keys))
                self._mover.gather(save.block_ids, buf)
                if buf.is_cuda:
                    torch.cuda.current_stream(buf.device).synchronize()
            return self._client.put_blocks(keys, buf if buf.is_cuda else buf.numpy(), namespace=ns,
                                           first_position=save.start * self._block_size)

        return job

    def _collect(self) -> None:
        """Account for the publishes that finished since the last call (the engine's thread)."""
        if self._publisher is None:
            return
        for (rid, start), res, error in self._publisher.done():
            if error is not None:  # a failed publish is a future miss, never a failed request
                log.warning("kvpool publish for request %s (blocks from %d) failed: %s", rid, start, error)
                self._stats.data["save_failures"] += 1
                self._failed.append((rid, start))
                continue
            self._stats.data["blocks_saved"] += res.written
            self._stats.data["bytes_saved"] += res.written * self._layout.block_bytes
            log.info("kvpool: published %d blocks of request %s (%d already in the pool)", res.written, rid,
                     res.present)
            self._published.append((rid, start))

    def get_finished(self, finished_req_ids: set[str]) -> tuple[set[str] | None, set[str] | None]:
        """Requests whose finish save is done: vLLM may now free (and reuse) their blocks."""
        self._collect()
        sent = {rid for rid, tag in self._holding.items() if not self._publisher.pending(tag)}
        for rid in sent:
            del self._holding[rid]
        return (sent or None), None

    def build_connector_worker_meta(self) -> "KVPoolWorkerMetadata | None":
        self._collect()
        if not (self._published or self._failed):
            return None
        meta = KVPoolWorkerMetadata(self._published, self._failed)
        self._published, self._failed = [], []
        return meta

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        if self._stats.is_empty():
            return None
        stats, self._stats = self._stats, KVPoolConnectorStats()
        return stats

    @classmethod
    def build_kv_connector_stats(cls, data: dict[str, Any] | None = None) -> KVConnectorStats | None:
        return KVPoolConnectorStats(data=dict(data or {}))

    def shutdown(self) -> None:
        if self._publisher is not None:
            self._publisher.close()  # queued publishes finish first: none is cut off mid-put
        self._client.close()


def _served_name(vllm_config: "VllmConfig") -> str:
    served = vllm_config.model_config.served_model_name
    if isinstance(served, (list, tuple)):
        served = served[0] if served else None
    return served or vllm_config.model_config.model


def _step_done():
    """Something the publisher can wait on for the step's device work, or None on the CPU.

    On a GPU the forward (and an at-once gather) are queued on the engine's stream; the
    publisher's thread must not read their blocks before they ran.
    """
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        event = torch.cuda.Event()
        event.record()
        return event
    return None


def _all_of(futures: list[concurrent.futures.Future]) -> concurrent.futures.Future:
    """One future for a list of them: their results in order, or the first exception."""
    out: concurrent.futures.Future = concurrent.futures.Future()
    left = [len(futures)]

    def one_done(_f) -> None:
        left[0] -= 1
        if left[0] == 0:
            try:
                out.set_result([f.result() for f in futures])
            except Exception as exc:
                out.set_exception(exc)

    for f in futures:
        f.add_done_callback(one_done)
    return out
