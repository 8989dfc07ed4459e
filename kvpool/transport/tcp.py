"""TCP data plane, client side: read and write slots through a node's data server.

Wire format: :mod:`kvpool.transport.frames`. A transport keeps a few persistent
connections to its node (one per concurrent share, :attr:`TransportOptions.connections`),
and sends one framed request per share, however many blocks it holds. Bytes are never
copied in user space: writes ``sendmsg`` memoryviews of the caller's buffers, reads
``recv_into`` them.

Integrity: a write sends each block's xxh3-64 after the bytes, and the node verifies them
before answering; a read verifies each block it received against the checksum in its
location record. Any mismatch raises :class:`~kvpool.errors.IntegrityError` (with the
positions of the bad blocks), so wrong bytes are never handed back as good ones.

Failure: connecting is bounded by ``connect_timeout`` and any stall by ``io_timeout``; both,
and a connection the node drops, raise :class:`~kvpool.errors.Unavailable` naming the node.
A connection that failed is closed, never reused.
"""

from __future__ import annotations

import queue
import socket
import threading
from typing import Sequence

import numpy as np
import xxhash

from kvpool.errors import FailedPrecondition, IntegrityError, InvalidArgument, KvpoolError, Unavailable
from kvpool.transport.base import READ, WRITE, BlockIntegrityError, Share, Transport, TransportCaps, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.transport.frames import (REQUEST, REQUEST_MAGIC, RESPONSE, RESPONSE_MAGIC, Status, recv_exact,
                                     recv_into_exact, send_buffers)

__all__ = ["TcpTransport"]



def _error_for(status: int, message: str, node: str) -> KvpoolError:
    text = f"node {node}: {message}"
    if status == Status.DENIED:
        return FailedPrecondition(f"{text} (data plane refused the capability)")
    if status == Status.DATA_LOSS:
        return IntegrityError(text)
    if status == Status.INVALID:
        return InvalidArgument(text)
    return Unavailable(text)


