"""Storage tiers: slot arenas for HBM, DRAM and NVMe behind one interface (docs/design.md §4).

This folder is the source of the subpackage ``kvpool.tiers`` (mapped in pyproject.toml).
It never imports ``kvpool.rpc`` or ``kvpool.master``.
"""

from kvpool.tiers.base import Arena, Slot, SlabAllocator, TierCaps, TierUsage

__all__ = ["Arena", "Slot", "SlabAllocator", "TierCaps", "TierUsage"]
