"""Data-plane transports (shared memory now; TCP and UCX behind the same interface)."""

from kvpool.transport.base import Transport, TransportCaps

__all__ = ["Transport", "TransportCaps"]
