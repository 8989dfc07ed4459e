"""HBM arena, pinned DRAM and CUDA IPC between two processes, on a real GPU."""

import multiprocessing as mp

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from kvpool.tiers.base import TierCaps  # noqa: E402
from kvpool.tiers.dram import DramArena  # noqa: E402
from kvpool.tiers.hbm import HbmArena, HbmIpcHandle  # noqa: E402

pytestmark = pytest.mark.gpu

MIB = 1 << 20


def test_available_and_caps():
    ok, reason = HbmArena.available()
    assert ok, reason
    arena = HbmArena(8 * MIB, chunk_bytes=2 * MIB)
    assert arena.caps & TierCaps.DEVICE and arena.caps & TierCaps.CUDA_IPC
    assert arena.buffer.is_cuda and arena.capacity == 8 * MIB
    arena.close()


def test_write_read_every_kind_of_buffer():
    arena = HbmArena(8 * MIB, chunk_bytes=2 * MIB)
    size = 256 * 1024
    payload = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8)
    sources = [payload.tobytes(), payload, memoryview(payload), torch.from_numpy(payload),
               torch.from_numpy(payload).cuda(), torch.from_numpy(payload).view(torch.float16)]
    for src in sources:
        slot = arena.allocate(size)
        arena.write(slot, src)
        out_np = np.zeros(size, np.uint8)
        arena.read_into(slot, out_np)
        assert np.array_equal(out_np, payload)
        out_dev = torch.zeros(size, dtype=torch.uint8, device="cuda")
        arena.read_into(slot, out_dev)
        assert torch.equal(out_dev.cpu(), torch.from_numpy(payload))
        arena.free(slot)
    slot = arena.allocate(size)
    with pytest.raises(ValueError, match="into a slot"):
        arena.write(slot, b"short")
    arena.close()


@pytest.mark.usefixtures("compiled_kernels")
def test_gather_straight_into_hbm_slots():
    from kvpool.kernels.paged_copy import gather_blocks, scatter_blocks
    from kvpool.kernels.paged_layout import PagedCacheLayout

    layout = PagedCacheLayout.vllm(4, 32, 16, 8, 128, "bfloat16")
    pool = layout.to_kv_layout()
    arena = HbmArena(64 * MIB, chunk_bytes=16 * MIB)
    cache = [torch.randn(layout.layer_shape, device="cuda").to(torch.bfloat16) for _ in range(4)]
    slot = arena.allocate(3 * pool.block_bytes)
    gather_blocks(cache, torch.tensor([7, 1, 30], device="cuda"), arena.slot_tensor(slot),
                  layout=layout)
    back = [torch.zeros_like(t) for t in cache]
    scatter_blocks(arena.slot_tensor(slot), back, torch.tensor([7, 1, 30], device="cuda"),
                   layout=layout)
    for a, b in zip(cache, back):
        assert torch.equal(a[:, [7, 1, 30]], b[:, [7, 1, 30]])
    arena.close()


def test_dram_arena_pins_and_unpins():
    arena = DramArena(16 * MIB, chunk_bytes=4 * MIB)
    try:
        assert arena.pin() is True
        assert arena.caps & TierCaps.PINNED
        host = torch.from_numpy(arena.array)
        assert host.is_pinned()
        dev = torch.arange(4 * MIB, dtype=torch.uint8, device="cuda")
        host[: 4 * MIB].copy_(dev, non_blocking=True)
        torch.cuda.synchronize()
        assert torch.equal(host[: 4 * MIB], dev.cpu())
        del host
    finally:
        arena.close()


def _ipc_child(handle_dict, slot_offset, size, queue):
    import torch

    from kvpool.tiers.hbm import HbmIpcHandle, open_hbm_ipc

    try:
        mapped = open_hbm_ipc(HbmIpcHandle.from_dict(handle_dict))
        seen = mapped[slot_offset : slot_offset + size].cpu().numpy().tobytes()
        # Write back into the next slot so the parent can see the child's bytes.
        mapped[slot_offset + size : slot_offset + 2 * size].copy_(
            torch.full((size,), 0xAB, dtype=torch.uint8, device=mapped.device))
        torch.cuda.synchronize()
        del mapped
        queue.put(("ok", seen))
    except Exception as exc:  # report, do not hang the parent
        queue.put(("error", repr(exc)))


def test_cuda_ipc_between_two_processes():
    arena = HbmArena(8 * MIB, chunk_bytes=2 * MIB)
    size = 64 * 1024
    slot = arena.allocate(size)
    nxt = arena.allocate(size)
    assert nxt.offset == slot.offset + size
    payload = np.random.default_rng(1).integers(0, 256, size, dtype=np.uint8)
    arena.write(slot, payload)
    torch.cuda.synchronize()
    handle = arena.ipc_handle()
    assert HbmIpcHandle.from_dict(handle.to_dict()) == handle

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_ipc_child, args=(handle.to_dict(), slot.offset, size, queue))
    proc.start()
    status, result = queue.get(timeout=120)
    proc.join(timeout=60)
    assert status == "ok", result
    assert result == payload.tobytes()
    out = np.zeros(size, np.uint8)
    arena.read_into(nxt, out)
    assert (out == 0xAB).all()
    assert proc.exitcode == 0
    arena.close()

