"""A thin ctypes binding to UCX's UCP library: the one-sided RMA subset kvpool uses.

Only what a node and a client need to move block bytes with remote memory access:

* a :class:`Context` (``ucp_init``), which maps memory (:meth:`Context.mem_map`) and packs
  remote keys (:meth:`MemHandle.pack_rkey`);
* a :class:`Worker` (``ucp_worker_create``), whose address a peer connects to, which is
  progressed (:meth:`Worker.progress`, or :meth:`Worker.event_fd` + :meth:`Worker.arm` to
  sleep until there is work), and which waits for requests (:meth:`Worker.wait`);
* an :class:`Endpoint` to a peer worker (``ucp_ep_create`` from the peer's address), which
  unpacks remote keys and issues ``ucp_put_nbx`` / ``ucp_get_nbx`` / ``ucp_ep_flush_nbx``.

Nothing here is thread-safe beyond what UCX itself guarantees: a worker and its endpoints
belong to one thread at a time (the caller serializes them, see ``kvpool.transport.ucx``).
The calls release the GIL (ctypes does for every foreign call), so other Python threads run
while a thread progresses a worker.

The library comes from the ``libucx-cu12`` wheel (pulled in by ``ucxx-cu12``) when it is
installed, else from a system UCX (``libucp.so.0``); ``KVPOOL_UCX_LIBUCP`` names a
``libucp.so`` to use instead of both. Struct layouts are those of the UCP API headers of
UCX 1.21, and only fields that UCX has had since 1.14 are set (every struct is extended
through its ``field_mask``), so :func:`load` refuses an older library.
"""

from __future__ import annotations

import ctypes
import os
import threading
import time
from ctypes import (POINTER, Structure, Union, byref, c_char, c_char_p, c_int, c_int8, c_size_t, c_uint,
                    c_uint32, c_uint64, c_void_p)

__all__ = ["Context", "Endpoint", "MemHandle", "RemoteKey", "UcxError", "Worker", "load",
           "MIN_VERSION", "version"]

#: Oldest UCX whose API has every field this binding sets.
MIN_VERSION = (1, 14)
#: The API version the layouts below come from (passed to ucp_init_version).
API_VERSION = (1, 21)

# ucs_status_t values (ucs/type/status.h).
UCS_OK = 0
UCS_INPROGRESS = 1
UCS_ERR_BUSY = -15
UCS_ERR_CANCELED = -16
UCS_ERR_TIMED_OUT = -20
UCS_ERR_LAST = -100

# ucp_params_t.field_mask and features.
UCP_PARAM_FIELD_FEATURES = 1 << 0
UCP_PARAM_FIELD_MT_WORKERS_SHARED = 1 << 5
UCP_PARAM_FIELD_NAME = 1 << 8
UCP_FEATURE_RMA = 1 << 1
UCP_FEATURE_WAKEUP = 1 << 4

# ucp_worker_params_t.field_mask, thread modes and wakeup events.
UCP_WORKER_PARAM_FIELD_THREAD_MODE = 1 << 0
UCP_WORKER_PARAM_FIELD_EVENTS = 1 << 2
UCP_WORKER_PARAM_FIELD_NAME = 1 << 6
UCS_THREAD_MODE_SINGLE, UCS_THREAD_MODE_SERIALIZED, UCS_THREAD_MODE_MULTI = 0, 1, 2
UCP_WAKEUP_RMA = 1 << 0
UCP_WAKEUP_AMO = 1 << 1
UCP_WAKEUP_TX = 1 << 10
UCP_WAKEUP_RX = 1 << 11

# ucp_worker_attr_t.field_mask.
UCP_WORKER_ATTR_FIELD_ADDRESS = 1 << 1

# ucp_ep_params_t.field_mask and error handling modes.
UCP_EP_PARAM_FIELD_REMOTE_ADDRESS = 1 << 0
UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE = 1 << 1
UCP_EP_PARAM_FIELD_ERR_HANDLER = 1 << 2
UCP_EP_PARAM_FIELD_NAME = 1 << 7
UCP_ERR_HANDLING_MODE_NONE, UCP_ERR_HANDLING_MODE_PEER = 0, 1
UCP_EP_CLOSE_FLAG_FORCE = 1 << 0

