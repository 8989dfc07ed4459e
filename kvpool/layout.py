"""KVLayout: the shape of one pool block, its size in bytes, and its fingerprint.

A pool block holds the KV cache of ``block_tokens`` consecutive tokens for every layer
of one tensor-parallel shard. Its bytes are laid out, outermost first:

* ``kv_kind="kv"``  : layers x 2 (K then V) x tokens x kv_heads x head_dim
* ``kv_kind="mla"`` : layers x tokens x kv_heads x head_dim   (one latent, no K/V split)

This order is fixed (docs/design.md §4): it lets one block be gathered from an engine's paged
cache layer by layer and makes the bytes of a block independent of the engine that wrote
it. The fingerprint is part of block identity (docs/design.md §2), so two engines whose
layouts differ in any field can never read each other's blocks.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass

import xxhash

__all__ = ["KVLayout", "DTYPE_BYTES"]

#: Element sizes of the dtypes a block may hold. Names are torch's dtype names.
DTYPE_BYTES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "int8": 1,
    "uint8": 1,
}

_KV_KINDS = ("kv", "mla")


@dataclass(frozen=True)
class KVLayout:
    """The shape of one pool block. Immutable and hashable; validated on construction."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: str = "bfloat16"
    block_tokens: int = 16
    kv_kind: str = "kv"

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"KVLayout.{name} must be a positive int, got {value!r}")
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(
                f"KVLayout.dtype {self.dtype!r} is not supported; use one of {sorted(DTYPE_BYTES)}"
            )
        if self.kv_kind not in _KV_KINDS:
            raise ValueError(f"KVLayout.kv_kind must be one of {_KV_KINDS}, got {self.kv_kind!r}")

    @property
    def kv_planes(self) -> int:
        """2 for separate K and V, 1 for MLA's single latent."""
        return 2 if self.kv_kind == "kv" else 1

    @property
    def element_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def shape(self) -> tuple[int, ...]:
        """The block as a tensor shape, outermost dimension first."""
        tail = (self.block_tokens, self.num_kv_heads, self.head_dim)
        if self.kv_kind == "kv":
            return (self.num_layers, 2, *tail)
        return (self.num_layers, *tail)

    @property
    def block_bytes(self) -> int:
        """Bytes in one block: every layer, every plane, every token of the block."""
        return (
            self.num_layers
            * self.kv_planes
            * self.block_tokens
            * self.num_kv_heads
            * self.head_dim
            * self.element_bytes
        )

    def canonical(self) -> str:
        """A deterministic text form (sorted-key JSON) that other languages can reproduce."""
        return json.dumps(asdict(self), sort_keys=True, separators=(",", ":"))

    @property
    def fingerprint(self) -> str:
        """16 hex digits of xxh3-64 over :meth:`canonical`; pinned by golden tests."""
        return xxhash.xxh3_64_hexdigest(self.canonical().encode())

    @classmethod
    def from_canonical(cls, text: str) -> "KVLayout":
        return cls(**json.loads(text))
