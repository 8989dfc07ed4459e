"""The node's TCP data server: clients on any host read and write slots here.

Wire format: :mod:`kvpool.transport.frames`. One thread accepts; each connection has its own
thread, which blocks in socket calls (they release the GIL), so the node's event loop, which
serves gRPC, never waits on a transfer.

Zero copies in user space: a read is one ``sendmsg`` of memoryviews of the slots, a write
``recv_into`` the slots themselves. With TLS (``tls``, the node's --tls-cert) every connection
is wrapped, and mutual when the node has a CA; bytes then go through the TLS record layer.

Nothing is touched before the request's capability checks out (:mod:`kvpool.capability`):
the MAC under the node's current data key, the operation, the expiry, and every moved record
names this node, a memory tier it serves and a slot inside that arena. A grant writes each of
its slots once, so its capability cannot overwrite a block after it was committed. Written blocks are
verified against the checksums that trail them; a mismatch is answered DATA_LOSS, and the
client aborts the put, so the slot is never committed.

Test hook: the environment variable ``KVPOOL_FAULT_CORRUPT_SENDS=N`` makes the next N reads
send one block with a flipped byte (from a copy: the stored block stays intact), so tests can
show that readers catch corruption on the wire.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time

import numpy as np
import xxhash

from kvpool.capability import CapabilityError, verify
from kvpool.transport.base import READ, WRITE
from kvpool.transport.frames import (MAX_ID, MAX_RECORDS, REQUEST, REQUEST_MAGIC, RESPONSE, RESPONSE_MAGIC, Status,
                                     recv_exact, recv_into_exact, send_buffers)
from kvpool.wire import RECORD_DTYPE, TIER_CODES

__all__ = ["DataServer"]

log = logging.getLogger("kvpool.node.data")



#: After refusing a request, how long and how much of the client's rest is read and dropped.
_LINGER_S = 2.0
_LINGER_BYTES = 256 << 20


class _Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class DataServer:
    """Serves the host-memory arenas of a node (tier name -> uint8 numpy array of the arena)
    on ``host:port`` (0 picks a free port; :attr:`address` says which)."""

    def __init__(self, arenas: dict[str, np.ndarray], host: str = "127.0.0.1", port: int = 0,
                 advertise_host: str | None = None, tls=None) -> None:
        self.tls = tls
        self._arenas = {TIER_CODES[name]: (name, arr) for name, arr in arenas.items()}
        self._identity: tuple[int, bytes] | None = None  # (node id, data key), set at registration
        try:
            self._sock = socket.create_server((host, port), backlog=128)
        except OSError as exc:
            raise OSError(f"cannot bind the data server to {host}:{port} ({exc.strerror or exc}); "
                          f"pick another --data-port") from None
        if host in ("0.0.0.0", "::", "") and not advertise_host:
            advertise_host = socket.gethostbyname(socket.gethostname())
        self.port = self._sock.getsockname()[1]
        self.address = f"{advertise_host or host}:{self.port}"
        self._closing = False
        self._conns: set[socket.socket] = set()
        #: Grant id -> (capability expiry, record positions written): see _claim.
        self._written: dict[str, tuple[int, set[int]]] = {}
        self._lock = threading.Lock()
        self._corrupt_sends = int(os.environ.get("KVPOOL_FAULT_CORRUPT_SENDS", "0") or 0)
        self.served = {"reads": 0, "writes": 0, "refused": 0, "corrupt_writes": 0}
        self._thread = threading.Thread(target=self._accept, name="kvpool-data-accept", daemon=True)

    def set_identity(self, node_id: int, data_key: bytes) -> None:
        """The node id and data key the master knows this node by: capabilities must match."""
        self._identity = (node_id, data_key)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        self._closing = True
        try:
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._thread.join(timeout=5)

    # ------------------------------------------------------------------ connections

    def _accept(self) -> None:
        while not self._closing:
            try:
                conn, peer = self._sock.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            with self._lock:
                self._conns.add(conn)
            threading.Thread(target=self._serve, args=(conn, peer), name="kvpool-data-conn", daemon=True).start()

    def _serve(self, conn: socket.socket, peer) -> None:
        try:
            if self.tls is not None:
                raw = conn
                raw.settimeout(_LINGER_S)  # a handshake that stalls does not hold the thread
                try:
                    conn = self.tls.wrap_socket(raw, server_side=True)
                except (OSError, ValueError) as exc:
                    log.warning("TLS handshake with %s:%s failed: %s", peer[0], peer[1], exc)
                    with self._lock:
                        self._conns.discard(raw)
                    raw.close()
                    return
                conn.settimeout(None)
                with self._lock:
                    self._conns.discard(raw)
                    self._conns.add(conn)
            while not self._closing:
                try:
                    header = recv_exact(conn, REQUEST.size)
                except ConnectionError:
                    return
                try:
                    self._handle(conn, header)
                except _Refused as exc:
                    self.served["refused"] += 1
                    log.warning("data request from %s:%s refused: %s", peer[0], peer[1], exc)
                    self._respond(conn, exc.status, str(exc))
                    self._linger(conn)
                    return  # the rest of the request cannot be framed: close
        except (ConnectionError, OSError):
            pass
        finally:
            with self._lock:
                self._conns.discard(conn)
            conn.close()

    @staticmethod
    def _linger(conn: socket.socket) -> None:
        """Close after a refusal without losing the answer: a close with unread bytes sends a
        reset, which can discard the answer before the client reads it, so say we are done
        writing and drop what the client still sends (bounded in time and bytes)."""
        try:
            conn.shutdown(socket.SHUT_WR)
            conn.settimeout(_LINGER_S)
            scratch = bytearray(1 << 20)
            drained = 0
            while drained < _LINGER_BYTES:
                n = conn.recv_into(scratch)
                if n == 0:
                    break
                drained += n
        except OSError:
            pass

    @staticmethod
    def _respond(conn: socket.socket, status: int, message: str = "", payload: list | None = None,
                 payload_len: int = 0) -> None:
        msg = message.encode()[:65535]
        send_buffers(conn, [RESPONSE.pack(RESPONSE_MAGIC, status, len(msg), payload_len), msg, *(payload or [])])

    # ------------------------------------------------------------------ requests

    def _handle(self, conn: socket.socket, header: bytes) -> None:
        magic, op, tenant_len, id_len, n_records, n_moves, expires, mac = REQUEST.unpack(header)
        if magic != REQUEST_MAGIC:
            raise _Refused(Status.INVALID, "not a kvpool data request (bad magic); is this the data port?")
        if op not in (READ, WRITE) or id_len > MAX_ID or n_records > MAX_RECORDS or n_moves > n_records:
            raise _Refused(Status.INVALID, f"malformed request header (op {op}, {n_records} records, {n_moves} moves)")
        head = id_len + tenant_len
        body = recv_exact(conn, head + 32 * n_records + 4 * n_moves)
        grant_id = body[:id_len].decode(errors="replace")
        tenant = body[id_len:head].decode(errors="replace")
        raw_records = body[head:head + 32 * n_records]
        records = np.frombuffer(raw_records, dtype=RECORD_DTYPE)
        moves = np.frombuffer(body[head + 32 * n_records:], dtype="<u4")
        views = self._authorize(op, grant_id, tenant, expires, raw_records, mac, records, moves)
        if op == WRITE:
            self._claim(grant_id, expires, moves)
        if op == READ:
            self._read(conn, views, records[moves])
        else:
            self._write(conn, views)

    def _authorize(self, op, grant_id, tenant, expires, raw_records, mac, records, moves) -> list[np.ndarray]:
        identity = self._identity
        if identity is None:
            raise _Refused(Status.UNAVAILABLE, "this node is not registered with a master yet; retry shortly")
        node_id, key = identity
        try:
            verify(key, op, grant_id, node_id, expires, raw_records, mac, tenant=tenant)
        except CapabilityError as exc:
            raise _Refused(Status.DENIED, f"{exc} (tenant {tenant!r})" if tenant else str(exc)) from None
        if len(moves) and int(moves.max()) >= len(records):
            raise _Refused(Status.INVALID, "a move names a record outside the capability")
        moved = records[moves]
        wrong = moved["node_id"] != node_id
        if wrong.any():
            other = int(moved["node_id"][wrong.argmax()])
            raise _Refused(Status.DENIED, f"slot belongs to node {other}, not this node ({node_id})")
        offsets, sizes = moved["offset"].tolist(), moved["size"].tolist()
        views = []
        for code, off, size in zip(moved["tier"].tolist(), offsets, sizes):
            tier = self._arenas.get(code)
            if tier is None:
                raise _Refused(Status.UNAVAILABLE, f"tier code {code} is not served over TCP by this node "
                                                   f"(host-memory tiers only)")
            name, arena = tier
            if size == 0 or off + size > arena.size:
                raise _Refused(Status.DENIED, f"slot {off}+{size} lies outside the {name} arena")
            views.append(arena[off:off + size])
        return views

    def _claim(self, grant_id: str, expires: int, moves: np.ndarray) -> None:
        """A grant writes each of its slots once. Its capability stays valid until it expires,
        past the commit, so without this a client could overwrite a block others already read."""
        now_ms = int(time.time() * 1000)
        with self._lock:
            if len(self._written) > 4096:  # forget grants whose capability can no longer be used
                self._written = {g: v for g, v in self._written.items() if v[0] > now_ms}
            done = self._written.setdefault(grant_id, (expires, set()))[1]
            again = done.intersection(moves.tolist())
            if again:
                raise _Refused(Status.DENIED, f"{len(again)} slots of grant {grant_id} were written already; "
                                              f"a grant writes each slot once (PutStart again to rewrite)")
            done.update(moves.tolist())

    def _read(self, conn: socket.socket, views: list[np.ndarray], records: np.ndarray) -> None:
        total = sum(v.size for v in views)
        if self._corrupt_sends > 0 and views:
            self._corrupt_sends -= 1
            bad = views[0].copy()
            bad[len(bad) // 2] ^= 0xFF
            views = [bad, *views[1:]]
            log.warning("test hook KVPOOL_FAULT_CORRUPT_SENDS: corrupting one block of this read on the wire")
        self._respond(conn, Status.OK, payload=views, payload_len=total)
        self.served["reads"] += len(views)

    def _write(self, conn: socket.socket, views: list[np.ndarray]) -> None:
        digest = xxhash.xxh3_64_intdigest
        got = []
        for view in views:
            recv_into_exact(conn, memoryview(view))
            got.append(digest(view))  # now, while the block is in cache
        sums = np.frombuffer(recv_exact(conn, 8 * len(views)), dtype="<u8")
        bad = [i for i, (g, s) in enumerate(zip(got, sums)) if g != int(s)]
        if bad:
            self.served["corrupt_writes"] += len(bad)
            # The request was read in full, so the connection stays usable.
            self._respond(conn, Status.DATA_LOSS, f"{len(bad)} written blocks do not match their checksums "
                                                  f"(first: move {bad[0]}); they were damaged in transit")
            return
        self._respond(conn, Status.OK)
        self.served["writes"] += len(views)
