"""Kernels: which attention and paged-copy implementations a worker runs."""

from __future__ import annotations

__all__ = ["Kernels"]


class Kernels:
    """The attention and copy kernels a worker runs: ``"triton"`` or ``"torch"`` (the
    references). ``"auto"`` is Triton on CUDA tensors and the references on the CPU."""

    def __init__(self, choice: str, device) -> None:
        # From the submodules, so that nothing triton-related loads before it is used.
        from kvpool.kernels.paged_copy import gather_blocks, gather_blocks_ref, scatter_blocks, scatter_blocks_ref
        from kvpool.kernels.attention import prefix_attention, prefix_attention_ref

        if choice == "auto":
            choice = "triton" if device.type == "cuda" else "torch"
        if choice not in ("triton", "torch"):
            raise ValueError(f"kernels must be 'auto', 'triton' or 'torch', got {choice!r}")
        self.name = choice
        triton = choice == "triton"
        self.attention = prefix_attention if triton else prefix_attention_ref
        self.gather = gather_blocks if triton else gather_blocks_ref
        self.scatter = scatter_blocks if triton else scatter_blocks_ref
