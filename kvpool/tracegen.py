"""Synthetic prefix-cache traces in the FAST'25 format, from a seeded generator.

Each generator returns a :class:`~kvpool.replay.Trace` whose requests are chains of block
ids with the FAST'25 property: two requests share ids exactly as far as their prompts share
a prefix. They exist to check an eviction policy on shapes of traffic it was not built on
(``tools/gen_traces.py`` writes them as jsonl for ``kvpool replay``; the robustness tests
replay small ones). They are checks, never targets: nothing in a policy is fitted to them.

Shapes:

* :func:`recency`: conversations whose next turn comes soon, most recent first (LRU's
  home ground: the reuse probability falls with recency).
* :func:`one_hit_wonders`: a small hot set of prompts among a flood of prompts seen once
  (frequency's home ground).
* :func:`loop`: the same prompts in the same order, over and over, slightly more than
  the cache holds (LRU misses everything; MRU keeps most of it).
* :func:`scan`: a hot set that stays hot while a stream of one-time prompts flows past
  faster than LRU can keep the hot set.
* :func:`conversations`: multi-turn chats with heavy-tailed think times and a shared
  system prompt per application (the shape of a chat service).
* :func:`zipf_documents`: retrieval-style prompts: a system prompt, one of many
  documents drawn by a Zipf law, then a unique question.
* :func:`agents`: tool-calling agents whose context grows by a few blocks a step, with
  short pauses between steps and long idle gaps between tasks.
"""

from __future__ import annotations

import json
import os
import random

from kvpool.replay import Trace

__all__ = [
    "GENERATORS",
    "agents",
    "conversations",
    "loop",
    "one_hit_wonders",
    "recency",
    "scan",
    "write_jsonl",
    "zipf_documents",
]


class _Ids:
    """Fresh block ids."""

    def __init__(self) -> None:
        self.next = 0

    def take(self, n: int) -> list[int]:
        out = list(range(self.next, self.next + n))
        self.next += n
        return out


def recency(requests: int = 2000, seed: int = 0, *, active: int = 40, new_p: float = 0.2) -> Trace:
    """Each request continues a conversation picked by recency rank (rank r with weight
    1/(r+1)^2) or, with probability ``new_p``, starts one; a turn adds 1-3 blocks."""
    rng = random.Random(seed)
    ids = _Ids()
    stack: list[list[int]] = []  # most recent last
    out = []
    weights = [1.0 / (r + 1) ** 2 for r in range(active)]
    for _ in range(requests):
        if not stack or rng.random() < new_p:
            chain = ids.take(rng.randint(2, 6))
        else:
            r = rng.choices(range(min(active, len(stack))), weights[: min(active, len(stack))])[0]
            chain = stack.pop(len(stack) - 1 - r)
            chain = chain + ids.take(rng.randint(1, 3))
        stack.append(chain)
        if len(stack) > 4 * active:
            stack.pop(0)
        out.append(tuple(chain))
    return Trace(tuple(out), name="recency")


def one_hit_wonders(requests: int = 3000, seed: int = 0, *, hot: int = 30, hot_p: float = 0.3,
                    length: int = 4) -> Trace:
    """With probability ``hot_p`` one of ``hot`` fixed prompts (uniformly), else a prompt
    never seen before and never seen again."""
    rng = random.Random(seed)
    ids = _Ids()
    hot_set = [tuple(ids.take(length)) for _ in range(hot)]
    out = []
    for _ in range(requests):
        out.append(rng.choice(hot_set) if rng.random() < hot_p else tuple(ids.take(length)))
    return Trace(tuple(out), name="one_hit_wonders")


