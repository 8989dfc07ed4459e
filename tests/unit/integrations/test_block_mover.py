"""PagedBlockMover on the CPU: each engine cache layout it recognises, gathered into pool blocks
laid out as KVLayout says (layers x planes x tokens x heads x dim) and scattered back."""

from __future__ import annotations

import pytest
import torch

from kvpool import KVLayout
from kvpool.integrations.block_mover import PagedBlockMover

LAYERS, NB, BS, H, D = 3, 10, 4, 2, 8


def engine_caches(form: str) -> dict[str, torch.Tensor]:
    """Per-layer caches in one engine layout, every element distinct."""
    shape = {"flash": (2, NB, BS, H, D), "flashinfer": (NB, 2, BS, H, D), "cpu": (NB, H, BS, 2 * D),
             "mla": (NB, BS, D)}[form]
    n = torch.Size(shape).numel()
    # Layer names out of order on purpose: the mover orders them by their layer number.
    return {f"model.layers.{l}.attn": torch.arange(l * n, (l + 1) * n, dtype=torch.float32).view(shape)
            for l in (2, 0, 1)}


def block_as_pool(caches: dict[str, torch.Tensor], form: str, block: int) -> torch.Tensor:
    """Engine block ``block`` as a pool block: [layers, planes, tokens, heads, dim]."""
    out = []
    for l in range(LAYERS):
        t = caches[f"model.layers.{l}.attn"]
        if form == "flash":
            out.append(t[:, block])
        elif form == "flashinfer":
            out.append(t[block])
        elif form == "cpu":  # [H, BS, 2D] holds, per head, the K rows of the block then its V rows
            out.append(t[block].view(H, 2, BS, D).permute(1, 2, 0, 3))
        else:
            out.append(t[block].view(1, BS, 1, D))
    return torch.stack(out)


@pytest.mark.parametrize("form", ["flash", "flashinfer", "cpu", "mla"])
def test_gather_then_scatter_matches_the_pool_layout(form):
    mla = form == "mla"
    layout = KVLayout(LAYERS, 1 if mla else H, D, "float32", BS, "mla" if mla else "kv")
    caches = engine_caches(form)
    mover = PagedBlockMover(caches, layout)
    assert mover.kernel == "gather_blocks_ref"  # a CPU cache: the torch reference copies
    ids = [7, 2, 5]
    staging = mover.staging(len(ids))
    assert staging.shape == (3, layout.block_bytes)
    mover.gather(ids, staging)
    for i, b in enumerate(ids):
        assert torch.equal(staging[i].view(torch.float32), block_as_pool(caches, form, b).reshape(-1)), b

    empty = {name: torch.zeros_like(t) for name, t in caches.items()}
    PagedBlockMover(empty, layout).scatter(staging, [1, 3, 9])
    for dst, src in zip([1, 3, 9], ids):
        assert torch.equal(block_as_pool(empty, form, dst), block_as_pool(caches, form, src))
    assert not block_as_pool(empty, form, 0).any()  # untouched blocks stay untouched


def test_an_unknown_layout_or_layer_count_is_refused_with_what_was_expected():
    layout = KVLayout(LAYERS, H, D, "float32", BS, "kv")
    odd = {f"model.layers.{l}.attn": torch.zeros(NB, BS, H, D) for l in range(LAYERS)}
    with pytest.raises(ValueError, match=r"not one kvpool recognises: \(10, 4, 2, 8\).*known:"):
        PagedBlockMover(odd, layout)
    with pytest.raises(ValueError, match="registered 2 KV cache tensors but its KV cache config names 3"):
        PagedBlockMover(dict(list(engine_caches("flash").items())[:2]), layout)
