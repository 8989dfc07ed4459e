"""PagedCacheLayout: an explicit description of an engine's paged KV cache.

Engines keep KV in fixed-size *engine blocks* of ``block_size`` tokens, one tensor per layer
(or one tensor with a leading layer dimension). The kernels in this package never infer that
layout from tensor shapes: the engine adapter states it once, as a :class:`PagedCacheLayout`,
and every tensor handed to a kernel is checked against it.

Per-layer tensor shapes, outermost dimension first:

* ``kv_kind="kv"``, ``plane_order="kv_first"`` (vLLM's flash-attention backend):
  ``[2, num_blocks, block_size, num_kv_heads, head_dim]``
* ``kv_kind="kv"``, ``plane_order="block_first"`` (FlashInfer-style):
  ``[num_blocks, 2, block_size, num_kv_heads, head_dim]``
* ``kv_kind="kv"``, ``plane_order="head_first"`` (vLLM's CPU backend, whose tensor
  ``[num_blocks, num_kv_heads, block_size, 2 * head_dim]`` is this shape viewed flat):
  ``[num_blocks, num_kv_heads, 2, block_size, head_dim]``
* ``kv_kind="mla"`` (one latent, no K/V split): ``[num_blocks, block_size, num_kv_heads, head_dim]``

All layers are passed either as a sequence of per-layer tensors, or as one stacked tensor with
a leading ``num_layers`` dimension. The container type decides which, never the shape.

Invariant the copy kernels rely on: inside one engine block, one K/V plane of one layer is a
contiguous run of ``block_size * num_kv_heads * head_dim`` elements (a *chunk*). The outer
strides (between planes, blocks and layers) are free, but must be the same for every layer.
A pool block (:class:`kvpool.layout.KVLayout`) is those chunks laid end to end, layer by layer.
``head_first`` breaks that invariant (a plane of a block is one run per head), so only the
torch references copy it; the Triton kernels refuse it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Sequence

from kvpool.layout import DTYPE_BYTES, KVLayout

__all__ = ["PagedCacheLayout", "BoundPagedCache", "PLANE_ORDERS"]

#: Where the K/V plane dimension sits relative to the block dimension (kv_kind="kv" only).
PLANE_ORDERS = ("kv_first", "block_first", "head_first")

# Same-width integer dtype for raw-bits copies (bf16 has no numpy twin; ints copy exactly).
_RAW_INT_BY_BYTES = {1: "int8", 2: "int16", 4: "int32", 8: "int64"}


@dataclass(frozen=True)
class PagedCacheLayout:
    """The shape of an engine's paged KV cache. Immutable; validated on construction."""

    num_layers: int
    num_blocks: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    kv_kind: str = "kv"
    plane_order: str = "kv_first"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_blocks", "block_size", "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"PagedCacheLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"PagedCacheLayout.dtype {self.dtype!r} is not supported; "
                f"use one of {sorted(DTYPE_BYTES)}"
            )
        if self.kv_kind not in ("kv", "mla"):
            raise ValueError(
                f"PagedCacheLayout.kv_kind must be 'kv' or 'mla', got {self.kv_kind!r}"
            )
        if self.plane_order not in PLANE_ORDERS:
            raise ValueError(
                f"PagedCacheLayout.plane_order must be one of {PLANE_ORDERS}, "
                f"got {self.plane_order!r}"
            )

    # -- constructors for the layouts engines actually use ------------------------------

    @classmethod
    def vllm(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
             head_dim: int, dtype: str = "bfloat16") -> "PagedCacheLayout":
        """vLLM flash-attention: per layer ``[2, num_blocks, block_size, heads, dim]``."""
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                   "kv", "kv_first")

    @classmethod
    def vllm_cpu(cls, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: str = "bfloat16") -> "PagedCacheLayout":
        """vLLM CPU backend: per layer ``[num_blocks, heads, 2, block_size, dim]``."""
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype,
                   "kv", "head_first")

    @classmethod
    def mla(cls, num_layers: int, num_blocks: int, block_size: int, head_dim: int,
            dtype: str = "bfloat16", num_kv_heads: int = 1) -> "PagedCacheLayout":
        """MLA latent cache: per layer ``[num_blocks, block_size, heads, dim]`` (heads is 1)."""
        return cls(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, "mla")

    # -- derived shapes ------------------------------------------------------------------

    @property
    def planes(self) -> int:
        """2 for separate K and V, 1 for MLA's single latent."""
        return 2 if self.kv_kind == "kv" else 1

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def chunk_elems(self) -> int:
        """Elements in one plane of one engine block of one layer (contiguous by invariant)."""
        return self.block_size * self.num_kv_heads * self.head_dim

    @property
    def layer_shape(self) -> tuple[int, ...]:
        """The shape of one layer's tensor."""
        tail = (self.block_size, self.num_kv_heads, self.head_dim)
        if self.kv_kind == "mla":
            return (self.num_blocks, *tail)
        if self.plane_order == "kv_first":
            return (2, self.num_blocks, *tail)
        if self.plane_order == "head_first":
            return (self.num_blocks, self.num_kv_heads, 2, self.block_size, self.head_dim)
        return (self.num_blocks, 2, *tail)

    @property
    def stacked_shape(self) -> tuple[int, ...]:
        """The shape of all layers stacked into one tensor."""
        return (self.num_layers, *self.layer_shape)

    @property
    def block_dim(self) -> int:
        """Index of the block dimension in a layer tensor."""
        return 1 if (self.kv_kind == "kv" and self.plane_order == "kv_first") else 0

    @property
    def plane_dim(self) -> int | None:
        """Index of the K/V plane dimension in a layer tensor (None for MLA)."""
        if self.kv_kind == "mla":
            return None
        return {"kv_first": 0, "block_first": 1, "head_first": 2}[self.plane_order]

    @property
    def chunks_contiguous(self) -> bool:
        """Whether one plane of one engine block is one contiguous run (the kernels need it)."""
        return not (self.kv_kind == "kv" and self.plane_order == "head_first")

    def to_kv_layout(self, block_tokens: int | None = None) -> KVLayout:
        """The pool block layout this cache maps to.

        ``block_tokens`` defaults to the engine's ``block_size``; it may be any multiple of
        it, in which case one pool block is gathered from consecutive block-table entries.
        """
        tokens = self.block_size if block_tokens is None else block_tokens
        if tokens % self.block_size != 0:
            raise ValueError(
                f"pool block_tokens={tokens} is not a multiple of the engine block_size="
                f"{self.block_size}; choose a pool block of k * {self.block_size} tokens"
            )
        return KVLayout(self.num_layers, self.num_kv_heads, self.head_dim, self.dtype,
                        tokens, self.kv_kind)

    def check_pool_layout(self, pool: KVLayout) -> int:
        """Check that ``pool`` can be gathered from this cache; return engine blocks per pool block."""
        mismatched = [
            f"{name} (pool {getattr(pool, name)!r} vs cache {getattr(self, name)!r})"
            for name in ("num_layers", "num_kv_heads", "head_dim", "dtype", "kv_kind")
            if getattr(pool, name) != getattr(self, name)
        ]
        if mismatched:
            raise ValueError(
                "pool KVLayout does not match the engine's PagedCacheLayout in "
                + ", ".join(mismatched)
                + "; build it with PagedCacheLayout.to_kv_layout()"
            )
        if pool.block_tokens % self.block_size != 0:
            raise ValueError(
                f"pool block_tokens={pool.block_tokens} is not a multiple of the engine "
                f"block_size={self.block_size}"
            )
        return pool.block_tokens // self.block_size

    # -- validating tensors ----------------------------------------------------------------

    def torch_dtype(self):
        import torch

        return getattr(torch, self.dtype)

    def raw_dtype(self):
        """The same-width integer torch dtype used to copy this cache as raw bits."""
        import torch

        return getattr(torch, _RAW_INT_BY_BYTES[self.element_bytes])

    def check_layer(self, tensor: Any, what: str = "layer tensor") -> None:
        """Raise ValueError, saying what to change, unless ``tensor`` is one layer of this cache."""
        import torch

        if not isinstance(tensor, torch.Tensor):
            raise ValueError(f"{what} must be a torch.Tensor, got {type(tensor).__name__}")
        if tuple(tensor.shape) != self.layer_shape:
            raise ValueError(
                f"{what} has shape {tuple(tensor.shape)} but the PagedCacheLayout "
                f"({self.kv_kind}, {self.plane_order}) expects {self.layer_shape} = "
                f"{self._shape_names()}; fix the layout descriptor or pass the right tensor"
            )
        if tensor.dtype != self.torch_dtype():
            raise ValueError(
                f"{what} has dtype {tensor.dtype} but the layout says {self.dtype}"
            )
        inner = (self.num_kv_heads * self.head_dim, self.head_dim, 1)
        if not self.chunks_contiguous:  # [.., heads, 2, block_size, dim]: the block is contiguous
            inner = (2 * self.block_size * self.head_dim, self.block_size * self.head_dim, self.head_dim, 1)
        if tuple(tensor.stride()[-len(inner):]) != inner:
            raise ValueError(
                f"{what} has strides {tuple(tensor.stride())}: the (block_size, heads, dim) "
                f"dimensions must be contiguous (inner strides {inner}); "
                f"pass the engine's cache tensor itself, not a permuted view"
            )

    def _shape_names(self) -> str:
        tail = "block_size, num_kv_heads, head_dim"
        if self.kv_kind == "mla":
            return f"[num_blocks, {tail}]"
        if self.plane_order == "kv_first":
            return f"[2, num_blocks, {tail}]"
        if self.plane_order == "head_first":
            return "[num_blocks, num_kv_heads, 2, block_size, head_dim]"
        return f"[num_blocks, 2, {tail}]"

    def layers_of(self, kv_caches: Any) -> list:
        """Validated per-layer tensors from a sequence of layers or one stacked tensor."""
        import torch

        if isinstance(kv_caches, BoundPagedCache):
            if kv_caches.layout != self:
                raise ValueError("the bound cache was bound with a different PagedCacheLayout")
            return list(kv_caches.layers)
        if isinstance(kv_caches, torch.Tensor):
            if tuple(kv_caches.shape) != self.stacked_shape:
                raise ValueError(
                    f"stacked cache has shape {tuple(kv_caches.shape)} but the layout expects "
                    f"{self.stacked_shape} = [num_layers, *{self._shape_names()}]; to pass "
                    f"layers separately use a list or tuple of per-layer tensors"
                )
            layers = list(kv_caches.unbind(0))
        elif isinstance(kv_caches, (list, tuple)):
            layers = list(kv_caches)
            if len(layers) != self.num_layers:
                raise ValueError(
                    f"got {len(layers)} layer tensors but the layout has "
                    f"num_layers={self.num_layers}"
                )
        else:
            raise ValueError(
                "kv_caches must be a list/tuple of per-layer tensors or one stacked tensor, "
                f"got {type(kv_caches).__name__}"
            )
        device = None
        strides = None
        for i, layer in enumerate(layers):
            self.check_layer(layer, f"layer {i} tensor")
            if device is None:
                device, strides = layer.device, layer.stride()
            elif layer.device != device:
                raise ValueError(
                    f"layer {i} is on {layer.device} but layer 0 is on {device}; "
                    f"all layers of a cache must be on one device"
                )
            elif layer.stride() != strides:
                raise ValueError(
                    f"layer {i} has strides {layer.stride()} but layer 0 has {strides}; "
                    f"every layer must share one memory layout"
                )
        return layers

    def bind(self, kv_caches: Any) -> "BoundPagedCache":
        """Validate ``kv_caches`` once and precompute what the copy kernels need.

        Engines should bind once at registration and pass the result to every copy: it keeps
        the per-layer offset table on the device instead of rebuilding it per call.
        """
        if isinstance(kv_caches, BoundPagedCache):
            if kv_caches.layout != self:
                raise ValueError("the bound cache was bound with a different PagedCacheLayout")
            return kv_caches
        return BoundPagedCache(self, self.layers_of(kv_caches))