def loop(blocks: int, seed: int = 0, *, rounds: int = 10, length: int = 5) -> Trace:
    """``blocks // length`` prompts of ``length`` blocks, requested in the same order
    ``rounds`` times."""
    del seed  # deterministic by construction
    ids = _Ids()
    prompts = [tuple(ids.take(length)) for _ in range(max(1, blocks // length))]
    return Trace(tuple(prompts * rounds), name="loop")


def scan(requests: int = 3000, seed: int = 0, *, hot: int = 10, length: int = 4, scan_per_hot: int = 6) -> Trace:
    """``hot`` prompts requested round-robin; between two hot requests, ``scan_per_hot``
    one-time prompts. A hot prompt comes back every ``hot * (scan_per_hot + 1)`` requests,
    which carries ``hot * scan_per_hot * length`` new blocks past it."""
    rng = random.Random(seed)
    ids = _Ids()
    hot_set = [tuple(ids.take(length)) for _ in range(hot)]
    out = []
    i = 0
    while len(out) < requests:
        out.append(hot_set[i % hot])
        i += 1
        for _ in range(scan_per_hot):
            out.append(tuple(ids.take(rng.randint(length - 1, length + 1))))
    return Trace(tuple(out[:requests]), name="scan")


def conversations(requests: int = 12000, seed: int = 0, *, apps: int = 8, system_blocks: int = 3,
                  mean_turns: float = 4.0, think: float = 200.0) -> Trace:
    """Chats: a new chat starts with its app's system prompt (apps by a Zipf law) and a
    first message; each next turn extends the chat's context by its answer and a message,
    after a Pareto-distributed think time (in requests, scale ``think``, shape 1.5); a chat
    ends after a geometric number of turns."""
    rng = random.Random(seed)
    ids = _Ids()
    systems = [ids.take(system_blocks) for _ in range(apps)]
    app_w = [1.0 / (a + 1) for a in range(apps)]
    due: dict[int, list[list[int]]] = {}
    out = []
    for t in range(requests):
        ready = due.pop(t, None)
        if ready:
            chain = ready.pop()
            if ready:
                due.setdefault(t + 1, []).extend(ready)  # one request per step; the rest wait
            chain = chain + ids.take(rng.randint(1, 4))
        else:
            app = rng.choices(range(apps), app_w)[0]
            chain = systems[app] + ids.take(rng.randint(1, 12))
        out.append(tuple(chain))
        if rng.random() > 1.0 / mean_turns:
            gap = int(think * rng.paretovariate(1.5))
            due.setdefault(t + 1 + gap, []).append(chain)
    return Trace(tuple(out), name="conversations")


def zipf_documents(requests: int = 12000, seed: int = 0, *, documents: int = 3000, doc_blocks: int = 6,
                   alpha: float = 0.9) -> Trace:
    """A shared system prompt, then one of ``documents`` documents of ``doc_blocks`` blocks
    drawn by a Zipf law of exponent ``alpha``, then a unique 1-2 block question."""
    rng = random.Random(seed)
    ids = _Ids()
    system = ids.take(2)
    docs = [ids.take(doc_blocks) for _ in range(documents)]
    weights = [1.0 / (d + 1) ** alpha for d in range(documents)]
    cum = []
    total = 0.0
    for w in weights:
        total += w
        cum.append(total)
    out = []
    for _ in range(requests):
        d = rng.choices(range(documents), cum_weights=cum)[0]
        out.append(tuple(system + docs[d] + ids.take(rng.randint(1, 2))))
    return Trace(tuple(out), name="zipf_documents")


def agents(requests: int = 12000, seed: int = 0, *, concurrent: int = 64, steps: int = 12) -> Trace:
    """``concurrent`` agents at a time; each task starts from one of 4 tool prompts, grows
    its context by 1-3 blocks a step for about ``steps`` steps, with a short pause between
    steps (an exponential number of requests, mean ``concurrent``) and, between tasks of the
    same agent, an idle gap ten times longer."""
    rng = random.Random(seed)
    ids = _Ids()
    tools = [ids.take(4) for _ in range(4)]
    due: dict[int, list[tuple[list[int], int]]] = {}
    for a in range(concurrent):
        due.setdefault(a, []).append((list(rng.choice(tools)) + ids.take(2), 0))
    out = []
    for t in range(requests):
        ready = due.pop(t, None)
        if not ready:
            chain, step = list(rng.choice(tools)) + ids.take(2), 0
        else:
            (chain, step), rest = ready[0], ready[1:]
            if rest:
                due.setdefault(t + 1, []).extend(rest)
        out.append(tuple(chain))
        if step < steps * 2 and rng.random() > 1.0 / steps:
            nxt = (chain + ids.take(rng.randint(1, 3)), step + 1)
            gap = 1 + int(rng.expovariate(1.0 / concurrent))
        else:
            nxt = (list(rng.choice(tools)) + ids.take(2), 0)
            gap = 1 + int(rng.expovariate(1.0 / (10 * concurrent)))
        due.setdefault(t + gap, []).append(nxt)
    return Trace(tuple(out), name="agents")


#: The generators ``tools/gen_traces.py`` writes, by name: the large shapes for the
#: generalization check (the small classic ones are for the robustness tests).
GENERATORS = {
    "conversations": conversations,
    "zipf_documents": zipf_documents,
    "agents": agents,
}


def write_jsonl(trace: Trace, path: str | os.PathLike, block_tokens: int = 512) -> None:
    """Write ``trace`` in the FAST'25 format (timestamps one per request, in ms)."""
    with open(path, "w", encoding="utf-8") as f:
        for i, ids in enumerate(trace.requests):
            f.write(json.dumps({"timestamp": i, "input_length": len(ids) * block_tokens, "output_length": 1,
                                "hash_ids": list(ids)}) + "\n")
