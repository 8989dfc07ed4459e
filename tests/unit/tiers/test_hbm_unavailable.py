"""Without CUDA the HBM tier reports itself unavailable and nothing else breaks."""

import numpy as np
import pytest

torch = pytest.importorskip("torch")

if torch.cuda.is_available():  # pragma: no cover - this file is about CPU-only hosts
    pytest.skip("CUDA is available here; tests/gpu covers the HBM tier", allow_module_level=True)

from kvpool.tiers.base import Arena, TierCaps  # noqa: E402
from kvpool.tiers.hbm import (  # noqa: E402
    HbmArena,
    HbmIpcHandle,
    HbmUnavailableError,
    open_hbm_ipc,
)
from kvpool.tiers.pinning import cuda_available, register_pinned, unregister_pinned  # noqa: E402


def test_available_says_no_and_why():
    ok, reason = HbmArena.available()
    assert ok is False
    assert "CPU-only" in reason or "no CUDA device" in reason or "not installed" in reason


def test_constructing_raises_a_clear_error():
    with pytest.raises(HbmUnavailableError, match="the HBM tier needs CUDA") as info:
        HbmArena(1 << 20)
    assert "without an HBM tier" in str(info.value)
    assert isinstance(info.value, RuntimeError)


def test_declares_its_caps_without_being_built():
    assert issubclass(HbmArena, Arena)
    assert HbmArena.caps == TierCaps.DEVICE | TierCaps.CUDA_IPC
    assert HbmArena.name == "hbm"


def test_opening_a_handle_raises_clearly():
    handle = HbmIpcHandle(0, 16, b"\0" * 64, 16, 0, 0, None, 0, None, False)
    assert HbmIpcHandle.from_dict(handle.to_dict()) == handle
    with pytest.raises(HbmUnavailableError, match="cannot open"):
        open_hbm_ipc(handle)


def test_pinning_is_a_no_op_without_cuda():
    assert cuda_available() is False
    arr = np.zeros(4096, dtype=np.uint8)
    assert register_pinned(arr) is None
    unregister_pinned(None)  # must not raise
    with pytest.raises(ValueError, match="uint8"):
        register_pinned(np.zeros(8, dtype=np.float32))


def test_dram_arena_pin_reports_false(tmp_path):
    from kvpool.tiers.dram import DramArena

    arena = DramArena(1 << 20, chunk_bytes=1 << 16, prefault=False)
    try:
        assert arena.pin() is False
        assert not arena.caps & TierCaps.PINNED
    finally:
        arena.close()