class BoundPagedCache:
    """A validated cache plus what the all-layers copy kernels need to address it.

    The kernels get one *anchor* pointer (the layer with the lowest address) and a device
    table of per-layer element offsets from it. Offsets are non-negative by choice of anchor,
    so the same addressing works on a GPU and in the Triton interpreter (which does pointer
    arithmetic on unsigned 64-bit addresses), and no integer is ever cast to a pointer.
    """

    def __init__(self, layout: PagedCacheLayout, layers: Sequence) -> None:
        import torch

        self.layout = layout
        self.layers = tuple(layers)
        raw = layout.raw_dtype()
        self.raw_layers = tuple(t.view(raw) for t in self.layers)
        ptrs = [t.data_ptr() for t in self.raw_layers]
        anchor = min(range(len(ptrs)), key=ptrs.__getitem__)
        esize = layout.element_bytes
        offsets = []
        for i, p in enumerate(ptrs):
            delta = p - ptrs[anchor]
            if delta % esize:
                raise ValueError(
                    f"layer {i} starts {delta} bytes from layer {anchor}, not a multiple of "
                    f"the {esize}-byte element; layer tensors must be element-aligned"
                )
            offsets.append(delta // esize)
        self.anchor = self.raw_layers[anchor]
        self.layer_offsets = torch.tensor(offsets, dtype=torch.int64, device=self.anchor.device)
        strides = self.layers[0].stride()
        self.block_stride = strides[layout.block_dim]
        self.plane_stride = 0 if layout.plane_dim is None else strides[layout.plane_dim]
        # The largest power of two (at most 16 bytes' worth) dividing every chunk start,
        # counted in elements from the anchor. The kernel tells the compiler so.
        common = 0
        for value in (*offsets, self.block_stride, self.plane_stride, layout.chunk_elems,
                      self.anchor.data_ptr() // esize if self.anchor.data_ptr() % esize == 0 else 1):
            common = math.gcd(common, value)
        align = 1
        while align * 2 * esize <= 16 and common % (align * 2) == 0:
            align *= 2
        self.align_elems = align

    @property
    def device(self):
        return self.anchor.device
