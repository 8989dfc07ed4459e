"""Requests that do not parse, floods of them, and oversized messages, against a real server."""

from __future__ import annotations

import os
import time

import grpc
import numpy as np

from kvpool import Client
from kvpool.rpc.v1 import pool_pb2
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for
from tests.integration.rpc_helpers import status_of


def _vm_hwm_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def test_a_body_that_does_not_parse_is_invalid_argument_and_logged_once_per_interval(serve_factory):
    sp = serve_factory()
    ns = fresh_namespace()
    keys, data = [os.urandom(16)], random_blocks(1)
    with Client(sp.address, ns) as c:
        c.put_blocks(keys, data)
    with grpc.insecure_channel(sp.address) as ch:
        lookup = ch.unary_unary("/kvpool.v1.KVPool/Lookup")
        for _ in range(300):
            code, msg = status_of(lookup, b"\xff\xff\xff garbage")
            assert code == grpc.StatusCode.INVALID_ARGUMENT
            assert "does not parse as this method's message" in msg
        code, _ = status_of(ch.unary_unary("/kvpool.v1.Admin/Stats"), b"\x0a\xff")
        assert code == grpc.StatusCode.INVALID_ARGUMENT
    # 301 refusals, 2 methods: one line each (the interval is 10 s), no tracebacks.
    assert wait_for(lambda: sum("malformed request refused" in line for line in sp.lines) == 2)
    assert not any("Traceback" in line for line in sp.lines)
    with Client(sp.address, ns) as c:
        assert np.array_equal(c.get_blocks(keys)[0], data[0])


def test_an_oversized_message_is_refused_before_it_is_read(serve_factory):
    sp = serve_factory("--max-message-bytes", "1MiB")
    ns = fresh_namespace()
    keys, data = [os.urandom(16)], random_blocks(1)
    with Client(sp.address, ns) as c:
        c.put_blocks(keys, data)
        c.lookup(keys)
    before = _vm_hwm_kib(sp.proc.pid)
    big = pool_pb2.LookupRequest(namespace_id=ns.id, keys=os.urandom(16 * 6 * 2**20))  # 96 MiB
    with grpc.insecure_channel(sp.address, options=[("grpc.max_send_message_length", -1)]) as ch:
        start = time.monotonic()
        code, msg = status_of(ch.unary_unary("/kvpool.v1.KVPool/Lookup"), big.SerializeToString())
        took = time.monotonic() - start
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED, (code, msg)
    assert "1048576" in msg  # names the limit
    # The server never held the 96 MiB body: its peak memory grew by far less than that.
    grown_mib = (_vm_hwm_kib(sp.proc.pid) - before) / 1024
    assert grown_mib < 32, (grown_mib, took)
    with Client(sp.address, ns) as c:
        assert np.array_equal(c.get_blocks(keys)[0], data[0])
