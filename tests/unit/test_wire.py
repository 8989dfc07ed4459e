"""Both forms of a Locations message decode to the same records."""

from __future__ import annotations

import pytest

from kvpool.rpc.v1 import common_pb2
from kvpool.wire import TIER_CODES, decode_locations, pack_record, pack_slot, unpack_records


def test_uniform_and_general_forms_agree():
    blocks = [(1, "dram", 4096 * i, 4096, 0xABCDEF00 + i) for i in range(5)]
    general = common_pb2.Locations(records=b"".join(pack_record(*b) for b in blocks))
    compact = common_pb2.Locations(uniform=common_pb2.UniformLocation(node_id=1, tier=TIER_CODES["dram"], size=4096),
                                   slots=b"".join(pack_slot(b[2], b[4]) for b in blocks))
    a, b = decode_locations(general), decode_locations(compact)
    assert a.tobytes() == b.tobytes()
    assert list(a["offset"]) == [4096 * i for i in range(5)]
    assert list(b["checksum"]) == [0xABCDEF00 + i for i in range(5)]
    assert len(compact.SerializeToString()) < len(general.SerializeToString()) * 0.6


def test_truncated_tables_are_rejected():
    with pytest.raises(ValueError):
        unpack_records(b"x" * 31)
    with pytest.raises(ValueError):
        decode_locations(common_pb2.Locations(uniform=common_pb2.UniformLocation(size=1), slots=b"x" * 15))
