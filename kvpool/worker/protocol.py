"""The router <-> worker wire: one JSON object per line over TCP.

Requests (router -> worker)::

    {"op": "prefill", "id": ID, "tokens": [...], "max_tokens": N}          # prefill worker
    {"op": "decode",  "id": ID, "tokens": [...], "max_tokens": N,
     "first_token": T}                                                     # decode worker
    {"op": "generate", "id": ID, "tokens": [...], "max_tokens": N}         # colocated worker
    {"op": "stats"}

Events (worker -> router), in the order they happen::

    {"event": "first", "id": ID, "token": T, ...stats}   # prefill done (prefill, colocated)
    {"event": "done",  "id": ID, "tokens": [...], ...stats}   # generation done (decode, colocated)
    {"event": "error", "id": ID, "message": "..."}       # the request failed; the worker goes on
    {"event": "stats", ...}

Stats fields: ``hit_tokens`` (prefix tokens taken from the pool), ``computed_tokens``
(prompt tokens run through the model), ``fetched_bytes``, ``published_blocks``,
``compute_ms``. JSON keeps the wire readable and free of code execution (no pickle).
"""

from __future__ import annotations

import asyncio
import json

__all__ = ["send", "receive", "MAX_LINE"]

#: The longest line accepted: a 128K-token request with six-digit ids fits.
MAX_LINE = 16 << 20


async def send(writer: asyncio.StreamWriter, message: dict) -> None:
    writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
    await writer.drain()


async def receive(reader: asyncio.StreamReader) -> dict | None:
    """The next message, or None at end of stream."""
    line = await reader.readline()
    if not line:
        return None
    return json.loads(line)