class TcpTransport(Transport):
    kind = "tcp"
    caps = TransportCaps.NETWORK | TransportCaps.ZERO_COPY

    def __init__(self, endpoint: NodeEndpoint, options: TransportOptions) -> None:
        host, _, port = endpoint.tcp_address.rpartition(":")
        self._addr = (host.strip("[]"), int(port))
        self._options = options
        self._label = f"{endpoint.name!r} (id {endpoint.node_id}) at {endpoint.tcp_address}"
        self._tls = endpoint.tcp_tls
        self._idle: queue.LifoQueue[socket.socket] = queue.LifoQueue()
        self._all: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._closed = False

    @classmethod
    def reachable(cls, endpoint: NodeEndpoint, tier: str) -> bool:
        return bool(endpoint.tcp_address)

    @classmethod
    def open(cls, endpoint: NodeEndpoint, tier: str, options: TransportOptions) -> "TcpTransport":
        t = cls(endpoint, options)
        t._release(t._connect())  # fail now, not at the first transfer, if the node is unreachable
        return t

    # ------------------------------------------------------------------ connections

    def _connect(self) -> socket.socket:
        try:
            sock = socket.create_connection(self._addr, timeout=self._options.connect_timeout)
        except OSError as exc:
            raise Unavailable(f"cannot connect to the data server of node {self._label} within "
                              f"{self._options.connect_timeout:g}s: {exc}") from None
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(self._options.io_timeout)
        if self._tls:
            if self._options.tls is None:
                sock.close()
                raise FailedPrecondition(f"node {self._label} serves its data port over TLS only; give the client "
                                         f"the CA that signed it (tls_ca, or KVPOOL_TLS_CA; a node copying from it: --tls-ca)")
            try:
                sock = self._options.tls.wrap_socket(sock, server_hostname=self._addr[0])
            except (OSError, ValueError) as exc:
                sock.close()
                raise Unavailable(f"TLS handshake with the data server of node {self._label} failed: {exc}") from None
        with self._lock:
            self._all.add(sock)
        return sock

    def _acquire(self) -> socket.socket:
        try:
            return self._idle.get_nowait()
        except queue.Empty:
            return self._connect()

    def _release(self, sock: socket.socket) -> None:
        if self._closed:
            self._discard(sock)
        else:
            self._idle.put(sock)

    def _discard(self, sock: socket.socket) -> None:
        with self._lock:
            self._all.discard(sock)
        sock.close()

    def _exchange(self, op: int, share: Share, payload_out, sources=None) -> list[int]:
        """Run one request on a pooled connection; on any failure the connection is dropped.

        A read returns the positions of blocks that failed their checksum."""
        bad: list[int] = []
        access = share.access
        if access is None:
            raise FailedPrecondition(f"node {self._label}: no capability for this transfer; the master "
                                     f"issues one with each grant and lease (is it older than this client?)")
        gid, who = access.grant_id.encode(), access.tenant.encode()
        moves = np.ascontiguousarray(share.positions, dtype="<u4")
        header = REQUEST.pack(REQUEST_MAGIC, op, len(who), len(gid), len(access.records) // 32, len(moves),
                              access.expires_unix_ms, access.mac)
        sock = self._acquire()
        try:
            try:
                send_buffers(sock, [header, gid, who, access.records, moves])
                if op == WRITE:
                    # Hash each block just before it is sent, while it is in cache; the sums trail.
                    digest = xxhash.xxh3_64_intdigest
                    for src in sources:
                        payload_out.append(digest(src))
                        send_buffers(sock, [src])
                    send_buffers(sock, [np.array(payload_out, dtype="<u8")])
            except (BrokenPipeError, ConnectionResetError):
                pass  # the node may have refused the request mid-send: its answer says why
            magic, status, msg_len, payload_len = RESPONSE.unpack(recv_exact(sock, RESPONSE.size))
            if magic != RESPONSE_MAGIC:
                raise ConnectionError("the peer is not a kvpool data server (bad response magic)")
            message = recv_exact(sock, msg_len).decode(errors="replace")
            if status != Status.OK:
                self._discard(sock) if status != Status.DATA_LOSS else self._release(sock)
                raise _error_for(status, message, self._label)
            if op == READ:
                expected = sum(len(o) for o in payload_out)
                if payload_len != expected:
                    raise ConnectionError(f"node sent {payload_len} bytes for {expected} requested")
                digest = xxhash.xxh3_64_intdigest
                for i, (out, rec) in enumerate(zip(payload_out, share.records)):
                    recv_into_exact(sock, memoryview(out))
                    if digest(out) != int(rec["checksum"]):  # now, while the block is in cache
                        bad.append(i)
        except KvpoolError:
            raise
        except (OSError, ConnectionError) as exc:
            self._discard(sock)
            what = "timed out" if isinstance(exc, socket.timeout) else f"failed ({exc})"
            raise Unavailable(f"transfer with node {self._label} {what}; the node may be down") from None
        except BaseException:
            self._discard(sock)
            raise
        self._release(sock)
        return bad

    # ------------------------------------------------------------------ Transport

    def write(self, share: Share, sources: Sequence) -> list[int]:
        """Send the blocks with their checksums; returns the checksums (the client commits them)."""
        if any(not isinstance(s, np.ndarray) for s in sources):
            raise InvalidArgument("the TCP data plane moves host memory; copy CUDA tensors to the host first")
        sums: list[int] = []
        self._exchange(WRITE, share, sums, sources)
        return sums

    def read(self, share: Share, outs: Sequence) -> None:
        if any(not isinstance(o, np.ndarray) for o in outs):
            raise InvalidArgument("the TCP data plane moves host memory; read into host buffers")
        bad = self._exchange(READ, share, outs)
        if bad:
            raise BlockIntegrityError(
                f"{len(bad)} of {len(outs)} blocks read from node {self._label} failed their xxh3-64 checksum "
                f"(damaged in transit or on the node); they were dropped from the pool", bad)

    def close(self) -> None:
        self._closed = True
        with self._lock:
            socks = list(self._all)
            self._all.clear()
        for s in socks:
            try:
                s.close()
            except OSError:
                pass
