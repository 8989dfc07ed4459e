"""The data plane: how a client moves block bytes to and from a node, never via the master.

A :class:`Transport` reaches one node's memory. It is told where blocks are (location
records from the master) and copies bytes between those slots and caller buffers.
Transports declare what they can do as :class:`TransportCaps` flags; the client picks the
first transport, in its preference order, that the node offers and that can reach it.

Protocol of one batch:

* put: ``write(records, sources)`` copies each source into its granted slot. The client
  commits only after every write of the batch returned.
* get: ``read(records, outs)`` copies each slot into its destination while the client holds
  the read lease that pins those slots.

Sources and destinations are flat uint8 views: numpy arrays for host memory, or CUDA
tensors where the transport declares ``DEVICE_BUFFERS``. A transport returns only when its
copies are complete (device copies included), so a commit never races a copy.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

__all__ = ["Transport", "TransportCaps"]


class TransportCaps(enum.Flag):
    NONE = 0
    #: Copies land directly in the node's memory (no intermediate buffer).
    ZERO_COPY = enum.auto()
    #: Works only when client and node share a host.
    SAME_HOST = enum.auto()
    #: Bytes cross a network, so reads verify checksums.
    NETWORK = enum.auto()
    #: Accepts CUDA tensors as sources and destinations (DMA, no host staging by the caller).
    DEVICE_BUFFERS = enum.auto()


class Transport(ABC):
    #: Name in a node endpoint's ``transports`` map.
    name: str = ""
    caps: TransportCaps = TransportCaps.NONE

    @abstractmethod
    def write(self, records: np.ndarray, sources: Sequence[np.ndarray]) -> None:
        """Copy ``sources[i]`` into the slot of ``records[i]``."""

    @abstractmethod
    def read(self, records: np.ndarray, outs: Sequence[np.ndarray]) -> None:
        """Copy the slot of ``records[i]`` into ``outs[i]``."""

    def host_view(self, record) -> np.ndarray | None:
        """The slot's bytes as host memory the client can read (for checksums), if any."""
        return None

    def close(self) -> None:
        pass
