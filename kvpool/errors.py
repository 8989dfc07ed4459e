"""The kvpool exception tree. Servers raise these; the client maps gRPC statuses back to them.

::

    KvpoolError
    ├── InvalidArgument        INVALID_ARGUMENT     bad keys, sizes, batches, layouts
    ├── NotFound               NOT_FOUND            unknown namespace, key, grant or lease
    │   └── BlockNotFound                           a requested block is absent
    ├── FailedPrecondition     FAILED_PRECONDITION  grant expired, commit out of order
    │   └── LeaseExpired                            a read outlived its lease: its bytes are not trusted
    ├── PoolFull               RESOURCE_EXHAUSTED   nothing evictable is left to make room
    ├── Unavailable            UNAVAILABLE          a node or the master is gone
    ├── Unauthenticated        UNAUTHENTICATED      no bearer token, or an unknown one
    ├── PermissionDenied       PERMISSION_DENIED    the token's role may not do this
    ├── IntegrityError         DATA_LOSS            a block failed its checksum
    └── InternalError          INTERNAL             a bug: please report it

Every message says what was wrong and what to do about it.
"""

from __future__ import annotations

import grpc

__all__ = [
    "KvpoolError",
    "InvalidArgument",
    "NotFound",
    "BlockNotFound",
    "FailedPrecondition",
    "LeaseExpired",
    "PoolFull",
    "Unavailable",
    "Unauthenticated",
    "PermissionDenied",
    "IntegrityError",
    "InternalError",
    "from_status",
]


class KvpoolError(Exception):
    """Base of every kvpool error. ``code`` is the gRPC status the error travels as."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN


class InvalidArgument(KvpoolError, ValueError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFound(KvpoolError, LookupError):
    code = grpc.StatusCode.NOT_FOUND


class BlockNotFound(NotFound):
    """A requested block is not in the pool (never put, evicted, removed or corrupt)."""


class FailedPrecondition(KvpoolError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class LeaseExpired(FailedPrecondition):
    """Raised by the client itself: a read finished after its lease ended, so the master may
    have freed or reused the slots while it copied. The bytes read are not returned."""


class PoolFull(KvpoolError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(KvpoolError, ConnectionError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(KvpoolError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(KvpoolError):
    code = grpc.StatusCode.PERMISSION_DENIED


class IntegrityError(KvpoolError):
    code = grpc.StatusCode.DATA_LOSS


class InternalError(KvpoolError):
    code = grpc.StatusCode.INTERNAL


_BY_CODE = {
    cls.code: cls
    for cls in (
        InvalidArgument,
        NotFound,
        FailedPrecondition,
        PoolFull,
        Unavailable,
        Unauthenticated,
        PermissionDenied,
        IntegrityError,
        InternalError,
    )
}
_BY_CODE[grpc.StatusCode.DEADLINE_EXCEEDED] = Unavailable


def from_status(code: grpc.StatusCode, details: str | None) -> KvpoolError:
    """The exception for a gRPC status received by a client."""
    cls = _BY_CODE.get(code, KvpoolError)
    return cls(details or code.name)