# ucp_mem_map_params_t.field_mask and protections.
UCP_MEM_MAP_PARAM_FIELD_ADDRESS = 1 << 0
UCP_MEM_MAP_PARAM_FIELD_LENGTH = 1 << 1
UCP_MEM_MAP_PARAM_FIELD_FLAGS = 1 << 2
UCP_MEM_MAP_PARAM_FIELD_PROT = 1 << 3
UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE = 1 << 4
UCP_MEM_MAP_PROT_LOCAL_READ = 1 << 0
UCP_MEM_MAP_PROT_LOCAL_WRITE = 1 << 1
UCP_MEM_MAP_PROT_REMOTE_READ = 1 << 8
UCP_MEM_MAP_PROT_REMOTE_WRITE = 1 << 9
UCS_MEMORY_TYPE_HOST = 0

# ucp_request_param_t.op_attr_mask.
UCP_OP_ATTR_FIELD_FLAGS = 1 << 4
UCP_OP_ATTR_FIELD_MEMORY_TYPE = 1 << 6
UCP_OP_ATTR_FIELD_MEMH = 1 << 8

UCP_ENTITY_NAME_MAX = 32


class UcxError(RuntimeError):
    """A UCP call failed; ``status`` is the ucs_status_t (negative)."""

    def __init__(self, what: str, status: int) -> None:
        self.status = status
        super().__init__(f"{what}: {status_string(status)} (ucs status {status})")


# --- struct layouts (ucp/api/ucp.h, ucp_def.h, ucs/config/types.h of UCX 1.21) ---------------

class _Params(Structure):  # ucp_params_t
    _fields_ = [("field_mask", c_uint64), ("features", c_uint64), ("request_size", c_size_t),
                ("request_init", c_void_p), ("request_cleanup", c_void_p),
                ("tag_sender_mask", c_uint64), ("mt_workers_shared", c_int),
                ("estimated_num_eps", c_size_t), ("estimated_num_ppn", c_size_t),
                ("name", c_char_p), ("node_local_id", c_size_t)]


class _CpuSet(Structure):  # ucs_cpu_set_t: 1024 bits
    _fields_ = [("bits", c_uint64 * 16)]


class _WorkerParams(Structure):  # ucp_worker_params_t
    _fields_ = [("field_mask", c_uint64), ("thread_mode", c_int), ("cpu_mask", _CpuSet),
                ("events", c_uint), ("user_data", c_void_p), ("event_fd", c_int),
                ("flags", c_uint64), ("name", c_char_p), ("am_alignment", c_size_t),
                ("client_id", c_uint64)]


class _WorkerAttr(Structure):  # ucp_worker_attr_t
    _fields_ = [("field_mask", c_uint64), ("thread_mode", c_int), ("address_flags", c_uint32),
                ("address", c_void_p), ("address_length", c_size_t), ("max_am_header", c_size_t),
                ("name", c_char * UCP_ENTITY_NAME_MAX), ("max_debug_string", c_size_t)]


#: void (*ucp_err_handler_cb_t)(void *arg, ucp_ep_h ep, ucs_status_t status)
ERR_HANDLER = ctypes.CFUNCTYPE(None, c_void_p, c_void_p, c_int8)


class _ErrHandler(Structure):  # ucp_err_handler_t
    _fields_ = [("cb", ERR_HANDLER), ("arg", c_void_p)]


class _SockAddr(Structure):  # ucs_sock_addr_t
    _fields_ = [("addr", c_void_p), ("addrlen", c_uint32)]


class _EpParams(Structure):  # ucp_ep_params_t
    _fields_ = [("field_mask", c_uint64), ("address", c_void_p), ("err_mode", c_int),
                ("err_handler", _ErrHandler), ("user_data", c_void_p), ("flags", c_uint),
                ("sockaddr", _SockAddr), ("conn_request", c_void_p), ("name", c_char_p),
                ("local_sockaddr", _SockAddr)]


class _MemMapParams(Structure):  # ucp_mem_map_params_t
    _fields_ = [("field_mask", c_uint64), ("address", c_void_p), ("length", c_size_t),
                ("flags", c_uint), ("prot", c_uint), ("memory_type", c_int),
                ("exported_memh_buffer", c_void_p)]


class _RecvInfo(Union):
    _fields_ = [("length", c_void_p), ("tag_info", c_void_p)]


