"""TransportFactory: the choice among transports follows capability flags and reachability,
per node, with state kept per node and dropped when the node goes. Real transports to a real
node (shared memory and its TCP data server), no stand-ins."""

from __future__ import annotations

import dataclasses

import pytest

from kvpool.errors import Unavailable
from kvpool.node.node import Node
from kvpool.transport.base import TransportCaps, TransportFactory, rank
from kvpool.transport.cuda_ipc import CudaIpcTransport
from kvpool.transport.shm import ShmTransport
from kvpool.transport.tcp import TcpTransport

CLASSES = (CudaIpcTransport, TcpTransport, ShmTransport)  # order given does not matter


@pytest.fixture
def node():
    n = Node.with_dram(1, "n1", 4 << 20, chunk_bytes=1 << 20, prefault=False)
    n.serve_data("127.0.0.1", 0)
    yield n
    n.close()


def test_same_host_prefers_shared_memory(node):
    f = TransportFactory(CLASSES)
    try:
        assert isinstance(f.get(node.endpoint(), "dram"), ShmTransport)
        assert f.get(node.endpoint(), "dram") is f.get(node.endpoint(), "dram")  # kept per node
    finally:
        f.close()


def test_another_host_gets_tcp_and_force_overrides(node):
    remote = dataclasses.replace(node.endpoint(), host_id="elsewhere/boot")
    f = TransportFactory(CLASSES)
    forced = TransportFactory(CLASSES, force="tcp")
    try:
        assert isinstance(f.get(remote, "dram"), TcpTransport)
        assert isinstance(forced.get(node.endpoint(), "dram"), TcpTransport)
        assert forced.open_kinds() == {1: "tcp"}
        forced.drop_node(1)
        assert forced.open_kinds() == {}
    finally:
        f.close()
        forced.close()


def test_ranking_is_by_capability():
    assert rank(ShmTransport.caps) < rank(TcpTransport.caps)
    assert rank(TransportCaps.NETWORK | TransportCaps.ONE_SIDED) < rank(TcpTransport.caps)


def test_unreachable_node_says_why(node):
    bare = dataclasses.replace(node.endpoint(), host_id="elsewhere/boot", tcp_address="")
    with pytest.raises(Unavailable, match="offers shm.dram.*need the client on the node's host") as info:
        TransportFactory(CLASSES).get(bare, "dram")
    assert info.value.node_ids == [1]
    with pytest.raises(ValueError, match="unknown transport 'rdma'"):
        TransportFactory(CLASSES, force="rdma")


def test_idle_transports_are_closed(node):
    now = [0.0]
    f = TransportFactory(CLASSES, idle_s=10, clock=lambda: now[0])  # a clock: nothing a user runs
    f.get(node.endpoint(), "dram")
    now[0] = 11.0
    f.drop_idle()
    assert f.open_kinds() == {}
    # Nobody has to call drop_idle: getting any transport sweeps now and then.
    f.get(node.endpoint(), "dram")
    gone = dataclasses.replace(node.endpoint(), node_id=2)
    f.get(gone, "dram")
    now[0] = 30.0
    f.get(node.endpoint(), "dram")
    assert f.open_kinds() == {1: "shm"}
