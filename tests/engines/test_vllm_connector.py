"""KVPoolConnector through vLLM's real KVConnectorFactory and real Scheduler, against a real pool.

Each "engine" is vLLM's Scheduler plus a worker-role connector over CPU tensors in vLLM's CPU
cache layout (tests/engines/vllm_harness.py); a second engine with the same config stands for
another vLLM process: it shares nothing with the first but the pool.
"""

from __future__ import annotations

import signal
import time

import pytest
from vllm.distributed.kv_events import BlockStored
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from kvpool import Client, KVLayout, Namespace
from kvpool.integrations.vllm import KVPoolConnector
from tests.engines.vllm_harness import (BLOCK, DIM, HEADS, LAYERS, Engine, kv_cache_config, kv_transfer_config,
                                        make_config, make_request, token_kv)

PROMPT = [(7 * i + 3) % 500 + 3 for i in range(70)]  # 4 full blocks keyable (the 70th token is computed)


def pool_namespace(salt: str = "") -> Namespace:
    return Namespace("tiny-llama", KVLayout(LAYERS, HEADS, DIM, "float32", BLOCK, "kv"), salt=salt)


def engine(pool, tiny_llama, role="kv_both", step_tokens=512, **extra) -> Engine:
    return Engine(make_config(tiny_llama, kv_transfer_config(pool.address, role, **extra), step_tokens))