class _RequestParam(Structure):  # ucp_request_param_t
    _fields_ = [("op_attr_mask", c_uint32), ("flags", c_uint32), ("request", c_void_p),
                ("cb", c_void_p), ("datatype", c_uint64), ("user_data", c_void_p),
                ("reply_buffer", c_void_p), ("memory_type", c_int), ("recv_info", _RecvInfo),
                ("memh", c_void_p)]


_SIZES = {_Params: 88, _WorkerParams: 200, _WorkerAttr: 80, _EpParams: 104, _MemMapParams: 48,
          _RequestParam: 72}
for _t, _n in _SIZES.items():  # the sizes of UCX 1.21 on LP64, as gcc lays them out
    assert ctypes.sizeof(_t) == _n, (_t.__name__, ctypes.sizeof(_t), _n)


# --- loading ----------------------------------------------------------------------------------

_lib: ctypes.CDLL | None = None
_libc: ctypes.CDLL | None = None
_load_error: str | None = None
_load_lock = threading.Lock()

_HOW = ("install UCX for kvpool's ucx transport: `pip install libucx-cu12` (or `pip install "
        "ucxx-cu12`, which brings it; neither needs a GPU), or a system UCX >= "
        f"{MIN_VERSION[0]}.{MIN_VERSION[1]} providing libucp.so.0 (needed for RDMA verbs: the "
        "wheel's UCX has none), or point KVPOOL_UCX_LIBUCP at a libucp.so")


def _open_libucp() -> ctypes.CDLL:
    path = os.environ.get("KVPOOL_UCX_LIBUCP")
    if path:
        return ctypes.CDLL(path)
    try:
        import libucx  # the libucx-cu12 wheel: loads its bundled libucs/libuct/libucp
    except ImportError:
        libucx = None
    if libucx is not None:
        for handle in libucx.load_library():
            if handle is not None and os.path.basename(handle._name).startswith("libucp."):
                return handle
    return ctypes.CDLL("libucp.so.0")


def _declare(lib: ctypes.CDLL) -> None:
    s = c_int8  # ucs_status_t: a packed enum, one byte
    sigs = {
        "ucp_get_version": (None, [POINTER(c_uint), POINTER(c_uint), POINTER(c_uint)]),
        "ucp_config_read": (s, [c_char_p, c_char_p, POINTER(c_void_p)]),
        "ucp_config_modify": (s, [c_void_p, c_char_p, c_char_p]),
        "ucp_config_release": (None, [c_void_p]),
        "ucp_init_version": (s, [c_uint, c_uint, POINTER(_Params), c_void_p, POINTER(c_void_p)]),
        "ucp_cleanup": (None, [c_void_p]),
        "ucp_worker_create": (s, [c_void_p, POINTER(_WorkerParams), POINTER(c_void_p)]),
        "ucp_worker_destroy": (None, [c_void_p]),
        "ucp_worker_query": (s, [c_void_p, POINTER(_WorkerAttr)]),
        "ucp_worker_release_address": (None, [c_void_p, c_void_p]),
        "ucp_worker_progress": (c_uint, [c_void_p]),
        "ucp_worker_get_efd": (s, [c_void_p, POINTER(c_int)]),
        "ucp_worker_arm": (s, [c_void_p]),
        "ucp_worker_signal": (s, [c_void_p]),
        "ucp_ep_create": (s, [c_void_p, POINTER(_EpParams), POINTER(c_void_p)]),
        "ucp_ep_close_nbx": (c_void_p, [c_void_p, POINTER(_RequestParam)]),
        "ucp_ep_print_info": (None, [c_void_p, c_void_p]),
        "ucp_ep_flush_nbx": (c_void_p, [c_void_p, POINTER(_RequestParam)]),
        "ucp_mem_map": (s, [c_void_p, POINTER(_MemMapParams), POINTER(c_void_p)]),
        "ucp_mem_unmap": (s, [c_void_p, c_void_p]),
        "ucp_rkey_pack": (s, [c_void_p, c_void_p, POINTER(c_void_p), POINTER(c_size_t)]),
        "ucp_rkey_buffer_release": (None, [c_void_p]),
        "ucp_ep_rkey_unpack": (s, [c_void_p, c_void_p, POINTER(c_void_p)]),
        "ucp_rkey_destroy": (None, [c_void_p]),
        "ucp_put_nbx": (c_void_p, [c_void_p, c_void_p, c_size_t, c_uint64, c_void_p,
                                   POINTER(_RequestParam)]),
        "ucp_get_nbx": (c_void_p, [c_void_p, c_void_p, c_size_t, c_uint64, c_void_p,
                                   POINTER(_RequestParam)]),
        "ucp_request_check_status": (s, [c_void_p]),
        "ucp_request_free": (None, [c_void_p]),
        "ucp_request_cancel": (None, [c_void_p, c_void_p]),
    }
    for name, (restype, argtypes) in sigs.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes


