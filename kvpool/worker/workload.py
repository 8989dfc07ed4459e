"""Workloads for the demo: multi-turn conversations, or a FAST'25 trace scaled to the model.

A workload is a list of *sessions*; a session is a list of turns played one after another
(each turn may depend on the previous turn's output), and sessions run side by side.

* :func:`conversations`: every conversation opens with the same system prompt; turn ``t``
  sends the whole conversation so far (system prompt, every user message and every answer)
  plus a new user message, so each turn's prompt extends the last one.
* :func:`trace_sessions`: each FAST'25 record is one single-turn session. A trace block id
  (512 tokens in the trace) becomes ``tokens_per_block`` token ids drawn from a generator
  seeded by the id, so records share token prefixes exactly as far as they share block ids;
  the last block is cut in proportion to ``input_length``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import numpy as np

__all__ = ["Turn", "conversations", "trace_sessions", "TRACE_BLOCK_TOKENS"]

#: Tokens per ``hash_ids`` entry in a FAST'25 trace.
TRACE_BLOCK_TOKENS = 512


@dataclass
class Turn:
    """``prefix`` is sent as is; with ``follow_up``, the previous turn's prompt and answer
    come first (a conversation's history)."""

    prefix: list[int]
    max_tokens: int
    follow_up: bool = False


def _tokens(rng: np.random.Generator, n: int, vocab: int) -> list[int]:
    return rng.integers(0, vocab, n).tolist()


def conversations(n: int, turns: int, system_tokens: int, user_tokens: int, max_tokens: int,
                  vocab: int, seed: int = 0) -> list[list[Turn]]:
    rng = np.random.default_rng(seed)
    system = _tokens(rng, system_tokens, vocab)
    sessions = []
    for _ in range(n):
        first = Turn(system + _tokens(rng, user_tokens, vocab), max_tokens)
        sessions.append([first] + [Turn(_tokens(rng, user_tokens, vocab), max_tokens, follow_up=True)
                                   for _ in range(turns - 1)])
    return sessions


def trace_sessions(path: str | os.PathLike, limit: int, tokens_per_block: int, max_tokens: int,
                   vocab: int) -> list[list[Turn]]:
    sessions = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if len(sessions) >= limit:
                break
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                ids = [int(h) for h in rec["hash_ids"]]
                input_len = int(rec.get("input_length", len(ids) * TRACE_BLOCK_TOKENS))
                output_len = int(rec.get("output_length", max_tokens))
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno}: not a FAST'25 trace record ({e})") from None
            if not ids:
                continue
            tokens: list[int] = []
            for h in ids:
                tokens += _tokens(np.random.default_rng(h), tokens_per_block, vocab)
            scaled = max(1, -(-input_len * tokens_per_block // TRACE_BLOCK_TOKENS))
            tokens = tokens[: min(len(tokens), scaled)]
            out = max(1, min(max_tokens, -(-output_len * tokens_per_block // TRACE_BLOCK_TOKENS)))
            sessions.append([Turn(tokens, out)])
    if not sessions:
        raise ValueError(f"{path}: no trace records")
    return sessions
