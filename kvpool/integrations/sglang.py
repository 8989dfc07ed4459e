"""KVPoolStore: an SGLang HiCache storage backend (the L3 tier) backed by a kvpool pool.

Enable it with::

    python -m sglang.launch_server --model-path MODEL --enable-hierarchical-cache \\
        --hicache-mem-layout page_first --hicache-storage-backend dynamic \\
        --hicache-storage-backend-extra-config '{"backend_name": "kvpool",
          "module_path": "kvpool.integrations.sglang", "class_name": "KVPoolStore",
          "interface_v1": 1, "address": "127.0.0.1:50051"}'

SGLang's ``StorageBackendFactory.create_backend("dynamic", config, host_pool)`` imports the
class named there and builds it as ``KVPoolStore(HiCacheStorageConfig, kwargs)``; the cache
controller then registers its host KV pool (``register_mem_pool_host``).

Protocol
  * One SGLang page is one pool block. SGLang names pages by its own chained page hashes
    (hex strings, stable across processes); each becomes a kvpool key with
    ``Namespace.engine_keys``, i.e. ``xxh3_128(namespace root || hash bytes)``, so the
    namespace (model, layout, TP rank and size, tenant) keeps engines apart.
  * The block bytes are kvpool's canonical order (``KVLayout``: layers x K/V x tokens x heads
    x dim; MLA: layers x tokens x 1 x dim), whatever the host pool's layout (``page_first``,
    ``layer_first``): a page is copied through a permuted view of the host buffer.
  * ``interface_v1`` (extra config) selects the zero-copy path: ``batch_get_v1`` /
    ``batch_set_v1(keys, host_indices)`` read and write the host pool directly by index.
    Otherwise SGLang uses the classic ``batch_get`` / ``batch_set`` of flat pages (in the host
    pool's own order), which this class also serves.
  * ``batch_exists`` is one Lookup: the number of leading keys present.
  * MLA: every TP rank holds the same latent, so all ranks share one namespace (rank 0 of 1)
    and only the storage writer (``HiCacheStorageConfig.is_storage_writer``) publishes.
  * Nothing raises into the engine: a failure (pool down, block evicted, checksum mismatch,
    an unsupported host layout) is a miss or a failed write, with one log line.
"""

from __future__ import annotations

import logging
import os
from typing import Any, List, Optional

import torch
from sglang.srt.mem_cache.hicache_storage import HiCacheStorage, HiCacheStorageConfig, HiCacheStorageExtraInfo

from kvpool.client import Client
from kvpool.client.async_client import DEFAULT_ADDRESS
from kvpool.identity import Namespace
from kvpool.layout import KVLayout

__all__ = ["KVPoolStore"]

log = logging.getLogger("sglang.kvpool")

#: Host pool layouts whose pages this backend can address.
HOST_LAYOUTS = ("page_first", "layer_first")


def engine_hash_bytes(key: str) -> bytes:
    """SGLang's page hash as bytes: its hex digits decoded, else its UTF-8."""
    try:
        return bytes.fromhex(key)
    except ValueError:
        return key.encode()


