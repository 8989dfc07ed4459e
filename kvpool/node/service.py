"""A node as its own process (``kvpool node``): the NodeControl service and the agent that
keeps the node registered with its master (node.proto).

The agent registers the node (its endpoint, its tier geometry and every block on its NVMe),
then sends a heartbeat every interval. When the master answers "register again" (it
restarted, or it had declared this node dead), the agent registers again with what is on
NVMe at that moment; when the master is unreachable, it keeps trying. The node keeps
serving clients' data-plane copies meanwhile: they never go through the master.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import secrets

import grpc

from kvpool.auth import NODE, AuthInterceptor, Caller, TokenTable, bearer_metadata, resolve_token
from kvpool.capability import new_data_key
from kvpool.errors import FailedPrecondition, InvalidArgument, KvpoolError
from kvpool.masters import MasterList
from kvpool.metrics import Metrics
from kvpool.node.catalog import KEY_BYTES, MAX_KEY_BYTES
from kvpool.guard import LogLimiter, RequestGuard
from kvpool.tls import TlsFiles, open_aio_channel, peer_context, server_context, server_credentials
from kvpool.node.node import Node
from kvpool.node.resident import ResidentBlock
from kvpool.rpc.v1 import node_pb2, node_pb2_grpc
from kvpool.tiers.base import Slot, TierCaps
from kvpool.transport.base import READ, Access
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.wire import unpack_records

__all__ = ["NodeControlServicer", "NodeAgent", "NodeServer"]

log = logging.getLogger("kvpool.node")


def _geometry(node: Node) -> list[node_pb2.TierGeometry]:
    out = []
    for name, arena in node.tiers.items():
        u = arena.usage()
        out.append(node_pb2.TierGeometry(tier=name, capacity_bytes=arena.capacity,
                                         chunk_bytes=arena.slots.chunk_bytes,
                                         used_bytes=u.used_bytes, used_slots=u.used_slots,
                                         caps=arena.caps.value))
    return out


def _nvme_geometry(node: Node) -> node_pb2.TierGeometry:
    for g in _geometry(node):
        if g.tier == "nvme":
            return g
    return node_pb2.TierGeometry()


_bugs = LogLimiter(log, interval=10.0)


def _control(method):
    """Map kvpool errors to statuses; a bug is INTERNAL (logged at most once per interval)."""
    name = method.__name__

    @functools.wraps(method)
    async def handler(self, request, context):
        try:
            return await method(self, request, context)
        except grpc.aio.AbortError:
            raise  # the method chose its status with context.abort: it stands
        except KvpoolError as exc:
            await context.abort(exc.code, f"{name}: {exc}")
        except Exception as exc:
            _bugs.event(name, "failed", level=logging.ERROR, exc_info=True)
            await context.abort(grpc.StatusCode.INTERNAL, f"{name}: internal error ({type(exc).__name__}: {exc})")

    return handler


class NodeControlServicer(node_pb2_grpc.NodeControlServicer):
    """Tier movement on the master's request. Memory slots in requests were allocated by
    the master (on its mirror of this node's slabs); NVMe slots belong to the node's mover.
    Every slot in a request is checked against the tier it names before anything moves."""

    def __init__(self, node: Node) -> None:
        self.node = node

    async def _fence(self, request, context) -> None:
        """Refuse a master whose epoch is older than one this node has seen (it was deposed)."""
        if request.epoch < self.node.epoch:
            raise FailedPrecondition(f"refused: the sender's fencing epoch {request.epoch} is older than "
                                     f"{self.node.epoch}; it no longer leads")
        self.node.epoch = request.epoch

    def _check(self, what: str, key: bytes, tier: str, offset: int, size: int) -> None:
        if not KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
            raise InvalidArgument(f"a block key is {KEY_BYTES} bytes (and a tenant); got {len(key)}")
        arena = self.node.tiers.get(tier)
        if arena is None:
            raise InvalidArgument(f"{what} names the {tier} tier, which this node does not have")
        if size == 0 or offset + size > arena.capacity:
            raise InvalidArgument(f"{what} slot {offset}+{size} lies outside the {tier} tier "
                                  f"({arena.capacity} bytes)")

    @_control
    async def Demote(self, request, context):
        await self._fence(request, context)
        if self.node.mover is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node has no NVMe tier (--nvme)")
        for i in request.items:
            self._check("Demote", i.key, "dram", i.offset, i.size)
        if not request.items:
            return node_pb2.DemoteResponse(nvme=_nvme_geometry(self.node))
        items = [(i.key, Slot(i.offset, i.size), i.checksum, i.namespace_id) for i in request.items]
        result = await self.node.demote(items, keep_dram=request.keep_memory)
        return node_pb2.DemoteResponse(
            moved=[node_pb2.StoredBlock(key=k, offset=s.offset, size=s.size) for k, s in result.moved],
            no_space=result.no_space, failed=[k for k, _ in result.failed],
            first_error=result.failed[0][1] if result.failed else "", nvme=_nvme_geometry(self.node))

    @_control
    async def Promote(self, request, context):
        await self._fence(request, context)
        if self.node.mover is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "this node has no NVMe tier (--nvme)")
        for i in request.items:
            self._check("Promote", i.key, "nvme", i.offset, i.size)
            self._check("Promote target", i.key, "dram", i.target_offset, i.size)
        if not request.items:
            return node_pb2.PromoteResponse(nvme=_nvme_geometry(self.node))
        items = [(i.key, Slot(i.offset, i.size), i.checksum, Slot(i.target_offset, i.size)) for i in request.items]
        result = await self.node.promote(items)
        return node_pb2.PromoteResponse(promoted=result.promoted, corrupt=[k for k, _ in result.corrupt],
                                        corrupt_reasons=[r for _, r in result.corrupt],
                                        nvme=_nvme_geometry(self.node))

    @_control
    async def Pull(self, request, context):
        """The one node-to-node copy (replicas and drains): see node.proto and kvpool.master.copier."""
        await self._fence(request, context)
        if request.keys or request.namespace_ids:
            for key in request.keys:
                if not KEY_BYTES <= len(key) <= MAX_KEY_BYTES:
                    raise InvalidArgument(f"a block key is {KEY_BYTES} bytes (and a tenant); got {len(key)}")
        # The capability names the tenant whose blocks these are (kvpool-cap/v2): the source's
        # data server checks it against the blocks' keys.
        access = Access(READ, request.grant_id, request.source.node_id, request.expires_unix_ms, request.mac,
                        request.records, request.tenant)
        corrupt = await self._pull(request.source, access, request.tier, request.target_offsets, request.keys,
                                   request.namespace_ids)
        return node_pb2.PullResponse(corrupt=corrupt)

    async def _pull(self, source, access: Access, tier: str, offsets, keys, namespace_ids) -> list[int]:
        try:
            sizes = unpack_records(access.records)["size"]
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        if len(sizes) != len(offsets):
            raise InvalidArgument(f"{len(sizes)} records but {len(offsets)} target slots; give one per record")
        slots = [Slot(int(o), int(n)) for o, n in zip(offsets, sizes)]
        try:
            return await self.node.pull(NodeEndpoint.from_proto(source), access, tier, slots, list(keys),
                                        list(namespace_ids))
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None

    @_control
    async def MoveTier(self, request, context):
        await self._fence(request, context)
        for i in request.items:
            self._check("MoveTier", i.key, request.source_tier, i.offset, i.size)
            self._check("MoveTier target", i.key, request.target_tier, i.target_offset, i.size)
        items = [(i.key, Slot(i.offset, i.size), i.checksum, i.namespace_id, Slot(i.target_offset, i.size))
                 for i in request.items]
        try:
            moved, corrupt = await self.node.move_tier(items, request.source_tier, request.target_tier)
        except ValueError as exc:
            raise InvalidArgument(str(exc)) from None
        return node_pb2.MoveTierResponse(moved=moved, corrupt=corrupt)

    @_control
    async def ApplyChanges(self, request, context):
        await self._fence(request, context)
        if len(request.changes) > request.changes_seq:
            raise InvalidArgument(f"{len(request.changes)} changes cannot end at sequence number "
                                  f"{request.changes_seq}: numbers start at 1")
        for c in request.changes:
            self._check("ApplyChanges", c.key or bytes(KEY_BYTES), c.tier, c.offset, c.size)
            if TierCaps.PERSISTENT in self.node.tiers[c.tier].caps:
                raise InvalidArgument(f"ApplyChanges names the {c.tier} tier, which keeps its own catalog; "
                                      f"changes are for memory tiers")
        self.node.resident.apply(request.changes, request.changes_seq)
        return node_pb2.ApplyChangesResponse(applied_seq=self.node.resident.applied_seq)

    @_control
    async def DropNvme(self, request, context):
        await self._fence(request, context)
        if self.node.mover is None:
            return node_pb2.DropNvmeResponse()
        for b in request.blocks:
            self._check("DropNvme", b.key, "nvme", b.offset, b.size)
        if not request.blocks:
            return node_pb2.DropNvmeResponse(nvme=_nvme_geometry(self.node))
        await self.node.drop_nvme([(b.key, Slot(b.offset, b.size)) for b in request.blocks])
        return node_pb2.DropNvmeResponse(dropped=len(request.blocks), nvme=_nvme_geometry(self.node))

    @_control
    async def VerifyBlocks(self, request, context):
        await self._fence(request, context)
        arenas = self.node.host_arenas()
        resident = self.node.resident

        def check() -> list[bytes]:
            held = []
            for b in request.blocks:
                if resident.holds(b, arenas):
                    resident.add(ResidentBlock(b.tier, b.offset, b.size, b.key, b.checksum, b.namespace_id))
                    held.append(b.key)
            return held

        return node_pb2.VerifyBlocksResponse(held=await asyncio.to_thread(check))

    @_control
    async def Replicate(self, request, context):
        """Deprecated (node.proto): the same copy as Pull, for a master of the previous release."""
        await self._fence(request, context)
        cap = request.capability
        access = Access(READ, request.lease_id, cap.node_id, cap.expires_unix_ms, bytes(cap.mac), request.records)
        if not len(request.keys) == len(request.namespace_ids) == len(request.target_offsets):
            raise InvalidArgument("Replicate: give one target offset, key and namespace per record")
        try:
            bad = set(await self._pull(request.source, access, request.tier, request.target_offsets, request.keys,
                                       request.namespace_ids))
        except KvpoolError as exc:
            if isinstance(exc, InvalidArgument):
                raise
            return node_pb2.ReplicateResponse(error=str(exc))
        copied = [k for i, k in enumerate(request.keys) if i not in bad]
        return node_pb2.ReplicateResponse(copied=copied, error=f"{len(bad)} blocks failed their checksum" if bad else "")


class NodeAgent:
    """Registers ``node`` with the master at ``master_address`` and keeps it registered."""

    def __init__(self, node: Node, master_address: str, control_address: str, token: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        self.node = node
        #: One master, or several sharing a Redis: the node follows their leader.
        self.masters = MasterList(master_address)
        self._metadata = bearer_metadata(token)
        self._tls = tls
        self.control_address = control_address
        self.incarnation = secrets.token_hex(8)
        self.node_id: int | None = None
        self.interval = 1.0
        self._channel = open_aio_channel(self.masters.current, self._tls)
        self._stub = node_pb2_grpc.RegistryStub(self._channel)
        self._first = True

    @property
    def master_address(self) -> str:
        return self.masters.current

    async def _connect(self) -> None:
        old, self._channel = self._channel, open_aio_channel(self.masters.current, self._tls)
        self._stub = node_pb2_grpc.RegistryStub(self._channel)
        await old.close()

    def _blocks(self) -> list[node_pb2.StoredBlock]:
        if self._first:  # at start the catalog was verified and its slots claimed
            found = self.node.recover()
            self._first = False
        else:
            found = self.node.nvme_blocks()
        return [node_pb2.StoredBlock(key=k, offset=s.offset, size=s.size, checksum=c, namespace_id=ns)
                for k, s, c, ns in found]

    async def register(self) -> None:
        # A new capability key at every registration: grants and leases a master signed for an
        # earlier registration (whose blocks it has forgotten) stop working on this node.
        key = new_data_key()
        # Hashing every memory block is I/O-sized work: off the loop that serves the master.
        memory = await asyncio.to_thread(self.node.resident.verified, self.node.host_arenas())
        req = node_pb2.RegisterNodeRequest(
            name=self.node.name, control_address=self.control_address, incarnation=self.incarnation,
            tiers=_geometry(self.node), nvme_blocks=self._blocks(), data_key=key, epoch=self.node.epoch,
            memory_blocks=[node_pb2.ResidentBlock(tier=b.tier, offset=b.offset, size=b.size, key=b.key,
                                                  checksum=b.checksum, namespace_id=b.namespace_id)
                           for b in memory])
        self.node.endpoint().fill(req.endpoint)
        resp = await self._stub.RegisterNode(req, timeout=30, metadata=self._metadata)
        self.node.epoch = max(self.node.epoch, resp.epoch)
        self.node.set_identity(resp.node_id, key)
        self.node.resident.reset_seq()  # this master numbers its changes from 1
        self.node_id = resp.node_id
        self.interval = resp.heartbeat_interval_s or 1.0
        log.info("registered with master %s as node %d (%d blocks in memory, %d on NVMe)", self.master_address,
                 self.node_id, len(req.memory_blocks), len(req.nvme_blocks))

    async def heartbeat(self) -> bool:
        """One heartbeat; applies the master's changes. False: the master asks to register again."""
        resident = self.node.resident
        while True:
            resp = await self._stub.Heartbeat(node_pb2.HeartbeatRequest(
                node_id=self.node_id, incarnation=self.incarnation, tiers=_geometry(self.node),
                applied_seq=resident.applied_seq), timeout=10, metadata=self._metadata)
            if resp.register_again:
                return False
            if resp.changes_seq:
                resident.apply(resp.changes, resp.changes_seq)
            if not resp.more:
                return True

    async def run(self) -> None:
        """Register, then heartbeat forever; re-register whenever the master asks."""
        while True:
            try:
                if self.node_id is None:
                    await self.register()
                else:
                    if not await self.heartbeat():
                        log.info("master %s asks this node to register again", self.master_address)
                        self.node_id = None
                        continue
            except grpc.aio.AioRpcError as exc:
                if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                    log.error("master %s refused this node: %s: %s; give the node a node token (--token-file)",
                              self.master_address, exc.code().name, exc.details())
                else:
                    log.warning("master %s unreachable (%s); retrying", self.master_address, exc.code().name)
                self.node_id = None
                if self.masters.several:  # try the leader a standby named, or the next master, soon
                    self.masters.failed(exc)
                    await self._connect()
                    await asyncio.sleep(min(self.interval, 0.2))
                    continue
            await asyncio.sleep(self.interval)

    async def close(self) -> None:
        await self._channel.close()


class NodeServer:
    """``kvpool node``: the node, its NodeControl service, and the agent that registers it."""

    def __init__(self, settings) -> None:
        self.settings = settings
        self.node: Node | None = None
        self.agent: NodeAgent | None = None
        self._server: grpc.aio.Server | None = None
        self._agent_task: asyncio.Task | None = None
        self.metrics: Metrics | None = None
        self.port = 0

    async def start(self) -> None:
        import os

        from grpc_health.v1 import health, health_pb2, health_pb2_grpc

        s = self.settings
        os.makedirs(s.data_dir, exist_ok=True)
        self.node = Node.build(0, s.node_name, dram_bytes=s.dram, nvme_bytes=s.nvme, hbm_bytes=s.hbm,
                               data_dir=s.data_dir, chunk_bytes=s.slab_bytes, prefault=s.prefault)
        token = resolve_token(s.token, s.token_file)
        # With a token, the control service answers only calls that bear it: the master
        # calls back with the token this node registered with.
        interceptors = [RequestGuard(LogLimiter(logging.getLogger("kvpool.requests")))]
        if token:
            interceptors.append(AuthInterceptor(TokenTable({token: Caller(NODE, "", token)})))
        server = grpc.aio.server(options=[("grpc.so_reuseport", 0)], interceptors=interceptors)
        node_pb2_grpc.add_NodeControlServicer_to_server(NodeControlServicer(self.node), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        tls = TlsFiles.of(s)
        try:
            if tls is not None:
                self.port = server.add_secure_port(f"{s.host}:{s.port}", server_credentials(tls))
            else:
                self.port = server.add_insecure_port(f"{s.host}:{s.port}")
        except RuntimeError:
            self.port = 0
        if self.port == 0:
            raise OSError(f"cannot bind the node's control service to {s.host}:{s.port} (in use?); pick another --port")
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        self._server = server
        control = f"{s.host}:{self.port}"
        self.node.serve_data(s.host, s.data_port, advertise_host=s.advertise_host or None, ucx=s.ucx,
                             tls=server_context(tls) if tls is not None else None, peer_tls=peer_context(tls))
        self.agent = NodeAgent(self.node, s.master, control, token, tls)
        self._agent_task = asyncio.create_task(self.agent.run())
        metrics = "off"
        if s.metrics_port >= 0:
            self.metrics = Metrics.for_node(self.node)
            where = s.metrics_host or s.host
            metrics = f"http://{where}:{self.metrics.serve(where, s.metrics_port)}/metrics"
        ep = self.node.endpoint()
        shm = ep.segment("dram", "shm").handle
        tiers = " ".join(f"{name}={arena.capacity}" for name, arena in self.node.tiers.items())
        log.info("kvpool node ready control=%s data=%s ucx=%s master=%s metrics=%s %s shm=/dev/shm/%s", control,
                 ep.tcp_address, "on" if ep.ucx_worker_address else "off", s.master, metrics, tiers, shm)

    async def stop(self) -> None:
        if self._agent_task is not None:
            self._agent_task.cancel()
            try:
                await self._agent_task
            except asyncio.CancelledError:
                pass
        if self._server is not None:
            await self._server.stop(2)
        if self.metrics is not None:
            self.metrics.close()
        if self.agent is not None:
            await self.agent.close()
        if self.node is not None:
            self.node.close()
            log.info("kvpool node stopped; shared memory unlinked")