def load() -> ctypes.CDLL:
    """The UCP library, loaded and declared once. Raises OSError saying how to install it."""
    global _lib, _libc, _load_error
    with _load_lock:
        if _lib is not None:
            return _lib
        if _load_error is not None:
            raise OSError(_load_error)
        try:
            lib = _open_libucp()
            _declare(lib)
        except (OSError, AttributeError) as exc:
            _load_error = f"UCX (libucp) cannot be loaded ({exc}); {_HOW}"
            raise OSError(_load_error) from None
        major, minor, release = c_uint(), c_uint(), c_uint()
        lib.ucp_get_version(byref(major), byref(minor), byref(release))
        if (major.value, minor.value) < MIN_VERSION:
            _load_error = (f"UCX {major.value}.{minor.value}.{release.value} is too old "
                           f"(kvpool needs >= {MIN_VERSION[0]}.{MIN_VERSION[1]}); {_HOW}")
            raise OSError(_load_error)
        # libucs for ucs_status_string: libucp links it, so its symbols resolve through libucp.
        try:
            lib.ucs_status_string.restype = c_char_p
            lib.ucs_status_string.argtypes = [c_int]
        except AttributeError:
            pass
        libc = ctypes.CDLL(None)
        libc.open_memstream.restype = c_void_p
        libc.open_memstream.argtypes = [POINTER(c_void_p), POINTER(c_size_t)]
        libc.fclose.argtypes = [c_void_p]
        libc.free.argtypes = [c_void_p]
        _libc = libc
        _lib = lib
        return lib


def availability() -> tuple[bool, str]:
    """(True, "") where libucp loads, else (False, why and how to install it). Never raises."""
    try:
        load()
    except (OSError, ImportError) as exc:
        return False, str(exc)
    return True, ""


def version() -> tuple[int, int, int]:
    lib = load()
    major, minor, release = c_uint(), c_uint(), c_uint()
    lib.ucp_get_version(byref(major), byref(minor), byref(release))
    return major.value, minor.value, release.value


def status_string(status: int) -> str:
    lib = _lib
    if lib is not None:
        try:
            text = lib.ucs_status_string(status)
            if text:
                return text.decode()
        except AttributeError:
            pass
    return f"status {status}"


def _check(what: str, status: int) -> None:
    if status != UCS_OK:
        raise UcxError(what, status)


def _ptr_status(ptr: int | None) -> int | None:
    """A ucs_status_ptr_t as (None: done, UCS_INPROGRESS: a request, negative: an error)."""
    if not ptr:
        return None
    if ptr >= (1 << 64) + UCS_ERR_LAST:  # UCS_PTR_IS_ERR: the top 100 addresses are statuses
        return ptr - (1 << 64)
    return UCS_INPROGRESS


# --- objects ----------------------------------------------------------------------------------

