"""Disaggregated prefill and decode, token for token, with real processes and a real pool.

A `kvpool serve`, a prefill worker and a decode worker (and a colocated worker) run as
separate processes of `python -m kvpool.worker`; the router runs in the test. Every output
is compared with generating the whole request in this process (``Engine.generate``): the
engine's docstring says why they must be identical, not merely close.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")

from kvpool.worker import Engine, LlamaModel  # noqa: E402
from kvpool.worker.launch import start_worker  # noqa: E402
from kvpool.worker.router import Router, WorkerError  # noqa: E402
from tests.conftest import start_serve  # noqa: E402

MODEL = ["--model", "tiny", "--seed", "7", "--cache-tokens", "8192"]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    pool = start_serve(tmp_path_factory.mktemp("pool"))
    args = ["--pool", pool.address, *MODEL]
    procs = {}
    try:
        procs["prefill"] = start_worker("prefill", *args)
        procs["decode"] = start_worker("decode", *args)
        procs["colocated"] = start_worker("colocated", *MODEL)
        yield {k: p.address for k, p in procs.items()}
    finally:
        for p in procs.values():
            p.stop()
        pool.stop()


@pytest.fixture(scope="module")
def reference():
    engine = Engine(LlamaModel.seeded("tiny", seed=7), capacity_tokens=8192)
    return lambda tokens: engine.generate(tokens, MAX_TOKENS)


def prompt(n: int, seed: int) -> list[int]:
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def run(addresses: dict, prompts: list[list[int]], colocated: bool = False):
    async def go():
        router = (Router(colocated=[addresses["colocated"]]) if colocated
                  else Router(prefill=[addresses["prefill"]], decode=[addresses["decode"]]))
        async with router:
            return await asyncio.gather(*(router.submit(p, MAX_TOKENS) for p in prompts))

    return asyncio.run(go())


# Ragged ends and block-aligned ends (block_tokens is 16 for tiny), one token to several blocks.
LENGTHS = [1, 15, 16, 33, 48, 70]


def test_disaggregated_output_is_that_of_one_process(deployment, reference):
    prompts = [prompt(n, seed=100 + n) for n in LENGTHS]
    results = run(deployment, prompts)  # all at once: the workers batch them
    for n, p, r in zip(LENGTHS, prompts, results):
        assert r.tokens == reference(p), f"prompt of {n} tokens"
        assert r.first_token == r.tokens[0]
        assert r.prefill["hit_tokens"] == 0 and r.prefill["computed_tokens"] == n
        # The decode worker took every full block from the pool and computed only the rest.
        assert r.decode["hit_tokens"] == n // 16 * 16
        assert r.decode["computed_tokens"] == n % 16


def test_colocated_worker_matches_too(deployment, reference):
    prompts = [prompt(n, seed=200 + n) for n in (16, 37)]
    for p, r in zip(prompts, run(deployment, prompts, colocated=True)):
        assert r.tokens == reference(p)


def test_prefix_from_the_pool_changes_no_token(deployment, reference):
    system = prompt(40, seed=300)
    first = run(deployment, [system])[0]
    # The next turn extends the last: prompt + answer + a new message (ragged end).
    turn = system + first.tokens + prompt(21, seed=301)
    # And a prompt that is the cached 48 tokens exactly (aligned end).
    aligned = system + first.tokens[:2] + prompt(6, seed=302)
    for p in (turn, aligned):
        r = run(deployment, [p])[0]
        assert r.prefill["hit_tokens"] == 32, r.prefill  # the system prompt's two full blocks
        assert r.prefill["computed_tokens"] == len(p) - 32
        assert r.tokens == reference(p)
    # Now all 48 tokens of `aligned` are cached: the last block is still computed, since its
    # last token's logits are the first output token.
    r = run(deployment, [aligned])[0]
    assert (r.prefill["hit_tokens"], r.prefill["computed_tokens"]) == (32, 16)
    assert r.tokens == reference(aligned)


def test_a_bad_request_fails_alone(deployment, reference):
    good = prompt(20, seed=400)

    async def go():
        async with Router(prefill=[deployment["prefill"]], decode=[deployment["decode"]]) as router:
            bad = asyncio.ensure_future(router.submit([1, 2, 99999], MAX_TOKENS))
            ok = asyncio.ensure_future(router.submit(good, MAX_TOKENS))
            with pytest.raises(WorkerError, match=r"token ids must be in \[0, 512\)"):
                await bad
            return (await ok).tokens

    assert asyncio.run(go()) == reference(good)


def test_two_routers_at_once_share_the_workers(deployment, reference):
    """Request ids are per router; the workers keep the sequences of two routers apart."""
    prompts = [prompt(n, seed=500 + n) for n in (30, 50)]

    async def one(p):
        async with Router(prefill=[deployment["prefill"]], decode=[deployment["decode"]]) as router:
            return (await router.submit(p, MAX_TOKENS)).tokens

    async def both():
        return await asyncio.gather(*(one(p) for p in prompts))

    assert asyncio.run(both()) == [reference(p) for p in prompts]


def test_a_pool_too_small_to_publish_into_changes_no_token(tmp_path, reference):
    """Publishing fails (PoolFull: the prompt's blocks exceed the whole pool); the request
    still completes, the decode worker computing what it could not fetch."""
    pool = start_serve(tmp_path, "--dram", "256KiB", "--slab-bytes", "256KiB")  # 32 blocks of tiny
    procs = []
    try:
        procs = [start_worker(role, "--pool", pool.address, *MODEL) for role in ("prefill", "decode")]
        p = prompt(16 * 33 + 5, seed=600)

        async def go():
            async with Router(prefill=[procs[0].address], decode=[procs[1].address]) as router:
                return await router.submit(p, MAX_TOKENS)

        r = asyncio.run(go())
    finally:
        for w in procs:
            w.stop()
        pool.stop()
    assert r.prefill["publish_error"].startswith("PoolFull")
    assert (r.decode["hit_tokens"], r.decode["computed_tokens"]) == (0, len(p))
    assert r.tokens == reference(p)
