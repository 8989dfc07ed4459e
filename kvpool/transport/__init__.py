"""Data-plane transports behind one interface: shared memory and CUDA IPC on the node's host,
TCP and one-sided UCX across hosts (see :mod:`kvpool.transport.base`)."""

from kvpool.transport.base import Access, Share, Transport, TransportCaps, TransportFactory, TransportOptions
from kvpool.transport.endpoint import NodeEndpoint

__all__ = ["Access", "NodeEndpoint", "Share", "Transport", "TransportCaps", "TransportFactory", "TransportOptions"]