class Context:
    """A UCP context with the RMA feature (and WAKEUP when ``wakeup``)."""

    def __init__(self, *, wakeup: bool = False, name: str = "kvpool",
                 defaults: dict[str, str] | None = None) -> None:
        """``defaults``: UCX settings (``{"RNDV_THRESH": "inf"}``) applied unless the
        environment sets them (``UCX_RNDV_THRESH``), so a user can always override them."""
        self.lib = load()
        config = c_void_p()
        _check("ucp_config_read", self.lib.ucp_config_read(None, None, byref(config)))
        try:
            for key, value in (defaults or {}).items():
                if f"UCX_{key}" not in os.environ:
                    _check(f"ucp_config_modify {key}={value}",
                           self.lib.ucp_config_modify(config, key.encode(), value.encode()))
            params = _Params()
            params.field_mask = (UCP_PARAM_FIELD_FEATURES | UCP_PARAM_FIELD_MT_WORKERS_SHARED
                                 | UCP_PARAM_FIELD_NAME)
            params.features = UCP_FEATURE_RMA | (UCP_FEATURE_WAKEUP if wakeup else 0)
            params.mt_workers_shared = 1  # workers of this context run on different threads
            self._name = name.encode()
            params.name = self._name
            handle = c_void_p()
            _check("ucp_init", self.lib.ucp_init_version(API_VERSION[0], API_VERSION[1],
                                                          byref(params), config, byref(handle)))
        finally:
            self.lib.ucp_config_release(config)
        self.handle = handle.value

    def worker(self, *, thread_mode: int = UCS_THREAD_MODE_SERIALIZED, wakeup: bool = False,
               name: str = "kvpool") -> "Worker":
        return Worker(self, thread_mode=thread_mode, wakeup=wakeup, name=name)

    def mem_map(self, address: int, length: int, *, remote: bool = True) -> "MemHandle":
        """Register ``length`` bytes at ``address`` (no allocation; the memory stays the caller's)."""
        params = _MemMapParams()
        params.field_mask = (UCP_MEM_MAP_PARAM_FIELD_ADDRESS | UCP_MEM_MAP_PARAM_FIELD_LENGTH
                             | UCP_MEM_MAP_PARAM_FIELD_PROT | UCP_MEM_MAP_PARAM_FIELD_MEMORY_TYPE)
        params.address = address
        params.length = length
        params.prot = UCP_MEM_MAP_PROT_LOCAL_READ | UCP_MEM_MAP_PROT_LOCAL_WRITE
        if remote:
            params.prot |= UCP_MEM_MAP_PROT_REMOTE_READ | UCP_MEM_MAP_PROT_REMOTE_WRITE
        params.memory_type = UCS_MEMORY_TYPE_HOST
        memh = c_void_p()
        _check("ucp_mem_map", self.lib.ucp_mem_map(self.handle, byref(params), byref(memh)))
        return MemHandle(self, memh.value, address, length)

    def close(self) -> None:
        if self.handle:
            self.lib.ucp_cleanup(self.handle)
            self.handle = None


class MemHandle:
    """Memory mapped with :meth:`Context.mem_map`."""

    def __init__(self, context: Context, handle: int, address: int, length: int) -> None:
        self.context = context
        self.handle = handle
        self.address = address
        self.length = length

    def pack_rkey(self) -> bytes:
        """The packed remote key a peer unpacks to access this memory."""
        lib = self.context.lib
        buf, size = c_void_p(), c_size_t()
        _check("ucp_rkey_pack", lib.ucp_rkey_pack(self.context.handle, self.handle, byref(buf),
                                                  byref(size)))
        try:
            return ctypes.string_at(buf.value, size.value)
        finally:
            lib.ucp_rkey_buffer_release(buf)

    def unmap(self) -> None:
        if self.handle:
            _check("ucp_mem_unmap", self.context.lib.ucp_mem_unmap(self.context.handle, self.handle))
            self.handle = None


