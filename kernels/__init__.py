"""Triton kernels for moving KV between an engine's paged cache and pool blocks.

This folder is the source of the subpackage ``kvpool.kernels`` (mapped in pyproject.toml).
Each kernel sits beside a plain-torch reference with the same signature.

Nothing here imports torch or triton until a name is first used, so ``import
kvpool.kernels`` works on a host without either. Without triton, the ``*_ref`` functions
work and the kernels raise a RuntimeError that says so. Kernels run on CPU tensors only in
triton's interpreter, which ``TRITON_INTERPRET=1`` must select before triton is imported.
"""

from __future__ import annotations

import importlib

__all__ = [
    "PagedCacheLayout",
    "BoundPagedCache",
    "gather_blocks",
    "scatter_blocks",
    "gather_blocks_ref",
    "scatter_blocks_ref",
    "prefix_attention",
    "prefix_attention_ref",
]

_HOMES = {
    "PagedCacheLayout": "paged_layout",
    "BoundPagedCache": "paged_layout",
    "gather_blocks": "paged_copy",
    "scatter_blocks": "paged_copy",
    "gather_blocks_ref": "paged_copy",
    "scatter_blocks_ref": "paged_copy",
    "prefix_attention": "attention",
    "prefix_attention_ref": "attention",
}


def __getattr__(name: str):
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'kvpool.kernels' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"kvpool.kernels.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
