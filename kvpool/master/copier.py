"""The one node-to-node copy: replicas (kvpool.master.replication) and drains (kvpool.master.drain).

Protocol of :func:`copy_blocks`: the caller has pinned ``entries`` (committed blocks with a
memory copy on ``source``) and allocated one slot per entry in ``tier`` of ``target``. Per
tenant (a read capability names one: kvpool-cap/v2 signs it), the master signs a READ
capability over the entries' location records under the source's key, and asks the target
node to pull them (``NodeControl.Pull``). The bytes go from the source's data server straight
into the target's slots, never through the master; the target checks each block's xxh3-64 and
records the good copies as its resident blocks (they are reported again after a master
restart). The caller decides what the copies become (a replica, or the block's new home) and
frees the slots of the others.

Invariants: the master never touches the bytes; a slot whose block failed its checksum, or
whose copy failed as a whole, is never reported copied.
"""

from __future__ import annotations

import logging
import secrets
from dataclasses import dataclass, field

from kvpool.capability import expiry_ms, sign
from kvpool.master.index import Entry
from kvpool.master.nodes import NodeHandle
from kvpool.tiers.base import Slot
from kvpool.transport.base import READ, Access

__all__ = ["CopyResult", "copy_blocks", "COPY_TTL_S"]

log = logging.getLogger("kvpool.master")

#: Seconds the read capability of one copy stays valid.
COPY_TTL_S = 60.0


@dataclass
class CopyResult:
    #: Positions (in ``entries``) whose bytes are now in their target slot, checksum verified.
    copied: set[int] = field(default_factory=set)
    #: Positions that failed their checksum on the way (the source's copy is damaged).
    corrupt: set[int] = field(default_factory=set)
    #: Why a whole group failed (the target or the source went away); "" if none did.
    error: str = ""


async def copy_blocks(source: NodeHandle, target: NodeHandle, tier: str, entries: list[Entry],
                      slots: list[Slot], purpose: str) -> CopyResult:
    """Copy ``entries`` (pinned by the caller) from ``source`` into ``slots`` of ``target``'s
    ``tier``. ``purpose`` names the copy in its capability id and logs ("replicate", "drain")."""
    result = CopyResult()
    groups: dict[str, list[int]] = {}
    for i, e in enumerate(entries):
        groups.setdefault(e.tenant, []).append(i)
    for tenant, positions in groups.items():
        batch = [entries[i] for i in positions]
        records = b"".join(e.record for e in batch)
        copy_id = f"{purpose}-{secrets.token_hex(8)}"
        expires = expiry_ms(COPY_TTL_S)
        access = Access(READ, copy_id, source.node_id, expires,
                        sign(source.data_key, READ, copy_id, source.node_id, expires, records, tenant), records,
                        tenant)
        try:
            bad = set(await target.pull(source.endpoint(), access, tier, [slots[i] for i in positions],
                                        keys=[e.key for e in batch], namespace_ids=[e.ns for e in batch]))
        except Exception as exc:  # the target or the source went away: nothing of this group copied
            log.warning("%s: copy of %d blocks from node %s to %s failed: %s", purpose, len(batch), source.name,
                        target.name, exc)
            result.error = result.error or f"pull from {source.name} into {target.name} failed: {exc}"
            continue
        for j, i in enumerate(positions):
            (result.corrupt if j in bad else result.copied).add(i)
    return result