class Worker:
    """A UCP worker. One thread at a time (``thread_mode`` SERIALIZED by default)."""

    def __init__(self, context: Context, *, thread_mode: int, wakeup: bool, name: str) -> None:
        self.context = context
        self.lib = context.lib
        params = _WorkerParams()
        params.field_mask = UCP_WORKER_PARAM_FIELD_THREAD_MODE | UCP_WORKER_PARAM_FIELD_NAME
        params.thread_mode = thread_mode
        self._name = name.encode()
        params.name = self._name
        if wakeup:
            params.field_mask |= UCP_WORKER_PARAM_FIELD_EVENTS
            params.events = UCP_WAKEUP_RMA | UCP_WAKEUP_AMO | UCP_WAKEUP_TX | UCP_WAKEUP_RX
        handle = c_void_p()
        _check("ucp_worker_create", self.lib.ucp_worker_create(context.handle, byref(params),
                                                               byref(handle)))
        self.handle = handle.value
        self._failed: dict[int, int] = {}  # ep handle -> status, set by the error callback
        self._on_error = ERR_HANDLER(self._record_error)  # kept alive as long as the worker

    def _record_error(self, arg, ep, status) -> None:
        self._failed[ep or 0] = status

    def address(self) -> bytes:
        """This worker's address, for a peer's :meth:`connect`."""
        attr = _WorkerAttr()
        attr.field_mask = UCP_WORKER_ATTR_FIELD_ADDRESS
        _check("ucp_worker_query", self.lib.ucp_worker_query(self.handle, byref(attr)))
        try:
            return ctypes.string_at(attr.address, attr.address_length)
        finally:
            self.lib.ucp_worker_release_address(self.handle, attr.address)

    def progress(self) -> int:
        return self.lib.ucp_worker_progress(self.handle)

    def event_fd(self) -> int:
        """A file descriptor that becomes readable when :meth:`arm` ed and there is work."""
        fd = c_int()
        _check("ucp_worker_get_efd", self.lib.ucp_worker_get_efd(self.handle, byref(fd)))
        return fd.value

    def arm(self) -> bool:
        """Arm the event fd; False when there is work already (progress again first)."""
        status = self.lib.ucp_worker_arm(self.handle)
        if status == UCS_ERR_BUSY:
            return False
        _check("ucp_worker_arm", status)
        return True

    def connect(self, address: bytes, *, peer_errors: bool = True, name: str = "") -> "Endpoint":
        """An endpoint to the worker whose address is ``address``. With ``peer_errors`` UCX
        reports a dead peer as an error status (see :meth:`Endpoint.failed`) instead of
        hanging or aborting."""
        params = _EpParams()
        params.field_mask = UCP_EP_PARAM_FIELD_REMOTE_ADDRESS
        buf = ctypes.create_string_buffer(address, len(address))
        params.address = ctypes.addressof(buf)
        if peer_errors:
            params.field_mask |= UCP_EP_PARAM_FIELD_ERR_HANDLING_MODE | UCP_EP_PARAM_FIELD_ERR_HANDLER
            params.err_mode = UCP_ERR_HANDLING_MODE_PEER
            params.err_handler.cb = self._on_error
            params.err_handler.arg = None
        ep_name = name.encode()[: UCP_ENTITY_NAME_MAX - 1]
        if ep_name:
            params.field_mask |= UCP_EP_PARAM_FIELD_NAME
            params.name = ep_name
        handle = c_void_p()
        _check("ucp_ep_create", self.lib.ucp_ep_create(self.handle, byref(params), byref(handle)))
        return Endpoint(self, handle.value)

    def wait(self, requests: list[int], stall_timeout: float, *,
             endpoint: "Endpoint | None" = None) -> None:
        """Progress until every request completed, then free them.

        Raises :class:`UcxError` with the first failed status; with UCS_ERR_TIMED_OUT when
        no request completed for ``stall_timeout`` seconds; with the endpoint's error when
        UCX reports that ``endpoint`` failed (its peer died). After an error the caller
        must close the endpoint with ``force``, which completes what is still in flight:
        those requests are handed to UCX, which frees each when it completes.
        """
        lib = self.lib
        pending = [r for r in requests if r]
        error = None
        idle = 0
        last = time.monotonic()
        while pending:
            still = []
            for req in pending:
                status = lib.ucp_request_check_status(req)
                if status == UCS_INPROGRESS:
                    still.append(req)
                    continue
                lib.ucp_request_free(req)
                if status != UCS_OK and error is None:
                    error = status
            if len(still) != len(pending):
                idle = 0
                last = time.monotonic()
            pending = still
            if not pending or error is not None:
                break
            if endpoint is not None and endpoint.failed() is not None:
                error = endpoint.failed()
                break
            if lib.ucp_worker_progress(self.handle):
                continue
            idle += 1
            if idle > 64:  # nothing moves (TCP waiting on the peer): watch the clock, yield
                if time.monotonic() - last > stall_timeout:
                    error = UCS_ERR_TIMED_OUT
                    break
                if idle > 1024:
                    time.sleep(20e-6)
        self.abandon(pending)
        if error is not None:
            raise UcxError("ucp request", error)

    def abandon(self, requests: list[int]) -> None:
        """Hand requests still in flight to UCX, which frees each when it completes."""
        for req in requests:
            if req:
                self.lib.ucp_request_free(req)

    def close(self) -> None:
        if self.handle:
            self.lib.ucp_worker_destroy(self.handle)
            self.handle = None


