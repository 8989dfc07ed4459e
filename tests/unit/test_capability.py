"""Capabilities: an HMAC over exactly what the master allowed, checked with the node's key."""

from __future__ import annotations

import pytest

from kvpool.capability import CapabilityError, expiry_ms, new_data_key, sign, verify
from kvpool.transport.base import READ, WRITE
from kvpool.wire import pack_record

KEY = new_data_key()
RECORDS = pack_record(7, "dram", 0, 65536, 1) + pack_record(7, "dram", 65536, 65536, 2)
NOW = 1_800_000_000.0


def test_a_signed_capability_verifies_until_it_expires():
    exp = expiry_ms(30, now=NOW)
    mac = sign(KEY, READ, "lease-1", 7, exp, RECORDS)
    verify(KEY, READ, "lease-1", 7, exp, RECORDS, mac, now=NOW + 29.9)
    with pytest.raises(CapabilityError, match="expired"):
        verify(KEY, READ, "lease-1", 7, exp, RECORDS, mac, now=NOW + 30)


@pytest.mark.parametrize("change", ["key", "op", "id", "node", "expiry", "slot", "mac", "tenant"])
def test_any_change_breaks_it(change):
    exp = expiry_ms(30, now=NOW)
    mac = sign(KEY, READ, "lease-1", 7, exp, RECORDS, tenant="alice")
    args = dict(key=KEY, op=READ, grant_id="lease-1", node_id=7, expires_unix_ms=exp, records=RECORDS, mac=mac,
                tenant="alice")
    verify(now=NOW, **args)  # unchanged, it holds
    args.update({
        "key": {"key": new_data_key()}, "op": {"op": WRITE}, "id": {"grant_id": "lease-2"},
        "node": {"node_id": 8}, "expiry": {"expires_unix_ms": exp + 60_000},
        "slot": {"records": RECORDS[:32] + pack_record(7, "dram", 131072, 65536, 2)},
        "mac": {"mac": bytes(32)}, "tenant": {"tenant": "bob"},
    }[change])
    with pytest.raises(CapabilityError, match="does not match"):
        verify(now=NOW, **args)
