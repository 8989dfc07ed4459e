"""The master sees every node through one typed interface (NodeHandle), whatever its kind.

A node in the master's process and the RemoteNode that mirrors one in another process
describe their tiers by capability flags, alike; movement results are the typed
DemoteResult/PromoteResult; and no master code tells the kinds apart (isinstance, getattr).
"""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path

import numpy as np

from kvpool.master.nodes import NodeHandle, has_durable_tier, memory_tiers
from kvpool.master.remote import RemoteNode
from kvpool.node.mover import checksum
from kvpool.node.node import Node
from kvpool.node.service import _geometry
from kvpool.rpc.v1 import node_pb2
from kvpool.tiers.base import TierCaps
from kvpool.tiers.moves import DemoteResult, PromoteResult

ROOT = Path(__file__).resolve().parents[3]


def test_in_process_and_remote_handles_describe_tiers_by_the_same_flags(tmp_path):
    node = Node.build(7, "n", dram_bytes=8 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path), chunk_bytes=1 << 20,
                      prefault=False)
    try:
        remote = RemoteNode(101, node_pb2.RegisterNodeRequest(name="n", control_address="h:1",
                                                              tiers=_geometry(node)))
        for handle in (node, remote):
            assert isinstance(handle, NodeHandle)
            assert memory_tiers(handle) == ["dram"] and has_durable_tier(handle)
            assert TierCaps.PERSISTENT in handle.tier_caps()["nvme"]
        assert node.tier_caps() == remote.tier_caps()
        assert (node.last_seen, node.control_address) == (None, "")
        assert remote.last_seen is not None and remote.control_address == "h:1"
        # The remote mirror allocates in memory tiers only; the durable tier is the node's.
        assert remote.allocate("dram", 1 << 16) is not None
        assert [u.name for u in remote.usage()] == [u.name for u in node.usage()]
    finally:
        node.close()


def test_movement_results_are_typed(tmp_path):
    node = Node.build(7, "n", dram_bytes=8 << 20, nvme_bytes=8 << 20, data_dir=str(tmp_path), chunk_bytes=1 << 20,
                      prefault=False)
    try:
        slot = node.allocate("dram", 1 << 16)
        view = np.frombuffer(node.tiers["dram"].view(slot), dtype=np.uint8)
        view[:] = 7
        moved = asyncio.run(node.demote([(b"k" * 16, slot, checksum(view), "ns")], keep_dram=True))
        assert isinstance(moved, DemoteResult) and len(moved.moved) == 1
        back = asyncio.run(node.promote([(b"k" * 16, moved.moved[0][1], checksum(view), slot)]))
        assert isinstance(back, PromoteResult) and back.promoted == [b"k" * 16]
    finally:
        node.close()


def test_no_master_code_tells_node_kinds_apart():
    files = sorted((ROOT / "kvpool" / "master").glob("*.py")) + [ROOT / "kvpool" / "server.py"]
    found = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                args = [ast.unparse(a) for a in node.args]
                if node.func.id == "isinstance" and any(k in args[1] for k in ("Node", "NodeHandle")):
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
                if node.func.id in ("getattr", "hasattr") and "node" in args[0]:
                    found.append(f"{path.name}:{node.lineno}: {ast.unparse(node)}")
            # Tiers are chosen by flags: no comparison of a tier name with "nvme" outside the index,
            # whose bookkeeping keys copies by tier name.
            if isinstance(node, ast.Compare) and path.name not in ("index.py",):
                text = ast.unparse(node)
                if "'nvme'" in text or "NVME" in text:
                    found.append(f"{path.name}:{node.lineno}: {text}")
    assert not found, found


def test_tier_movement_uses_only_public_index_methods():
    """Tiering, draining and the servicers change the index through its public methods only."""
    found = []
    for path in sorted((ROOT / "kvpool").rglob("*.py")):
        if path.name == "index.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if (isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__")
                    and ast.unparse(node.value).split(".")[-1] == "index"):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not found, found