def assert_blocks_hold(worker, req_id, tokens, n_blocks):
    """The worker's cache holds, for the first n_blocks of the request, the KV computing gives."""
    for pos in range(n_blocks * BLOCK):
        block = worker.blocks[req_id][pos // BLOCK]
        for layer in range(LAYERS):
            assert worker.kv_at(layer, block, pos % BLOCK).equal(token_kv(tokens[pos], pos, layer)), (pos, layer)


def test_factory_builds_both_roles_and_refuses_a_foreign_block_size(pool, tiny_llama):
    vc = make_config(tiny_llama, kv_transfer_config(pool.address))
    for role in (KVConnectorRole.SCHEDULER, KVConnectorRole.WORKER):
        c = KVConnectorFactory.create_connector(vc, role, kv_cache_config())
        assert type(c) is KVPoolConnector and c.role is role
        c.shutdown()
    bad = make_config(tiny_llama, kv_transfer_config(pool.address, block_tokens=32))
    with pytest.raises(ValueError, match="block_tokens=32 differs from vLLM's block_size=16"):
        KVConnectorFactory.create_connector(bad, KVConnectorRole.SCHEDULER, kv_cache_config())


def test_miss_publishes_then_another_engine_loads(pool, tiny_llama):
    a = engine(pool, tiny_llama)
    a.scheduler.add_request(make_request("a", PROMPT))
    so = a.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0  # a miss: nothing in the pool yet
    a.run_until_idle()
    assert a.worker.stats["blocks_saved"] == 4  # 71 tokens computed: 4 full blocks published
    stored = [e for e in a.events if isinstance(e, BlockStored) and e.medium == "kvpool"]
    keys = pool_namespace().keys(PROMPT)
    assert [k for e in stored for k in e.block_hashes] == keys[:4]
    assert not a.scheduler.requests  # nothing kept a finished request alive
    with Client(pool.address, pool_namespace()) as c:
        assert c.lookup(keys) == 4

    b = engine(pool, tiny_llama)  # a second engine: empty prefix cache
    b.scheduler.add_request(make_request("b", PROMPT + list(range(11, 23))))
    so = b.step()
    assert so.scheduled_new_reqs[0].num_computed_tokens == 4 * BLOCK  # loaded, not computed
    assert so.num_scheduled_tokens["b"] == len(PROMPT) + 12 - 4 * BLOCK
    assert b.worker.stats["blocks_loaded"] == 4 and not b.worker.load_errors
    assert_blocks_hold(b.worker, "b", PROMPT, 4)
    b.run_until_idle()
    # b had 4 blocks from the pool; it publishes only the block it computed itself
    assert b.worker.stats["blocks_saved"] == 1
    a.close()
    b.close()


def test_cache_salt_separates_tenants_of_one_model(pool, tiny_llama):
    a = engine(pool, tiny_llama)
    prompt = [p + 1 for p in PROMPT]
    a.scheduler.add_request(make_request("s1", prompt, salt="alice"))
    a.run_until_idle()
    b = engine(pool, tiny_llama)
    b.scheduler.add_request(make_request("s2", prompt, salt="bob"))
    b.scheduler.add_request(make_request("s3", prompt, salt="alice"))
    so = b.step()
    computed = {n.req_id: n.num_computed_tokens for n in so.scheduled_new_reqs}
    assert computed["s2"] == 0 and computed["s3"] == 4 * BLOCK
    a.close()
    b.close()


def test_lookup_in_flight_defers_the_request_then_hits(pool, tiny_llama):
    prompt = [p + 2 for p in PROMPT]
    a = engine(pool, tiny_llama)
    a.scheduler.add_request(make_request("p", prompt))
    a.run_until_idle()
    b = engine(pool, tiny_llama, lookup_wait_ms=0)  # never wait: always "ask again later" first
    b.scheduler.add_request(make_request("q", prompt))
    first = b.step()
    assert first.scheduled_new_reqs == [] and first.total_num_scheduled_tokens == 0
    for _ in range(500):  # the engine keeps stepping; the request waits until the answer is in
        so = b.step()
        if so.scheduled_new_reqs:
            break
        time.sleep(0.01)
    assert so.scheduled_new_reqs[0].num_computed_tokens == 4 * BLOCK
    assert_blocks_hold(b.worker, "q", prompt, 4)
    a.close()
    b.close()


@pytest.mark.parametrize("removed", [4, 2])
def test_blocks_gone_before_the_load_are_recomputed(pool, tiny_llama, removed):
    prompt = [p + 10 + removed for p in PROMPT]
    a = engine(pool, tiny_llama)
    a.scheduler.add_request(make_request("w", prompt))
    a.run_until_idle()
    b = engine(pool, tiny_llama)
    b.scheduler.add_request(make_request("r", prompt))
    so = b.scheduler.schedule()  # the Lookup saw 4 blocks...
    assert so.scheduled_new_reqs[0].num_computed_tokens == 4 * BLOCK
    keys = pool_namespace().keys(prompt)[:4]
    with Client(pool.address, pool_namespace()) as c:  # ...then the pool loses some before the load
        assert c.remove(keys[4 - removed:]) == removed
    out = b.worker.run(so, b.scheduler.requests)
    assert len(out.kv_connector_output.invalid_block_ids) == removed
    b.scheduler.update_from_output(so, out)
    request = b.scheduler.requests["r"]
    assert request.num_computed_tokens == (4 - removed) * BLOCK  # rolled back to the valid prefix
    b.run_until_idle()  # vLLM recomputes the lost blocks (the worker writes real KV into them)
    assert_blocks_hold(b.worker, "r", prompt, 4)
    assert b.worker.stats["blocks_load_failed"] == removed
    with Client(pool.address, pool_namespace()) as c:  # and publishes them again when r finishes
        assert c.lookup(keys) == 4
    a.close()
    b.close()


def test_producer_only_publishes_and_consumer_only_loads(pool, tiny_llama):
    prompt = [p + 40 for p in PROMPT]
    consumer = engine(pool, tiny_llama, role="kv_consumer")
    consumer.scheduler.add_request(make_request("c1", prompt))
    consumer.run_until_idle()
    assert consumer.worker.stats.get("blocks_saved", 0) == 0
    producer = engine(pool, tiny_llama, role="kv_producer")
    producer.scheduler.add_request(make_request("p1", prompt, max_tokens=1))
    producer.run_until_idle()
    assert producer.worker.stats["blocks_saved"] == 4
    assert producer.scheduler.reset_prefix_cache()  # no local hit either
    producer.scheduler.add_request(make_request("p2", prompt, max_tokens=1))
    assert producer.step().scheduled_new_reqs[0].num_computed_tokens == 0  # a producer never loads
    consumer.scheduler.add_request(make_request("c2", prompt))
    assert consumer.step().scheduled_new_reqs[0].num_computed_tokens == 4 * BLOCK
    consumer.close()
    producer.close()


def test_finish_save_runs_off_the_step_and_keeps_the_blocks_until_get_finished(pool, tiny_llama):
    """The pool stops answering (SIGSTOP) right after the Lookup: the request still finishes and
    the engine keeps stepping, while vLLM holds the request's blocks for the publish in flight."""
    prompt = [p + 60 for p in PROMPT]
    a = engine(pool, tiny_llama)
    a.scheduler.add_request(make_request("h", prompt, max_tokens=1))
    so = a.scheduler.schedule()  # the Lookup (a miss) needs the pool
    assert so.scheduled_new_reqs[0].num_computed_tokens == 0
    block_ids = list(so.scheduled_new_reqs[0].block_ids[0])
    free_before = a.scheduler.kv_cache_manager.block_pool.get_num_free_blocks()
    pool.proc.send_signal(signal.SIGSTOP)
    try:
        a.scheduler.update_from_output(so, a.worker.run(so, a.scheduler.requests))
        request = a.scheduler.requests["h"]  # finished (max_tokens=1) but held for the publish
        assert request.is_finished() and a.scheduler.connector.has_pending_push_work()
        started = time.monotonic()
        for _ in range(5):  # empty steps hand the finish save over and return at once
            a.step()
        assert time.monotonic() - started < 5  # a put against a stopped pool would block 30 s
        assert "h" in a.scheduler.requests and a.scheduler.has_requests()
        assert a.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() == free_before
        assert all(a.scheduler.kv_cache_manager.block_pool.blocks[b].ref_cnt > 0 for b in block_ids)
        assert a.worker.stats.get("blocks_saved", 0) == 0
    finally:
        pool.proc.send_signal(signal.SIGCONT)
    a.run_until_idle()  # the publish completes; get_finished names "h"; vLLM frees its blocks
    assert "h" not in a.scheduler.requests and not a.scheduler.connector.has_pending_push_work()
    assert a.scheduler.kv_cache_manager.block_pool.get_num_free_blocks() > free_before
    assert a.worker.stats["blocks_saved"] == 4
    keys = pool_namespace().keys(prompt)
    assert [k for e in a.events if isinstance(e, BlockStored) for k in e.block_hashes] == keys[:4]
    b = engine(pool, tiny_llama)  # and what was published is the request's KV
    b.scheduler.add_request(make_request("h2", prompt))
    assert b.step().scheduled_new_reqs[0].num_computed_tokens == 4 * BLOCK
    assert_blocks_hold(b.worker, "h2", prompt, 4)
    a.close()
    b.close()


def test_prefill_chunks_save_at_once_and_the_last_at_finish(pool, tiny_llama):
    """A prompt longer than one step's token budget (128): each chunk that does not end the
    prompt has its blocks copied out in its step (the request certainly goes on); the last
    chunk's blocks go by the finish save."""
    prompt = [(11 * i + 5) % 500 + 3 for i in range(300)]
    a = engine(pool, tiny_llama, step_tokens=128)
    a.scheduler.add_request(make_request("long", prompt, max_tokens=1))
    so = a.step()
    assert so.num_scheduled_tokens["long"] == 128
    assert [(s.start, s.end) for s in so.kv_connector_metadata.saves] == [(0, 8)]
    so = a.step()
    assert [(s.start, s.end) for s in so.kv_connector_metadata.saves] == [(8, 16)]
    so = a.step()  # the last chunk (44 tokens) ends the prompt: nothing at once
    assert so.num_scheduled_tokens["long"] == 44 and not so.kv_connector_metadata.saves
    a.run_until_idle()
    assert a.worker.stats["blocks_saved"] == 300 // BLOCK
    b = engine(pool, tiny_llama)
    b.scheduler.add_request(make_request("long2", prompt))
    assert b.step().scheduled_new_reqs[0].num_computed_tokens == (299 // BLOCK) * BLOCK
    assert_blocks_hold(b.worker, "long2", prompt, 299 // BLOCK)
    a.close()
    b.close()
