"""Wire encodings shared by the master and the client (see proto/kvpool/v1/common.proto).

A block location is a 32-byte little-endian record::

    u32 node_id | u8 tier | 3 bytes zero | u64 offset | u64 size | u64 checksum

and a batch of locations is those records concatenated, or, when every block of the batch
shares node, tier and size, those three once plus 16 bytes per block (``u64 offset |
u64 checksum``): half the bytes, which matters for a 128K-token Lookup. Keys travel as
16-byte keys concatenated. All of it is decoded with numpy in one call, whatever the size.
"""

from __future__ import annotations

import struct

import numpy as np

__all__ = ["RECORD", "RECORD_DTYPE", "SLOT", "TIER_CODES", "TIER_NAMES", "pack_record", "pack_slot",
           "unpack_records", "decode_locations"]

RECORD = struct.Struct("<IB3xQQQ")
RECORD_DTYPE = np.dtype(
    [("node_id", "<u4"), ("tier", "u1"), ("_pad", "V3"), ("offset", "<u8"), ("size", "<u8"), ("checksum", "<u8")]
)
assert RECORD.size == RECORD_DTYPE.itemsize == 32
SLOT = struct.Struct("<QQ")
SLOT_DTYPE = np.dtype([("offset", "<u8"), ("checksum", "<u8")])

#: Tier names <-> the Tier enum of common.proto.
TIER_CODES = {"hbm": 1, "dram": 2, "nvme": 3}
TIER_NAMES = {v: k for k, v in TIER_CODES.items()}


def pack_record(node_id: int, tier: str, offset: int, size: int, checksum: int) -> bytes:
    return RECORD.pack(node_id, TIER_CODES[tier], offset, size, checksum)


def unpack_records(data: bytes) -> np.ndarray:
    """Records as a structured numpy array (fields node_id, tier, offset, size, checksum)."""
    if len(data) % RECORD.size:
        raise ValueError(f"location records must be a multiple of {RECORD.size} bytes")
    return np.frombuffer(data, dtype=RECORD_DTYPE)


def pack_slot(offset: int, checksum: int) -> bytes:
    return SLOT.pack(offset, checksum)


def decode_locations(locations) -> np.ndarray:
    """A ``Locations`` message, either form, as records (fields as in RECORD_DTYPE)."""
    if locations.HasField("uniform"):
        if len(locations.slots) % SLOT.size:
            raise ValueError(f"location slots must be a multiple of {SLOT.size} bytes")
        slots = np.frombuffer(locations.slots, dtype=SLOT_DTYPE)
        out = np.zeros(len(slots), dtype=RECORD_DTYPE)
        u = locations.uniform
        out["node_id"], out["tier"], out["size"] = u.node_id, u.tier, u.size
        out["offset"], out["checksum"] = slots["offset"], slots["checksum"]
        return out
    return unpack_records(locations.records)
