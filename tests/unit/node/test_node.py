"""Node: owns the arenas; NVMe slots belong to the mover alone."""

from __future__ import annotations

import os

import pytest

from kvpool.node.node import Node


def test_node_tiers_endpoint_and_cleanup(tmp_path):
    node = Node.build(1, "n1", dram_bytes=4 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path),
                      chunk_bytes=1 << 20, prefault=False)
    try:
        assert node.tier_names() == ["dram", "nvme"]
        ep = node.endpoint()
        seg = ep.segment("dram", "shm")
        assert os.path.exists(f"/dev/shm/{seg.handle}") and seg.size == 4 << 20
        assert ep.tcp_address == ""  # no data server until serve_data()
        slot = node.allocate("dram", 65536)
        assert slot is not None and node.free_slots_for("dram", 65536) == 4 * 16 - 1
        node.free("dram", slot)
        # A slot is allocated on NVMe if and only if the catalog names it: only the mover allocates.
        with pytest.raises(ValueError, match="tier mover"):
            node.allocate("nvme", 65536)
        with pytest.raises(ValueError, match="tier mover"):
            node.free("nvme", slot)
    finally:
        node.close()
    assert not os.path.exists(f"/dev/shm/{seg.handle}")


def test_failed_build_releases_what_it_made(tmp_path):
    before = set(os.listdir("/dev/shm"))
    with pytest.raises(ValueError):
        Node.build(1, "n1", dram_bytes=4 << 20, nvme_bytes=100, data_dir=str(tmp_path), chunk_bytes=1 << 20,
                   prefault=False)  # NVMe smaller than one aligned page
    assert set(os.listdir("/dev/shm")) == before
