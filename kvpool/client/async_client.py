"""AsyncClient: the one real client. ``kvpool.client.Client`` is a blocking facade over it.

Publish (``put_blocks``, ``publish``) follows the two-phase protocol of docs/design.md §3:

1. ``PutStart(keys, sizes)``: the master answers each key PRESENT (skip), IN_FLIGHT
   (another writer has it: skip) or GRANTED with a slot on a node;
2. the client copies each granted block straight into its slot over the data plane and,
   at the same time on another thread, computes its xxh3-64 checksum;
3. ``PutCommit(checksums)`` makes the blocks visible. If anything fails before the
   commit, the client sends ``PutAbort`` so the slots are freed at once.

Read (``get_blocks``, ``fetch``): ``Lookup``/``Get`` leases the blocks (they cannot be
evicted or freed), the client copies them out, then releases the lease in the background.

Every call is batched: one RPC per batch, whatever its length. gRPC statuses surface as
:mod:`kvpool.errors` exceptions.
"""

from __future__ import annotations

import asyncio
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Sequence

import grpc
import numpy as np
import xxhash

from kvpool.auth import bearer_metadata, resolve_token
from kvpool.client.buffers import block_views, byte_view, is_device
from kvpool.client.shares import Planned, plan
from kvpool.errors import (BlockNotFound, InvalidArgument, KvpoolError, LeaseExpired, NotFound, Unavailable,
                           from_status)
from kvpool.identity import Namespace, pack_keys
from kvpool.masters import FAILOVER_S, MasterList, follows
from kvpool.rpc.v1 import common_pb2, pool_pb2, pool_pb2_grpc
from kvpool.tls import TlsFiles, client_context, open_aio_channel
from kvpool.transport.base import (READ, WRITE, BlockIntegrityError, Share, Transport, TransportCaps, TransportFactory,
                                   TransportOptions)
from kvpool.transport.cuda_ipc import CudaIpcTransport
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.transport.shm import ShmTransport, host_id
from kvpool.transport.tcp import TcpTransport
from kvpool.transport.ucx import UcxTransport

__all__ = ["AsyncClient", "PutResult", "DEFAULT_ADDRESS"]

DEFAULT_ADDRESS = "127.0.0.1:50051"
_GRPC_OPTIONS = [("grpc.max_receive_message_length", 64 * 2**20), ("grpc.max_send_message_length", 64 * 2**20),
                 # Retry a refused connection soon: a master that is starting answers within ~100 ms.
                 ("grpc.initial_reconnect_backoff_ms", 100), ("grpc.min_reconnect_backoff_ms", 100),
                 ("grpc.max_reconnect_backoff_ms", 1000)]
#: Data-plane transports this client speaks; the factory ranks them by capability.
TRANSPORTS: tuple[type[Transport], ...] = (CudaIpcTransport, ShmTransport, UcxTransport, TcpTransport)


@dataclass(frozen=True)
class PutResult:
    written: int    # blocks this call wrote and committed
    present: int    # blocks already in the pool (deduplicated)
    in_flight: int  # blocks another writer was writing at the time


#: Transfers of at most this many bytes may run on the event loop's thread (see _inline).
_INLINE_BYTES = 256 << 10
#: How long a finished lease waits to ride on the next Lookup or Get before it is released
#: on its own (it is pinned meanwhile, so keep this short).
_RELEASE_DELAY_S = 0.02

#: Blocks are copied and then hashed in groups of about this many bytes, so the hash
#: reads them from cache rather than from memory a second time.
_HASH_GROUP_BYTES = 4 << 20


def _host_bytes(transport: Transport, record, src) -> np.ndarray:
    """Host memory holding a block's bytes, to checksum: the source, the slot, or a copy."""
    if not is_device(src):
        return src
    slot = transport.host_view(record)
    return slot if slot is not None else src.cpu().numpy()  # HBM to HBM: one staging copy


