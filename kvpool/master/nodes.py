"""The master's view of nodes: the interface it allocates through, and the registry.

The master never touches block bytes. It reserves and frees memory slots on a node through
:class:`NodeHandle`, and asks it to move blocks between its tiers. In ``kvpool serve`` the
handle is the in-process node object itself (:class:`kvpool.node.node.Node`); a node in
another process is a :class:`kvpool.master.remote.RemoteNode`. The master's code is the same
either way (docs/design.md §1).
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from kvpool.tiers.base import Slot, TierCaps, TierUsage
from kvpool.tiers.moves import DemoteResult, PromoteResult
from kvpool.transport.endpoint import NodeEndpoint

__all__ = ["NodeHandle", "NodeRegistry", "memory_tiers", "has_durable_tier"]


@runtime_checkable
class NodeHandle(Protocol):
    """What the master needs from a node. Calls are cheap and non-blocking."""

    node_id: int
    name: str
    #: Whether the node can copy blocks from other nodes' data servers (``pull``), so that it
    #: may hold replicas.
    pulls_replicas: bool
    #: The node process's start ("" for the node inside the master's own process).
    incarnation: str
    #: Changes to its memory slots the node has not applied yet (kvpool.node.resident).
    unapplied_changes: int
    #: Key of the node's data-plane capabilities (kvpool.capability): grants and leases are
    #: signed with it, and the node's data server checks them.
    data_key: bytes
    #: host:port of the node's control service; "" for the node inside this process.
    control_address: str
    #: Monotonic time of the node's last heartbeat; None for a node that does not send them
    #: (the one inside this process, which cannot go silent without the master).
    last_seen: float | None

    def tier_names(self) -> list[str]:
        """The node's tiers, fastest first."""

    def tier_caps(self) -> dict[str, TierCaps]:
        """What each tier can do (kvpool.tiers.base.TierCaps), fastest first. The master
        chooses tiers by these flags, never by their names."""

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

    async def demote(self, items, *, keep_dram: bool) -> DemoteResult:
        """Copy (key, memory slot, checksum, namespace) blocks to NVMe; the result lists
        ``moved`` (key, nvme slot), ``no_space`` keys and ``failed`` (key, reason)."""

    async def promote(self, items) -> PromoteResult:
        """Read (key, nvme slot, checksum, dram slot) blocks into DRAM, verifying checksums;
        the result lists ``promoted`` keys and ``corrupt`` (key, reason)."""

    async def drop_nvme(self, items) -> None:
        """Remove (key, nvme slot) copies from the node's NVMe tier and catalog."""

    async def move_tier(self, items, source_tier: str, target_tier: str) -> tuple[list[bytes], list[bytes]]:
        """Copy (key, source slot, checksum, namespace, target slot) blocks between the node's
        memory tiers (HBM -> DRAM), checksums verified; returns (moved keys, corrupt keys)."""

    # Copying blocks between nodes (kvpool.master.copier, for replicas and drains):

    async def pull(self, source: NodeEndpoint, access, tier: str, slots, keys=(), namespace_ids=()) -> list[int]:
        """Copy the blocks of ``access.records`` (a read capability on ``source``) from the
        source's data server into ``slots`` of ``tier`` here; returns the positions of blocks
        that failed their checksum. With ``keys`` and ``namespace_ids`` (one per record), the
        node records the good copies as its resident blocks (kvpool.master.copier)."""


    async def disconnect(self) -> None:
        """The master is done with this handle: release what it holds for the node (a
        channel). The node itself keeps running."""


def memory_tiers(node: NodeHandle) -> list[str]:
    """Tiers clients read and write directly (not durable, block-I/O tiers), fastest first."""
    return [name for name, caps in node.tier_caps().items() if TierCaps.PERSISTENT not in caps]


def has_durable_tier(node: NodeHandle) -> bool:
    """Whether blocks can be demoted to a tier that survives a restart (NVMe)."""
    return any(TierCaps.PERSISTENT in caps for caps in node.tier_caps().values())


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
