"""Raw gRPC access for tests that must send what the client would never send."""

from __future__ import annotations

import contextlib

import grpc

from kvpool.client.async_client import namespace_to_proto
from kvpool.rpc.v1 import admin_pb2_grpc, pool_pb2, pool_pb2_grpc


@contextlib.contextmanager
def stubs(address: str):
    channel = grpc.insecure_channel(address)
    try:
        yield pool_pb2_grpc.KVPoolStub(channel), admin_pb2_grpc.AdminStub(channel)
    finally:
        channel.close()


def register(pool, ns) -> str:
    return pool.RegisterNamespace(pool_pb2.RegisterNamespaceRequest(namespace=namespace_to_proto(ns))).namespace_id


def status_of(call, *args, **kwargs) -> tuple[grpc.StatusCode, str]:
    """The status code and message an RPC fails with (OK and '' if it succeeds)."""
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""
