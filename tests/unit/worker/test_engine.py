"""The engine's exactness claim, checked bit for bit (see kvpool/worker/engine.py)."""

import pytest

torch = pytest.importorskip("torch")

from kvpool.worker import Engine, LlamaModel  # noqa: E402


@pytest.fixture(scope="module")
def engine():
    return Engine(LlamaModel.seeded("tiny", seed=0), capacity_tokens=4096)


def prompt(n, seed):
    return torch.randint(0, 512, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cache_bits(engine, seq, blocks):
    return engine.export(seq, 0, blocks).view(torch.int32)


@pytest.mark.parametrize("length", [17, 32, 45, 64])
def test_prefix_from_cache_gives_the_same_bits_as_a_cold_prefill(engine, length):
    toks = prompt(length, seed=length)
    cold = engine.add(("cold", length), toks)
    engine.prefill([cold])
    blocks = engine.full_blocks(cold)
    hit = engine.usable_hit(cold, blocks)
    # A second sequence gets the first `hit` blocks as a pool would deliver them.
    warm = engine.add(("warm", length), toks)
    engine.load(warm, engine.export(cold, 0, hit).clone())
    assert warm.cached == hit * 16
    engine.prefill([warm])
    assert warm.generated == cold.generated
    assert torch.equal(cache_bits(engine, warm, blocks), cache_bits(engine, cold, blocks))
    for _ in range(5):
        engine.decode([cold, warm])
    assert warm.generated == cold.generated
    engine.free(cold)
    engine.free(warm)


def test_batching_changes_no_bit(engine):
    a, b = prompt(40, 1), prompt(23, 2)
    alone = [engine.generate(a, 6, "a"), engine.generate(b, 6, "b")]
    sa, sb = engine.add("A", a, reserve=6), engine.add("B", b, reserve=6)
    engine.prefill([sa, sb])
    for _ in range(5):
        engine.decode([sa, sb])
    assert [sa.generated, sb.generated] == alone
    engine.free(sa)
    engine.free(sb)


def test_misaligned_cached_prefix_is_refused(engine):
    s = engine.add("odd", prompt(40, 3))
    s.cached = 5
    with pytest.raises(ValueError, match="whole number"):
        engine.prefill([s])
    engine.free(s)


def test_prompt_of_tokens_outside_the_vocabulary_is_refused(engine):
    with pytest.raises(ValueError, match=r"\[0, 512\)"):
        engine.add("bad", [1, 512])


def test_triton_kernels_under_the_interpreter_agree_with_the_reference():
    """One small run of the Triton prefill and copy kernels in the interpreter (the suite
    sets TRITON_INTERPRET=1 without CUDA). Different kernels round differently, so this
    compares greedy tokens and cache values within float32 tolerance, not bits."""
    pytest.importorskip("triton")
    import os

    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU tensors needs TRITON_INTERPRET=1 before triton is imported "
                    "(the suite sets it without CUDA; tests/gpu runs the compiled kernels)")
    model = LlamaModel.seeded("tiny", seed=5)
    ref, tri = Engine(model, 256, kernels="torch"), Engine(model, 256, kernels="triton")
    toks = prompt(37, 9)
    sr, st = ref.add("s", toks), tri.add("s", toks)
    assert ref.prefill([sr]) == tri.prefill([st])
    torch.testing.assert_close(tri.export(st, 0, 2), ref.export(sr, 0, 2), rtol=1e-5, atol=1e-5)
