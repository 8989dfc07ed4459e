"""Data-plane capabilities: the master authorizes, the node enforces (docs/design.md §3b).

Each node incarnation has a 32-byte data key, made by the node at start and handed to the
master when it registers (node.proto ``data_key``). For every grant (write) and read lease
the master signs, per node involved::

    mac = HMAC-SHA256(key, b"kvpool-cap/v2" | u8 op | u16 len(id) | id | u32 node_id
                           | u64 expires_unix_ms | u8 len(tenant) | tenant | records)

where ``tenant`` is the tenant whose blocks these are (UTF-8, at most 255 bytes; "" the
default tenant) and ``records`` are that node's 32-byte location records (kvpool.wire.RECORD) of the grant
or lease, in order. A client sends the capability and those records with each data-plane
request, and names which of them to move. The node's data server recomputes the MAC, checks
the operation and the expiry, and checks every record against its own arenas before it
touches a slot. So anyone who can reach the data port still reads and writes only what the
master allowed, and only until the expiry.

Expiry is wall-clock time (``time.time``), since master and node are different machines;
keep their clocks in sync (NTP) to within a small fraction of the lease TTL.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import struct
import time

__all__ = ["new_data_key", "sign", "verify", "expiry_ms", "CapabilityError", "KEY_BYTES", "MAC_BYTES"]

KEY_BYTES = 32
MAC_BYTES = 32
_DOMAIN = b"kvpool-cap/v2"


class CapabilityError(Exception):
    """A data-plane request that the master did not allow (or no longer allows)."""


def new_data_key() -> bytes:
    return secrets.token_bytes(KEY_BYTES)


def expiry_ms(ttl_s: float, now: float | None = None) -> int:
    """Wall-clock expiry, in Unix milliseconds, ``ttl_s`` from now."""
    return int(((time.time() if now is None else now) + ttl_s) * 1000)


def sign(key: bytes, op: int, grant_id: str, node_id: int, expires_unix_ms: int, records: bytes,
         tenant: str = "") -> bytes:
    gid, who = grant_id.encode(), tenant.encode()
    mac = hmac.new(key, _DOMAIN, hashlib.sha256)
    mac.update(struct.pack("<BH", op, len(gid)) + gid + struct.pack("<IQB", node_id, expires_unix_ms, len(who)) + who)
    mac.update(records)
    return mac.digest()


def verify(key: bytes, op: int, grant_id: str, node_id: int, expires_unix_ms: int, records: bytes,
           mac: bytes, now: float | None = None, tenant: str = "") -> None:
    """Raise :class:`CapabilityError` unless ``mac`` is the master's (for ``tenant``), and not expired."""
    if not hmac.compare_digest(sign(key, op, grant_id, node_id, expires_unix_ms, records, tenant), mac):
        raise CapabilityError("capability does not match: it was not issued by this node's master for "
                              "these slots, or it was altered")
    now_ms = int((time.time() if now is None else now) * 1000)
    if now_ms >= expires_unix_ms:
        raise CapabilityError(f"capability expired {(now_ms - expires_unix_ms) / 1000:.1f}s ago; "
                              f"take a new lease or grant from the master")
