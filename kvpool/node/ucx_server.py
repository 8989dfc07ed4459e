"""One-sided UCX data plane, node side: register the arenas once, publish how to reach them,
and progress the UCX worker.

:class:`UcxArenaServer` maps each host arena (tier name -> the arena's whole uint8 array)
with ``ucp_mem_map`` and packs its remote key. :meth:`UcxArenaServer.describe` gives the
worker address and, per tier, the arena's base address, size and packed key; the node puts
them in its :class:`~kvpool.transport.endpoint.NodeEndpoint` and clients
(:class:`kvpool.transport.ucx.UcxTransport`) GET and PUT slots directly.

Over CMA (one host) or RDMA the node's CPU takes no part in a transfer. Over UCX's TCP
transport, RMA is emulated with active messages that this process must serve, as it must
serve connection set-up and keepalive on every transport: :meth:`start` runs a daemon
thread that progresses the worker and, when there is nothing to do, sleeps in ``poll`` on
the worker's event fd (``ucp_worker_get_efd`` + ``ucp_worker_arm``), so an idle node costs
no CPU.

The remote key is the capability: the node checks nothing per request (it does not see the
requests), so every client shown this node's endpoint can read and write any slot of these
arenas, past any grant or lease the master signed; with CMA a key reaches any address of
the node's process (and where Yama's ``ptrace_scope`` is 1, UCX makes this process
ptrace-able by any process of the same user so that CMA works). Enable UCX only where
every client is trusted with every block of the node (see :mod:`kvpool.transport.ucx`).
"""

from __future__ import annotations

import logging
import os
import select
import threading

import numpy as np

from kvpool.transport.endpoint import UcxRegion

__all__ = ["UcxArenaServer"]

log = logging.getLogger(__name__)


class UcxArenaServer:
    """Host arenas registered with UCX, and the worker clients connect to."""

    #: Longest sleep of the progress thread between checks of its stop flag (seconds);
    #: a stop or UCX event wakes it at once, this only bounds a missed wake-up.
    IDLE_POLL_S = 1.0

    @classmethod
    def available(cls) -> tuple[bool, str]:
        from kvpool.transport import ucp

        return ucp.availability()

    def __init__(self, regions: dict[str, np.ndarray]) -> None:
        from kvpool.transport import ucp
        from kvpool.transport.ucx import UCX_DEFAULTS

        self._ucp = ucp
        self._arrays: dict[str, np.ndarray] = {}
        for tier, arr in regions.items():
            if not isinstance(arr, np.ndarray) or not arr.flags.c_contiguous or not arr.flags.writeable:
                raise ValueError(f"the {tier} arena must be a contiguous, writable numpy array")
            if arr.nbytes == 0:
                raise ValueError(f"the {tier} arena is empty")
            self._arrays[tier] = arr
        self._context = ucp.Context(wakeup=True, name="kvpool-node", defaults=UCX_DEFAULTS)
        self._memhs = []
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._wake_r, self._wake_w = os.pipe()
        try:
            self._worker = self._context.worker(wakeup=True, name="kvpool-node")
            self._address = self._worker.address()
            self._regions = []
            for tier, arr in self._arrays.items():
                base = arr.ctypes.data
                memh = self._context.mem_map(base, arr.nbytes, remote=True)
                self._memhs.append(memh)
                self._regions.append(UcxRegion(tier=tier, base=base, size=arr.nbytes, rkey=memh.pack_rkey()))
        except BaseException:
            self._release()
            raise

    def describe(self) -> tuple[bytes, list[UcxRegion]]:
        """(worker address, one region per tier: base, size and packed remote key)."""
        return self._address, list(self._regions)

    def start(self) -> None:
        """Progress the worker in a daemon thread (idles in poll on the worker's event fd)."""
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="kvpool-ucx-progress", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        worker = self._worker
        try:
            efd = worker.event_fd()
            poller = select.poll()
            poller.register(efd, select.POLLIN)
            poller.register(self._wake_r, select.POLLIN)
            timeout_ms = int(self.IDLE_POLL_S * 1000)
            while not self._stop.is_set():
                while worker.progress():
                    pass
                if not worker.arm():  # events arrived meanwhile: progress again
                    continue
                poller.poll(timeout_ms)
        except Exception:  # a UCX failure here would leave clients hanging: say so loudly
            log.exception("the UCX progress thread stopped; UCX clients over TCP will time out")

    def close(self) -> None:
        """Stop the progress thread, unmap the arenas, destroy the worker and the context."""
        self._stop.set()
        if self._thread is not None:
            try:
                os.write(self._wake_w, b"x")
            except OSError:
                pass
            self._thread.join(timeout=5)
            if self._thread.is_alive():
                log.error("the UCX progress thread did not stop; leaving UCX resources mapped")
                return
            self._thread = None
        self._release()

    def _release(self) -> None:
        for memh in self._memhs:
            try:
                memh.unmap()
            except self._ucp.UcxError as exc:
                log.warning("ucp_mem_unmap failed: %s", exc)
        self._memhs = []
        worker = getattr(self, "_worker", None)
        if worker is not None:
            worker.close()
            self._worker = None
        if self._context is not None:
            self._context.close()
            self._context = None
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        self._wake_r = self._wake_w = -1
        self._arrays = {}

    def __enter__(self) -> "UcxArenaServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()