def _copy_and_hash(transport: Transport, share, sources: Sequence) -> list[int]:
    """Copy sources into their slots and return their xxh3-64 checksums (one thread's share).

    A network transport hashes each block as it sends it and returns the sums. Otherwise the
    blocks are copied and then hashed in groups small enough to be read again from cache.
    """
    records = share.records
    digest = xxhash.xxh3_64_intdigest
    if TransportCaps.NETWORK in transport.caps:  # one request for the share, however large
        sums = transport.write(share, sources)
        return sums if sums is not None else [digest(_host_bytes(transport, r, s)) for r, s in zip(records, sources)]
    sums: list[int] = []
    start = 0
    while start < len(sources):
        end, size = start, 0
        while end < len(sources) and (size == 0 or size + records[end]["size"] <= _HASH_GROUP_BYTES):
            size += int(records[end]["size"])
            end += 1
        part = Share(records[start:end], share.positions[start:end], share.access)
        transport.write(part, sources[start:end])
        sums.extend(digest(_host_bytes(transport, records[i], sources[i])) for i in range(start, end))
        start = end
    return sums


def namespace_to_proto(ns: Namespace) -> common_pb2.Namespace:
    lay = ns.layout
    return common_pb2.Namespace(
        model=ns.model, tp_rank=ns.tp_rank, tp_size=ns.tp_size, tenant=ns.tenant, lora=ns.lora, salt=ns.salt,
        layout=common_pb2.KVLayout(num_layers=lay.num_layers, num_kv_heads=lay.num_kv_heads,
                                   head_dim=lay.head_dim, dtype=lay.dtype, block_tokens=lay.block_tokens,
                                   kv_kind=lay.kv_kind),
    )