class KVPoolStore(HiCacheStorage):
    """HiCache L3 storage in a kvpool pool. See the module docstring for the protocol."""

    def __init__(self, storage_config: HiCacheStorageConfig, kwargs: Optional[dict] = None) -> None:
        extra = dict(storage_config.extra_config or {})
        self.config = storage_config
        self.is_mla = bool(storage_config.is_mla_model)
        self.model = str(extra.get("model_id") or storage_config.model_name or "")
        self.tenant = str(extra.get("tenant", ""))
        self.address = extra.get("address") or os.environ.get("KVPOOL_ADDRESS") or DEFAULT_ADDRESS
        self.transport = extra.get("transport")
        self.writer = storage_config.is_storage_writer
        self.client: Client | None = None
        self.namespace: Namespace | None = None
        self.mem_pool_host = None
        if not self.model:
            log.error("kvpool: no model name in HiCacheStorageConfig and no model_id in the extra "
                      "config; storage stays off (every lookup is a miss)")

    # ------------------------------------------------------------------ setup

    def register_mem_pool_host(self, mem_pool_host) -> None:
        super().register_mem_pool_host(mem_pool_host)
        try:
            self._bind(mem_pool_host)
        except Exception as exc:
            self.namespace = None
            log.error("kvpool: cannot use this host KV pool (%s); storage stays off (every lookup "
                      "is a miss)", exc)

    def _bind(self, pool) -> None:
        if not self.model:
            return
        layout = getattr(pool, "layout", None)
        if layout not in HOST_LAYOUTS:
            raise ValueError(f"host pool layout {layout!r} is not supported; start SGLang with "
                             f"--hicache-mem-layout page_first (or layer_first)")
        buf = pool.kv_buffer
        self.page = int(pool.page_size)
        self.layers = int(pool.layer_num)
        heads, dim = int(buf.shape[-2]), int(buf.shape[-1])
        kv_layout = KVLayout(self.layers, heads, dim, str(buf.dtype).removeprefix("torch."), self.page,
                             "mla" if self.is_mla else "kv")
        rank, size = (0, 1) if self.is_mla else (self.config.tp_rank, self.config.tp_size)
        self.namespace = Namespace(self.model, kv_layout, rank, size, tenant=self.tenant)
        self.layout = layout
        self.block_bytes = kv_layout.block_bytes
        self.client = Client(self.address, self.namespace, transport=self.transport)
        log.info("kvpool: HiCache storage in pool %s, %s host layout, block %s", self.address, layout,
                 kv_layout.canonical())

    def _keys(self, keys: List[str]) -> list[bytes]:
        return self.namespace.engine_keys([engine_hash_bytes(k) for k in keys])

    # ------------------------------------------------------------------ page views

    def _page(self, index: int) -> torch.Tensor:
        """The host page at token index ``index`` as a view in pool-block order."""
        buf, p = self.mem_pool_host.kv_buffer, self.page
        if self.is_mla:  # page_first [size, L, 1, D]; layer_first [L, size, 1, D]
            return buf[index:index + p].transpose(0, 1) if self.layout == "page_first" else buf[:, index:index + p]
        if self.layout == "page_first":  # [2, size, L, H, D] -> [L, 2, p, H, D]
            return buf[:, index:index + p].permute(2, 0, 1, 3, 4)
        return buf[:, :, index:index + p].transpose(0, 1)  # [2, L, size, H, D] -> [L, 2, p, H, D]

    def _flat_page(self, flat: torch.Tensor) -> torch.Tensor:
        """A flat page in the host pool's own order (classic API) as a view in pool-block order."""
        buf, p, L = self.mem_pool_host.kv_buffer, self.page, self.layers
        tail = tuple(buf.shape[-2:])
        if self.is_mla:
            return flat.view(p, L, *tail).transpose(0, 1) if self.layout == "page_first" else flat.view(L, p, *tail)
        if self.layout == "page_first":
            return flat.view(2, p, L, *tail).permute(2, 0, 1, 3, 4)
        return flat.view(2, L, p, *tail).transpose(0, 1)

    def _staging(self, n: int) -> torch.Tensor:
        return torch.empty((n, self.block_bytes), dtype=torch.uint8)

    def _as_block(self, staging: torch.Tensor, j: int, like: torch.Tensor) -> torch.Tensor:
        return staging[j].view(like.dtype).view(like.shape)

    def _put(self, keys: List[str], pages: List[torch.Tensor]) -> bool:
        staging = self._staging(len(keys))
        for j, page in enumerate(pages):
            self._as_block(staging, j, page).copy_(page)
        self.client.put_blocks(self._keys(keys), staging.numpy())
        return True

    def _get(self, keys: List[str], pages: List[torch.Tensor]) -> List[bool]:
        staging = self._staging(len(keys))
        got = self.client.get_blocks(self._keys(keys), staging.numpy(), allow_missing=True)
        hits = [g is not None for g in got]
        for j, page in enumerate(pages):
            if hits[j]:
                page.copy_(self._as_block(staging, j, page))
        return hits

    # ------------------------------------------------------------------ v1: zero-copy by index

    def batch_set_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        if self.namespace is None:
            return [False] * len(keys)
        if not keys or not self.writer:
            return [True] * len(keys)  # MLA: another rank writes the shared latent
        try:
            starts = host_indices.view(-1)[:: self.page].tolist()
            return [self._put(keys, [self._page(i) for i in starts])] * len(keys)
        except Exception as exc:
            log.warning("kvpool: storing %d pages failed (%s); they stay out of L3", len(keys), exc)
            return [False] * len(keys)

    def batch_get_v1(self, keys: List[str], host_indices: torch.Tensor,
                     extra_info: Optional[HiCacheStorageExtraInfo] = None) -> List[bool]:
        if self.namespace is None or not keys:
            return [False] * len(keys)
        try:
            starts = host_indices.view(-1)[:: self.page].tolist()
            return self._get(keys, [self._page(i) for i in starts])
        except Exception as exc:
            log.warning("kvpool: loading %d pages failed (%s); SGLang recomputes them", len(keys), exc)
            return [False] * len(keys)

    # ------------------------------------------------------------------ classic: flat pages

    def batch_set(self, keys: List[str], values: Optional[Any] = None, target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> bool:
        if self.namespace is None:
            return False
        if not keys or not self.writer:
            return True
        try:
            return self._put(keys, [self._flat_page(v) for v in values])
        except Exception as exc:
            log.warning("kvpool: storing %d pages failed (%s); they stay out of L3", len(keys), exc)
            return False

    def set(self, key: str, value: Optional[Any] = None, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> bool:
        return self.batch_set([key], [value])

    def batch_get(self, keys: List[str], target_locations: Optional[Any] = None,
                  target_sizes: Optional[Any] = None) -> List[torch.Tensor | None]:
        if self.namespace is None or not keys:
            return [None] * len(keys)
        try:
            targets = list(target_locations) if target_locations is not None else [
                self.mem_pool_host.get_dummy_flat_data_page() for _ in keys]
            hits = self._get(keys, [self._flat_page(t) for t in targets])
            return [t if h else None for t, h in zip(targets, hits)]
        except Exception as exc:
            log.warning("kvpool: loading %d pages failed (%s); SGLang recomputes them", len(keys), exc)
            return [None] * len(keys)

    def get(self, key: str, target_location: Optional[Any] = None,
            target_sizes: Optional[Any] = None) -> torch.Tensor | None:
        return self.batch_get([key], None if target_location is None else [target_location])[0]

    # ------------------------------------------------------------------ lookups

    def batch_exists(self, keys: List[str], extra_info: Optional[HiCacheStorageExtraInfo] = None) -> int:
        """How many leading pages of ``keys`` the pool holds (one Lookup)."""
        if self.namespace is None or not keys:
            return 0
        try:
            return self.client.lookup(self._keys(keys))
        except Exception as exc:
            log.warning("kvpool: lookup of %d pages failed (%s); treating them as misses", len(keys), exc)
            return 0

    def exists(self, key: str) -> bool:
        return self.batch_exists([key]) == 1

    def clear(self) -> None:
        # The pool is shared by every engine; it forgets blocks by its eviction policy, not here.
        log.info("kvpool: clear() leaves the shared pool as it is")

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
