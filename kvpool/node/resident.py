"""What a node's memory tiers hold: the node's own record of its committed blocks.

The master allocates memory slots and clients write them, so the node never sees a commit
happen. The master tells it afterwards, in order and in batches, on the answers to the
node's heartbeats (``HeartbeatResponse.changes``, numbered by ``changes_seq``): "slot S of
tier T now holds committed block K" or "slot S holds nothing". This keeps commits off the
client's path, at the price of a lag of one heartbeat.

When the node registers again with the same process (its master restarted, or failed over),
it reports these blocks, and the master serves them again. Before reporting, the node hashes
each block's bytes and drops any whose checksum no longer matches: a change the node never
got (the master died first) can leave a slot named for a block whose bytes a later writer
replaced, and such a slot must never be served under the old key.

Invariant: a slot is listed at most once, with the last block the master said it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import xxhash

__all__ = ["ResidentBlock", "ResidentMap"]


@dataclass(frozen=True)
class ResidentBlock:
    tier: str
    offset: int
    size: int
    key: bytes
    checksum: int
    namespace_id: str


class ResidentMap:
    def __init__(self) -> None:
        self._slots: dict[tuple[str, int], ResidentBlock] = {}
        #: The sequence number of the last change applied (the master resends what follows).
        self.applied_seq = 0

    def apply(self, changes, seq: int) -> None:
        """Apply the master's changes (protos or :class:`ResidentBlock`), in order: consecutive
        ones, the last numbered ``seq``. Those at or below :attr:`applied_seq` were applied
        already and are skipped: a heartbeat answer that arrives after a newer
        ``ApplyChanges`` must not bring back a slot that a later change freed."""
        slots = self._slots
        done = max(0, self.applied_seq - (seq - len(changes)))
        for c in changes[done:] if done else changes:
            if c.key:
                slots[(c.tier, c.offset)] = ResidentBlock(c.tier, c.offset, c.size, c.key, c.checksum,
                                                          c.namespace_id)
            else:
                slots.pop((c.tier, c.offset), None)
        self.applied_seq = max(self.applied_seq, seq)

    def add(self, block: ResidentBlock) -> None:
        self._slots[(block.tier, block.offset)] = block

    def reset_seq(self) -> None:
        """A new master numbers its changes from 1: forget the old master's count."""
        self.applied_seq = 0

    def __len__(self) -> int:
        return len(self._slots)

    def blocks(self) -> list[ResidentBlock]:
        return list(self._slots.values())

    def verified(self, arenas) -> list[ResidentBlock]:
        """Blocks whose bytes still match their checksum; others are forgotten.

        ``arenas`` maps a tier name to its bytes (a numpy uint8 array). Blocks of tiers the
        node cannot read from the host (HBM) are kept as they are: only the master's own
        bookkeeping ever named them, and CUDA memory is not shared with other writers.
        """
        good = []
        digest = xxhash.xxh3_64_intdigest
        for slot, b in list(self._slots.items()):
            arena = arenas.get(b.tier)
            if arena is not None and digest(arena[b.offset : b.offset + b.size]) != b.checksum:
                del self._slots[slot]
                continue
            good.append(b)
        return good

    def holds(self, block, arenas) -> bool:
        """Whether ``block``'s slot holds bytes with its checksum (host-readable tiers only)."""
        arena = arenas.get(block.tier)
        if arena is None or block.offset + block.size > len(arena):
            return False
        return xxhash.xxh3_64_intdigest(arena[block.offset : block.offset + block.size]) == block.checksum
