"""The master's view of nodes: the interface it allocates through, and the registry.

The master never touches block bytes. It reserves and frees memory slots on a node through
:class:`NodeHandle`, and asks it to move blocks between its tiers. In ``kvpool serve`` the
handle is the in-process node object itself (:class:`kvpool.node.node.Node`); a node in
another process is a :class:`kvpool.master.remote.RemoteNode`. The master's code is the same
either way (DESIGN.md §1).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvpool.tiers.base import Slot, TierUsage
from kvpool.transport.endpoint import NodeEndpoint

__all__ = ["NodeHandle", "NodeRegistry"]


@runtime_checkable
class NodeHandle(Protocol):
    """What the master needs from a node. Calls are cheap and non-blocking."""

    node_id: int
    name: str
    #: Whether the node can copy blocks from other nodes' data servers (replicas).
    pulls_replicas: bool
    #: Key of the node's data-plane capabilities (kvpool.capability): grants and leases are
    #: signed with it, and the node's data server checks them.
    data_key: bytes

    def tier_names(self) -> list[str]:
        """The node's tiers, fastest first."""

    def allocate(self, tier: str, size: int) -> Slot | None:
        """Reserve a slot of ``size`` bytes in ``tier``, or None if it is full."""

    def free(self, tier: str, slot: Slot) -> None:
        """Return a slot. The master calls this exactly once per allocated slot."""

    def note_resident(self, entries) -> None:
        """These committed index entries now have their memory copy on this node (see
        :mod:`kvpool.node.resident`: a node in another process learns it in the background)."""

    def free_slots_for(self, tier: str, size: int) -> int:
        """How many more blocks of ``size`` the tier can take without eviction."""

    def usage(self) -> list[TierUsage]: ...

    def endpoint(self) -> NodeEndpoint:
        """How clients reach the node (host, shared segments, data server, UCX)."""

    def recover(self) -> list:
        """Blocks found on NVMe at start: (key, slot, checksum, namespace id)."""

    # Tier movement, for nodes with an NVMe tier (kvpool.master.tiering drives it):

    async def demote(self, items, *, keep_dram: bool):
        """Copy (key, memory slot, checksum, namespace) blocks to NVMe; the result lists
        ``moved`` (key, nvme slot), ``no_space`` keys and ``failed`` (key, reason)."""

    async def promote(self, items):
        """Read (key, nvme slot, checksum, dram slot) blocks into DRAM, verifying checksums;
        the result lists ``promoted`` keys and ``corrupt`` (key, reason)."""

    async def drop_nvme(self, items) -> None:
        """Remove (key, nvme slot) copies from the node's NVMe tier and catalog."""


class NodeRegistry:
    """Nodes known to the master, by id. Ids are small ints that appear in location records."""

    def __init__(self) -> None:
        self._nodes: dict[int, NodeHandle] = {}

    def add(self, node: NodeHandle) -> None:
        if node.node_id in self._nodes:
            raise ValueError(f"node id {node.node_id} is already registered")
        self._nodes[node.node_id] = node

    def remove(self, node_id: int) -> None:
        self._nodes.pop(node_id, None)

    def get(self, node_id: int) -> NodeHandle | None:
        return self._nodes.get(node_id)

    def __iter__(self):
        return iter(list(self._nodes.values()))

    def __len__(self) -> int:
        return len(self._nodes)