class AsyncClient:
    """Client of a kvpool master and its nodes.

    ``namespace`` is the default for every call; pass ``namespace=`` to a call to override.
    Use as ``async with AsyncClient(addr, ns) as c:`` or call :meth:`close`.

    The data plane to each node is chosen by capability (shared memory on the node's host,
    one-sided UCX where the fabric makes it one-sided, else TCP); ``transport="tcp"`` (or
    ``KVPOOL_TRANSPORT``) forces one. ``connect_timeout`` and ``io_timeout`` bound how long a
    transfer waits on a node that stopped answering before it fails, naming the node.

    ``token`` (or ``token_file``, or ``KVPOOL_TOKEN`` / ``KVPOOL_TOKEN_FILE``) is the bearer
    token for a master that requires one (``--auth-tokens``); a client token acts for one
    tenant, so its namespaces must name that tenant. ``tls_ca`` (or ``KVPOOL_TLS_CA``) turns
    on TLS to the master and to nodes whose data port is TLS; ``tls_cert`` and ``tls_key``
    (``KVPOOL_TLS_CERT``, ``KVPOOL_TLS_KEY``) are this client's certificate for mutual TLS.

    The first call waits up to ``startup_wait`` seconds (``KVPOOL_STARTUP_WAIT``) for a master
    that is still starting (0: no waiting); after that, an unreachable master fails the call with
    :class:`~kvpool.errors.Unavailable` naming the address.

    ``replicas`` sets how many copies (on nodes of different hosts) the pool keeps of each
    block of ``namespace`` (see :meth:`register`); None leaves the namespace's setting.
    """

    def __init__(self, address: str = DEFAULT_ADDRESS, namespace: Namespace | None = None, *,
                 timeout: float = 30.0, copy_threads: int = 2, transport: str | None = None,
                 connect_timeout: float = 3.0, io_timeout: float = 10.0, startup_wait: float | None = None,
                 token: str | None = None, token_file: str | None = None, tls_ca: str | None = None,
                 tls_cert: str | None = None, tls_key: str | None = None, replicas: int | None = None) -> None:
        self.address = address
        #: One master, or several that share a Redis (``"a:50051,b:50051"``): calls go to the leader.
        self._masters = MasterList(address)
        self.startup_wait = float(os.environ.get("KVPOOL_STARTUP_WAIT", "5")) if startup_wait is None else startup_wait
        self._reached = False
        self._metadata = bearer_metadata(resolve_token(token, token_file))
        env = os.environ
        self._tls = TlsFiles(tls_cert or env.get("KVPOOL_TLS_CERT", ""), tls_key or env.get("KVPOOL_TLS_KEY", ""),
                             tls_ca or env.get("KVPOOL_TLS_CA", ""))
        if not self._tls.ca:
            self._tls = None
        self.namespace = namespace
        self.timeout = timeout
        self._channel: grpc.aio.Channel | None = None
        self._stub: pool_pb2_grpc.KVPoolStub | None = None
        self._registered: set[str] = set()
        #: Namespace id -> the replicas setting this client asked for: sent again whenever it
        #: registers the namespace again (a restarted master has forgotten it).
        self._replicas: dict[str, int] = {namespace.id: replicas} if namespace is not None and replicas else {}
        force = transport or os.environ.get("KVPOOL_TRANSPORT") or None
        self.transports = TransportFactory(
            TRANSPORTS, force=force,
            options=TransportOptions(connect_timeout=connect_timeout, io_timeout=io_timeout,
                                     connections=copy_threads,
                                     tls=client_context(self._tls) if self._tls is not None else None))
        self._endpoints: dict[int, NodeEndpoint] = {}
        self._host = host_id()
        self._threads = copy_threads
        self._pool = ThreadPoolExecutor(max_workers=copy_threads, thread_name_prefix="kvpool-copy")
        self._background: set[asyncio.Task] = set()
        self._done_leases: list[str] = []
        self._release_task: asyncio.Task | None = None
        #: Set by :class:`kvpool.Client`, whose event loop runs nothing but this client.
        self._private_loop = False
        #: Lease deadlines are measured on this clock, from before the RPC that took the lease.
        self._clock = time.monotonic

    # ------------------------------------------------------------------ plumbing

    async def __aenter__(self) -> "AsyncClient":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def connect(self) -> None:
        """Open the channel and register the default namespace (optional: calls do it lazily)."""
        self._ensure_channel()
        if self.namespace is not None:
            await self.register(self.namespace)

    def _ensure_channel(self) -> pool_pb2_grpc.KVPoolStub:
        if self._stub is None:
            self._channel = open_aio_channel(self._masters.current, self._tls, options=_GRPC_OPTIONS)
            self._stub = pool_pb2_grpc.KVPoolStub(self._channel)
        return self._stub

    def _follow_leader(self, exc, address: str) -> None:
        """Point the channel at the master a call to ``address`` that failed suggests
        (kvpool.masters), unless a concurrent call moved it already."""
        if self._masters.current != address:
            return
        self._masters.failed(exc)
        channel, self._channel, self._stub = self._channel, None, None
        if channel is not None:  # calls still running on it finish first (they may be fine)
            task = asyncio.get_running_loop().create_task(channel.close(grace=self.timeout))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._done_leases and self._stub is not None:
            await self._release(self._take_done_leases())
        self.transports.close()
        if self._channel is not None:
            await self._channel.close()
            self._channel = self._stub = None
        self._pool.shutdown(wait=True)

    async def _wait_for_master(self) -> None:
        """Before the first call: give a master that is starting ``startup_wait`` seconds."""
        try:
            await asyncio.wait_for(self._channel.channel_ready(), self.startup_wait)
        except asyncio.TimeoutError:
            raise Unavailable(
                f"cannot reach the kvpool master at {self.address} (waited {self.startup_wait:g}s for it to "
                f"start); is `kvpool serve` or `kvpool master` running there? Check the address, or wait "
                f"longer with startup_wait= (KVPOOL_STARTUP_WAIT)") from None
        self._reached = True

    async def _call(self, name: str, request):
        deadline = None
        while True:
            stub = self._ensure_channel()
            address = self._masters.current
            if not self._reached and self.startup_wait > 0 and not self._masters.several:
                await self._wait_for_master()
            try:
                return await getattr(stub, name)(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.aio.AioRpcError as exc:
                # Several masters: follow their leader through a takeover (a lease TTL or so).
                if self._masters.several and follows(exc):
                    now = asyncio.get_running_loop().time()
                    deadline = deadline or now + FAILOVER_S
                    if now < deadline:
                        self._follow_leader(exc, address)
                        await asyncio.sleep(0.05)
                        continue
                details = exc.details()
                if exc.code() == grpc.StatusCode.UNAVAILABLE and address not in (details or ""):
                    details = f"master {address}: {details}"
                raise from_status(exc.code(), details) from None

    async def _call_ns(self, ns: Namespace, name: str, request):
        """Call with the namespace registered; re-register once if the master forgot it (restart)."""
        if ns.id not in self._registered:
            await self.register(ns)
        try:
            return await self._call(name, request)
        except NotFound as exc:
            if "not registered" not in str(exc):
                raise
            self._registered.discard(ns.id)
            await self.register(ns)
            return await self._call(name, request)

    def _ns(self, namespace: Namespace | None) -> Namespace:
        ns = namespace or self.namespace
        if ns is None:
            raise InvalidArgument("no namespace: pass namespace= here or to the client's constructor")
        return ns

    def _plan(self, locations: common_pb2.Locations, op: int, grant_id: str) -> list[Planned]:
        return plan(locations, self.transports, op, grant_id, self._threads, self._endpoints)

    async def _run_shares(self, planned: list[Planned], fn, buffers: list) -> list:
        """Run ``fn(transport, share, buffers of its blocks)`` for every share on the copy
        threads. A node that fails mid-transfer has its transports dropped (reconnect later)."""
        if self._inline(planned):
            p = planned[0]
            try:
                results = [fn(p.transport, p.share, [buffers[i] for i in p.index])]
            except Exception as exc:
                results = [exc]
        else:
            loop = asyncio.get_running_loop()
            results = await asyncio.gather(*(
                loop.run_in_executor(self._pool, fn, p.transport, p.share, [buffers[i] for i in p.index])
                for p in planned), return_exceptions=True)
        failed = [(p, r) for p, r in zip(planned, results) if isinstance(r, BaseException)]
        for p, r in failed:
            if isinstance(r, Unavailable):
                self.transports.drop_node(p.node.node_id)
                r.node_ids = [p.node.node_id]
        corrupt = [(p, r) for p, r in failed if isinstance(r, BlockIntegrityError)]
        if corrupt:  # name every damaged block of the batch, by its position in the batch
            err = corrupt[0][1]
            err.batch_index = [p.index[i] for p, r in corrupt for i in r.positions]
            raise err
        if failed:
            raise failed[0][1]
        return results

    def _inline(self, planned: list[Planned]) -> bool:
        """Whether to run a transfer on the loop's own thread: a small one costs less than a
        hop to a copy thread and back. A network transfer may stall until ``io_timeout``, so
        it runs inline only where the loop serves this client alone (the blocking facade)."""
        if len(planned) != 1 or int(planned[0].share.records["size"].sum()) > _INLINE_BYTES:
            return False
        return self._private_loop or TransportCaps.NETWORK not in planned[0].transport.caps

    def _release_later(self, lease_id: str) -> None:
        """End a lease off the caller's path: it rides on this client's next Lookup or Get,
        or, if none comes within ``_RELEASE_DELAY_S``, goes in one Release with any others."""
        if not lease_id:
            return
        self._done_leases.append(lease_id)
        if self._release_task is None or self._release_task.done():
            self._release_task = asyncio.ensure_future(self._release_soon())
            self._background.add(self._release_task)
            self._release_task.add_done_callback(self._background.discard)

    def _take_done_leases(self) -> list[str]:
        ids, self._done_leases = self._done_leases, []
        return ids

    async def _release_soon(self) -> None:
        await asyncio.sleep(_RELEASE_DELAY_S)
        ids = self._take_done_leases()
        if ids:
            await self._release(ids)

    async def _release(self, lease_ids: list[str]) -> None:
        try:
            await self._call("Release", pool_pb2.ReleaseRequest(lease_ids=lease_ids))
        except KvpoolError:
            pass  # the lease expires by itself; nothing is lost

    # ------------------------------------------------------------------ namespaces

    async def register(self, namespace: Namespace | None = None, *, replicas: int | None = None) -> str:
        """Register a namespace with the master; returns its id. Idempotent.

        ``replicas`` (1 to 8) is a setting of the namespace, not part of its identity: the pool
        keeps that many copies of each of its committed blocks, on nodes of different hosts,
        whatever the pool default (``kvpool master --replicas``). None keeps the setting.
        """
        ns = self._ns(namespace)
        if replicas is not None:
            if not 1 <= replicas <= 8:
                raise InvalidArgument(f"replicas={replicas}: keep between 1 and 8 copies of each block")
            self._replicas[ns.id] = replicas
        req = pool_pb2.RegisterNamespaceRequest(namespace=namespace_to_proto(ns), replicas=self._replicas.get(ns.id, 0))
        resp = await self._call("RegisterNamespace", req)
        if resp.namespace_id != ns.id:
            raise KvpoolError(f"master computed namespace id {resp.namespace_id}, client {ns.id}: identity drift")
        self._registered.add(ns.id)
        return ns.id

    async def register_buffers(self, buffers) -> None:
        """Register buffers you will put from or get into again and again (a paged KV cache,
        a staging area) with the data plane: transports that need it (RDMA) pin and register
        them once instead of per transfer. Optional; a list of blocks or one buffer."""
        views = buffers if isinstance(buffers, (list, tuple)) else [buffers]
        self.transports.register([byte_view(b, writable=False) for b in views])

    # ------------------------------------------------------------------ block level

    async def put_blocks(self, keys: Sequence[bytes], blocks, *, namespace: Namespace | None = None,
                         first_position: int | None = None, tier: str | None = None) -> PutResult:
        """Publish blocks under ``keys``: a list of buffers or one contiguous buffer of them.

        Blocks may be host memory or CUDA tensors. ``tier`` asks for "hbm" or "dram"; by
        default CUDA blocks go to the node's HBM tier when it has one, others to DRAM.
        """
        ns = self._ns(namespace)
        if not keys:
            return PutResult(0, 0, 0)
        size = ns.layout.block_bytes
        views = block_views(blocks, len(keys), size, allow_device=True)
        if tier is None:
            tier = "hbm" if any(is_device(v) for v in views) else ""
        req = pool_pb2.PutStartRequest(namespace_id=ns.id, keys=pack_keys(keys), sizes=[size] * len(keys),
                                       tier=tier, client_host=self._host)
        if first_position is not None:
            req.first_position = first_position
        try:
            return await self._put_once(ns, keys, views, req)
        except Unavailable as exc:
            # A node died under this put, or this writer cannot reach it: once more, placed
            # elsewhere (the master skips the nodes named here, and forgets dead ones).
            req.exclude_nodes.extend(getattr(exc, "node_ids", ()))
            return await self._put_once(ns, keys, views, req)

    async def _put_once(self, ns: Namespace, keys: Sequence[bytes], views: list, req) -> PutResult:
        resp = await self._call_ns(ns, "PutStart", req)
        status = resp.status
        granted = [i for i, s in enumerate(status) if s == pool_pb2.PUT_GRANTED]
        present = sum(1 for s in status if s == pool_pb2.PUT_PRESENT)
        in_flight = len(keys) - len(granted) - present
        if not granted:
            return PutResult(0, present, in_flight)
        sources = [views[i] for i in granted]
        checksums = [0] * len(granted)
        try:
            # Each share is copied and hashed on its own thread (numpy copies, socket calls
            # and xxhash release the GIL), so both cores work on a batch.
            planned = self._plan(resp.grants, WRITE, resp.put_id)
            results = await self._run_shares(planned, _copy_and_hash, sources)
            for p, sums in zip(planned, results):
                for i, c in zip(p.index, sums):
                    checksums[i] = c
        except BaseException:
            try:
                await self._call("PutAbort", pool_pb2.PutAbortRequest(put_id=resp.put_id))
            except KvpoolError:
                pass  # the grant expires by itself
            raise
        await self._call("PutCommit", pool_pb2.PutCommitRequest(put_id=resp.put_id, checksums=checksums))
        return PutResult(len(granted), present, in_flight)

    async def get_blocks(self, keys: Sequence[bytes], out=None, *, namespace: Namespace | None = None,
                         allow_missing: bool = False) -> list:
        """Read blocks. ``out``: buffers to fill (a list, or one contiguous buffer; host memory
        or CUDA tensors); else new numpy arrays.

        Raises :class:`BlockNotFound` if any key is absent, unless ``allow_missing``, in which
        case absent blocks come back as None (and their ``out`` buffers are left untouched).
        """
        ns = self._ns(namespace)
        if not keys:
            return []
        size = ns.layout.block_bytes
        dests = block_views(out, len(keys), size, writable=True, allow_device=True) if out is not None else None
        asked = self._clock()
        resp = await self._call_ns(ns, "Get", pool_pb2.GetRequest(namespace_id=ns.id, keys=pack_keys(keys),
                                                                  release_lease_ids=self._take_done_leases(),
                                                                  client_host=self._host))
        found = resp.found
        try:
            if not allow_missing and sum(found) != len(keys):
                missing = [k for k, f in zip(keys, found) if not f]
                raise BlockNotFound(
                    f"{len(missing)} of {len(keys)} blocks are not in the pool (first missing: "
                    f"{missing[0].hex()}); they were never put, or were evicted or removed"
                )
            hit_idx = [i for i, f in enumerate(found) if f]
            if dests is None:
                targets = [np.empty(size, dtype=np.uint8) for _ in hit_idx]
            else:
                targets = [dests[i] for i in hit_idx]
            if hit_idx:
                await self._read(resp.locations, targets, resp.lease_id, [keys[i] for i in hit_idx],
                                 asked + resp.lease_expires_in_ms / 1000)
        finally:
            self._release_later(resp.lease_id)
        results: list = [None] * len(keys)
        for j, i in enumerate(hit_idx):
            results[i] = out[i] if isinstance(out, (list, tuple)) else targets[j]
        return results

    async def _read(self, locations: common_pb2.Locations, targets: list, lease_id: str,
                    keys: Sequence[bytes], deadline: float) -> None:
        """Copy leased blocks into ``targets``. Blocks that fail their checksum (network reads
        verify them) are reported to the master, which drops them, and the read fails.

        ``deadline`` is when the lease ends on this client's clock, counted from before the
        request that took it (so never later than the master's). A copy that finishes after
        it may hold bytes of a slot the master freed and gave to another block meanwhile:
        the read fails with :class:`LeaseExpired` instead of returning them.
        """
        planned = self._plan(locations, READ, lease_id)
        try:
            await self._run_shares(planned, lambda t, share, outs: t.read(share, outs), targets)
        except BlockIntegrityError as exc:
            bad = [keys[i] for i in exc.batch_index]
            if bad:
                await self._call("Release", pool_pb2.ReleaseRequest(lease_ids=[lease_id], corrupt_keys=pack_keys(bad)))
            raise
        late = self._clock() - deadline
        if late > 0:
            raise LeaseExpired(
                f"reading {len(targets)} blocks outlived their read lease (it ended {late:.3f}s before the copy "
                f"finished), so the master may have freed or reused their slots meanwhile; the bytes are not "
                f"returned. Retry, read smaller batches, or give the master a longer --lease-ttl")

    async def lookup(self, keys: Sequence[bytes], *, namespace: Namespace | None = None) -> int:
        """How many leading ``keys`` are in the pool (no lease taken)."""
        ns = self._ns(namespace)
        if not keys:
            return 0
        resp = await self._call_ns(ns, "Lookup", pool_pb2.LookupRequest(
            namespace_id=ns.id, keys=pack_keys(keys), count_only=True))
        return resp.hit_blocks

    async def lookup_leased(self, keys: Sequence[bytes], *, namespace: Namespace | None = None):
        """Longest present prefix with its locations, under a read lease (the raw response).

        The caller must ``release([resp.lease_id])`` when done, or let the lease expire.
        """
        ns = self._ns(namespace)
        return await self._call_ns(ns, "Lookup", pool_pb2.LookupRequest(namespace_id=ns.id, keys=pack_keys(keys),
                                                                        client_host=self._host))

    async def release(self, lease_ids: Sequence[str]) -> int:
        resp = await self._call("Release", pool_pb2.ReleaseRequest(lease_ids=list(lease_ids)))
        return resp.released

    async def remove(self, keys: Sequence[bytes], *, namespace: Namespace | None = None) -> int:
        """Remove blocks of the namespace's tenant; returns how many were present (leased ones
        go when released)."""
        ns = namespace or self.namespace
        if ns is None:  # no namespace: the caller's tenant, as the master knows it
            resp = await self._call("Remove", pool_pb2.RemoveRequest(keys=pack_keys(keys)))
        else:
            resp = await self._call_ns(ns, "Remove", pool_pb2.RemoveRequest(keys=pack_keys(keys), namespace_id=ns.id))
        return resp.removed + resp.deferred

    async def stats(self) -> common_pb2.StatsResponse:
        return await self._call("Stats", common_pb2.StatsRequest())

    # ------------------------------------------------------------------ token level

    async def match(self, tokens, *, namespace: Namespace | None = None) -> int:
        """Number of leading full blocks of ``tokens`` already cached."""
        ns = self._ns(namespace)
        keys = ns.keys(tokens)
        return await self.lookup(keys, namespace=ns) if keys else 0

    async def publish(self, tokens, kv_blocks, *, namespace: Namespace | None = None) -> PutResult:
        """Publish the KV of every full block of ``tokens`` (one block per full block)."""
        ns = self._ns(namespace)
        keys = ns.keys(tokens)
        if not keys:
            return PutResult(0, 0, 0)
        return await self.put_blocks(keys, kv_blocks, namespace=ns, first_position=0)

    async def fetch(self, tokens, out, *, namespace: Namespace | None = None) -> int:
        """Copy the cached prefix of ``tokens`` into ``out``; returns the blocks copied.

        ``out`` is a list of block buffers or one contiguous buffer of whole blocks. At most
        as many blocks as it holds are fetched; blocks past the hit are left untouched.
        """
        ns = self._ns(namespace)
        size = ns.layout.block_bytes
        if isinstance(out, (list, tuple)):
            capacity = len(out)
        else:
            flat = byte_view(out, writable=True, allow_device=True)
            capacity = (flat.size if not is_device(flat) else flat.numel()) // size
        keys = ns.keys(tokens)[:capacity]
        if not keys:
            return 0
        dests = block_views(out, len(keys), size, writable=True, allow_device=True)
        asked = self._clock()
        resp = await self._call_ns(ns, "Lookup", pool_pb2.LookupRequest(
            namespace_id=ns.id, keys=pack_keys(keys), release_lease_ids=self._take_done_leases(),
            client_host=self._host))
        try:
            if resp.hit_blocks:
                await self._read(resp.locations, dests[: resp.hit_blocks], resp.lease_id, keys[: resp.hit_blocks],
                                 asked + resp.lease_expires_in_ms / 1000)
        finally:
            self._release_later(resp.lease_id)
        return resp.hit_blocks
