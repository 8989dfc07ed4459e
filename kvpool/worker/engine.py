"""Engine: a model, its paged KV cache and its kernels, run in aligned chunks.

Why disaggregated output is token for token that of one process
---------------------------------------------------------------
Greedy decoding is exact only if every logit is bitwise the same, and floating-point sums
are not associative: a matrix product can round differently when it has more or fewer
rows (on this machine MKL does, for the same row, between batches of 1 and 300 rows). So
the engine never relies on "close enough". It makes every value the pool carries, and
every value computed after a cache hit, come from the same torch calls on the same
operands in every process:

1. **Aligned chunks.** Prefill runs in chunks that end at multiples of ``block_tokens``
   (the pool block size) or at the prompt's end. A pool hit is a whole number of blocks,
   so a prompt computed after a hit of ``k`` blocks runs exactly the chunks that a cold
   prefill runs from block ``k`` on; a chunk's rows and its matrix shapes never depend on
   how much of the prefix was cached.
2. **No mixing across sequences.** Each chunk's matrix products run on its rows alone, and
   the attention reference computes each sequence from fresh tensors of its own
   (``kvpool.kernels.prefix_attention_ref``), so batching requests together changes no bit.
   A decode step is a one-row chunk of its sequence.
3. **Bits, not values, cross the pool.** Blocks hold the cache's own dtype and move as
   raw bits (``paged_copy`` copies through integer views; the pool verifies checksums),
   so a fetched prefix is the publisher's KV, bit for bit, and the positions after it see
   exactly the keys and values a cold run computes.
4. **Only prefill publishes.** Generated tokens' KV (one-row decode chunks) never enters
   the pool, so a later prompt that contains them recomputes them as a prefill chunk, just
   as a cold run does.

The same dtype runs everywhere (float32 on the CPU), with the same torch build and
thread count (`torch.set_num_threads`), which makes each of those calls deterministic.
`tests/unit/worker/test_engine.py` checks the claim bit for bit, not only on tokens.
On a GPU the same holds for the Triton kernels, whose programs each read one sequence;
cuBLAS is deterministic for one shape on one device, which is what points 1 and 2 need.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from kvpool.identity import Namespace
from kvpool.worker.cache import PagedKVCache
from kvpool.worker.kernels import Kernels
from kvpool.worker.model import Chunk, LlamaModel

__all__ = ["Engine", "Sequence"]


@dataclass
class Sequence:
    """One request in a worker: ``tokens`` so far (prompt, then generated), and how many of
    them have K/V in the cache (``cached``)."""

    id: object
    tokens: list[int]
    cached: int = 0
    prompt_len: int = 0
    generated: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.prompt_len:
            self.prompt_len = len(self.tokens)


class Engine:
    def __init__(self, model: LlamaModel, capacity_tokens: int = 65536, kernels: str = "auto") -> None:
        self.model = model
        self.config = model.config
        self.block_tokens = model.config.block_tokens
        self.kernels = Kernels(kernels, model.device)
        self.cache = PagedKVCache(model.config, model.dtype_name, model.device, capacity_tokens, self.kernels)
        self.namespace = Namespace(model=f"{model.config.model_id}/{model.identity}",
                                   layout=self.cache.pool_layout)

    # -- sequences --------------------------------------------------------------------------

    def add(self, seq_id, tokens: list[int], reserve: int = 0) -> Sequence:
        """A new sequence, with cache reserved for its tokens and ``reserve`` more."""
        if not tokens:
            raise ValueError("a request needs at least one prompt token")
        vocab = self.config.vocab_size
        if min(tokens) < 0 or max(tokens) >= vocab:
            raise ValueError(f"token ids must be in [0, {vocab}) for model {self.config.name}")
        if len(tokens) + reserve > self.config.max_positions:
            raise ValueError(f"{len(tokens)} prompt + {reserve} new tokens exceed the model's "
                             f"{self.config.max_positions} positions")
        seq = Sequence(seq_id, list(tokens))
        self.cache.reserve(seq_id, len(tokens) + reserve)
        return seq

    def free(self, seq: Sequence) -> None:
        self.cache.release(seq.id)

    def full_blocks(self, seq: Sequence) -> int:
        """Pool blocks the prompt fills completely."""
        return seq.prompt_len // self.block_tokens

    def usable_hit(self, seq: Sequence, hit_blocks: int) -> int:
        """Blocks of a pool hit worth loading: the last prompt token is always computed,
        since its logits give the first output token."""
        return min(hit_blocks, (seq.prompt_len - 1) // self.block_tokens)

    def load(self, seq: Sequence, blocks) -> None:
        """Put fetched pool blocks (the sequence's first ``len(blocks)``) into the cache."""
        self.cache.import_blocks(seq.id, 0, blocks)
        seq.cached = blocks.shape[0] * self.block_tokens

    def export(self, seq: Sequence, first: int, last: int):
        """Pool blocks ``first .. last-1`` of the sequence, gathered from the cache."""
        return self.cache.export_blocks(seq.id, first, last - first)

    # -- compute ----------------------------------------------------------------------------

    def _attend(self, layer, q, k, v, starts, prefixes, table):
        return self.kernels.attention(q, k, v, self.cache.kv[layer], table, starts, prefixes,
                                      layout=self.cache.layout, validate=False)

    def _run(self, chunks: list[tuple[Sequence, int, int]]) -> list:
        for s, _, hi in chunks:
            self.cache.reserve(s.id, hi)  # a sequence grows into new blocks as it decodes
        width = max(self.cache.table_len(s.id) for s, _, _ in chunks)
        batch = [Chunk(s.tokens[lo:hi], lo, self.cache.block_row(s.id, width)) for s, lo, hi in chunks]
        logits = self.model.forward(batch, self._attend)
        for s, _, hi in chunks:
            s.cached = hi
        return logits

    def prefill(self, seqs: list[Sequence]) -> list[int]:
        """Compute every uncached prompt token, in aligned chunks, all sequences per step.

        Returns (and appends to each sequence) its first generated token.
        """
        import torch

        c = self.block_tokens
        for s in seqs:
            if s.cached % c:
                raise ValueError(f"sequence {s.id}: {s.cached} cached tokens is not a whole number of "
                                 f"{c}-token blocks; prefill chunks must stay aligned")
        first: dict[int, int] = {}
        pending = [s for s in seqs if s.cached < len(s.tokens)]
        while pending:
            chunks = [(s, s.cached, min((s.cached // c + 1) * c, len(s.tokens))) for s in pending]
            for (s, _, hi), row in zip(chunks, self._run(chunks)):
                if hi == len(s.tokens):
                    first[id(s)] = int(torch.argmax(row))
            pending = [s for s in pending if s.cached < len(s.tokens)]
        out = []
        for s in seqs:
            if id(s) not in first:
                raise ValueError(f"sequence {s.id} had nothing to compute: its last token must be uncached")
            s.tokens.append(first[id(s)])
            s.generated.append(first[id(s)])
            out.append(first[id(s)])
        return out

    def decode(self, seqs: list[Sequence]) -> list[int]:
        """One greedy step for each sequence: its last token in, the next token out."""
        import torch

        for s in seqs:
            if s.cached != len(s.tokens) - 1:
                raise ValueError(f"sequence {s.id}: decode needs exactly its last token uncached")
        rows = self._run([(s, s.cached, len(s.tokens)) for s in seqs])
        out = []
        for s, row in zip(seqs, rows):
            t = int(torch.argmax(row))
            s.tokens.append(t)
            s.generated.append(t)
            out.append(t)
        return out

    def generate(self, tokens: list[int], max_tokens: int, seq_id="generate") -> list[int]:
        """The whole request in this process, no pool: the reference the workers must match."""
        seq = self.add(seq_id, tokens, reserve=max_tokens)
        try:
            self.prefill([seq])
            while len(seq.generated) < max_tokens:
                self.decode([seq])
            return seq.generated[:max_tokens]
        finally:
            self.free(seq)