class Endpoint:
    """An endpoint to one peer worker: RMA puts and gets with its remote keys."""

    def __init__(self, worker: Worker, handle: int) -> None:
        self.worker = worker
        self.lib = worker.lib
        self.handle = handle

    def failed(self) -> int | None:
        """The error status UCX reported for this endpoint (a dead peer), if any."""
        return self.worker._failed.get(self.handle)

    def unpack_rkey(self, packed: bytes) -> "RemoteKey":
        rkey = c_void_p()
        _check("ucp_ep_rkey_unpack", self.lib.ucp_ep_rkey_unpack(self.handle, packed, byref(rkey)))
        return RemoteKey(self.lib, rkey.value)

    @staticmethod
    def _param(memh: int | None) -> _RequestParam:
        param = _RequestParam()
        param.op_attr_mask = UCP_OP_ATTR_FIELD_MEMORY_TYPE
        param.memory_type = UCS_MEMORY_TYPE_HOST
        if memh:
            param.op_attr_mask |= UCP_OP_ATTR_FIELD_MEMH
            param.memh = memh
        return param

    def _issue(self, what: str, ptr: int | None) -> int:
        status = _ptr_status(ptr)
        if status is None:
            return 0
        if status == UCS_INPROGRESS:
            return ptr
        raise UcxError(what, status)

    def put(self, address: int, length: int, remote_address: int, rkey: "RemoteKey",
            memh: int | None = None) -> int:
        """Start a put of ``length`` bytes at ``address`` to ``remote_address``. Returns a
        request for :meth:`Worker.wait` (0 when already complete). Remote completion needs
        :meth:`flush`."""
        return self._issue("ucp_put_nbx", self.lib.ucp_put_nbx(
            self.handle, address, length, remote_address, rkey.handle, byref(self._param(memh))))

    def get(self, address: int, length: int, remote_address: int, rkey: "RemoteKey",
            memh: int | None = None) -> int:
        """Start a get of ``length`` bytes at ``remote_address`` into ``address``."""
        return self._issue("ucp_get_nbx", self.lib.ucp_get_nbx(
            self.handle, address, length, remote_address, rkey.handle, byref(self._param(memh))))

    def flush(self) -> int:
        """Start a flush: complete when every put so far is complete at the peer."""
        param = _RequestParam()
        return self._issue("ucp_ep_flush_nbx", self.lib.ucp_ep_flush_nbx(self.handle, byref(param)))

    def info(self) -> str:
        """UCX's description of the endpoint (ucp_ep_print_info): its lanes and transports."""
        libc = _libc
        buf, size = c_void_p(), c_size_t()
        stream = libc.open_memstream(byref(buf), byref(size))
        if not stream:
            return ""
        try:
            self.lib.ucp_ep_print_info(self.handle, stream)
        finally:
            libc.fclose(stream)
        try:
            return ctypes.string_at(buf.value, size.value).decode(errors="replace")
        finally:
            libc.free(buf)

    def close(self, *, force: bool = False, timeout: float = 1.0) -> None:
        """Close the endpoint: flush and disconnect, or with ``force`` drop it at once
        (outstanding requests complete with an error). Bounded by ``timeout``."""
        if not self.handle:
            return
        param = _RequestParam()
        if force:
            param.op_attr_mask = UCP_OP_ATTR_FIELD_FLAGS
            param.flags = UCP_EP_CLOSE_FLAG_FORCE
        ptr = self.lib.ucp_ep_close_nbx(self.handle, byref(param))
        handle, self.handle = self.handle, None
        self.worker._failed.pop(handle, None)
        if _ptr_status(ptr) == UCS_INPROGRESS:
            deadline = time.monotonic() + timeout
            while self.lib.ucp_request_check_status(ptr) == UCS_INPROGRESS:
                if not self.lib.ucp_worker_progress(self.worker.handle):
                    if time.monotonic() > deadline:
                        break
                    time.sleep(50e-6)
            self.lib.ucp_request_free(ptr)


class RemoteKey:
    """An unpacked remote key (valid with the endpoint that unpacked it)."""

    def __init__(self, lib: ctypes.CDLL, handle: int) -> None:
        self.lib = lib
        self.handle = handle

    def destroy(self) -> None:
        if self.handle:
            self.lib.ucp_rkey_destroy(self.handle)
            self.handle = None
