"""The TCP data plane's wire format, shared by the client (:mod:`kvpool.transport.tcp`) and the
node's data server (:mod:`kvpool.node.data_server`).

A connection carries one request at a time, each a whole batch of blocks. All integers are
little-endian.

Request::

    header   4s magic "KVQ1" | u8 op (1 read, 2 write) | u8 tenant_len | u16 id_len
             | u32 n_records | u32 n_moves | u64 expires_unix_ms | 32s mac
    body     id (id_len bytes) | tenant (tenant_len bytes, UTF-8)
             | records (n_records x 32 bytes, kvpool.wire.RECORD)
             | moves (n_moves x u32: which records this request moves, in order)
    write:   then the bytes of each moved block, in order, then n_moves x u64 xxh3-64
             checksums of those bytes (the node verifies them before answering)

``records``, ``id``, ``tenant``, ``op``, ``expires_unix_ms`` and ``mac`` are the capability the master
issued (kvpool.capability): the node checks it before reading the bytes that follow.

Response::

    header   4s magic "KVR1" | u8 status | u8 pad | u16 msg_len | u64 payload_len
    body     message (msg_len bytes, UTF-8; empty on success) | payload

A read's payload is the moved blocks' bytes, in order; a write's is empty. A request that
fails its checks is answered with an error status and the node closes the connection, since
it cannot know where the request's remaining bytes end.
"""

from __future__ import annotations

import ssl
import struct

__all__ = ["REQUEST", "RESPONSE", "REQUEST_MAGIC", "RESPONSE_MAGIC", "Status", "MAX_RECORDS", "MAX_ID",
           "recv_exact", "recv_into_exact", "send_buffers"]

REQUEST = struct.Struct("<4sBBHIIQ32s")
RESPONSE = struct.Struct("<4sBxHQ")
REQUEST_MAGIC = b"KVQ1"
RESPONSE_MAGIC = b"KVR1"
#: Bounds a node checks before allocating anything for a request.
MAX_RECORDS = 1 << 20
MAX_ID = 256


class Status:
    OK = 0
    DENIED = 1         # the capability is wrong, expired, or does not cover a slot
    INVALID = 2        # malformed request
    DATA_LOSS = 3      # a written block does not match its checksum
    UNAVAILABLE = 4    # the node cannot serve the tier now


def recv_into_exact(sock, view: memoryview) -> None:
    """Fill ``view`` from ``sock``; ConnectionError if the peer closes first."""
    got, n = 0, len(view)
    while got < n:
        r = sock.recv_into(view[got:], n - got)
        if r == 0:
            raise ConnectionError("connection closed by peer")
        got += r


def recv_exact(sock, n: int) -> bytes:
    buf = bytearray(n)
    if n:
        recv_into_exact(sock, memoryview(buf))
    return bytes(buf)


#: Linux caps one sendmsg at IOV_MAX (1024) buffers.
_IOV_MAX = 1024


def send_buffers(sock, buffers: list) -> None:
    """``sendmsg`` every buffer with no copy in user space, resuming after partial sends."""
    views = [memoryview(b).cast("B") for b in buffers if len(memoryview(b))]
    if isinstance(sock, ssl.SSLSocket):  # TLS has no sendmsg: each buffer through the record layer
        for v in views:
            sock.sendall(v)
        return
    i = 0
    while i < len(views):
        sent = sock.sendmsg(views[i:i + _IOV_MAX])
        while sent:
            n = len(views[i])
            if sent >= n:
                sent -= n
                i += 1
            else:
                views[i] = views[i][sent:]
                sent = 0
