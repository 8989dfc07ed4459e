"""BackgroundPublisher: runs an engine adapter's publishes off the engine step.

Protocol (every method but the job itself is called from the engine's thread only):

* ``submit(tag, job)`` queues ``job()`` (a gather out of the engine cache and a put into the
  pool) and returns at once. Jobs run one at a time, in submission order, on one thread
  of their own: a publish never competes with another publish for the pool's write path,
  and the bytes waiting to go out are bounded by what the engine handed over.
* ``done()`` returns ``(tag, result, error)`` for every job that finished since the last call,
  in submission order; ``error`` is the exception a job raised (``result`` is then None).
* ``pending(tag)`` counts a tag's jobs not yet reported by ``done()``.
* ``close()`` lets queued jobs finish (a block in mid-put is committed or aborted, never
  left half-written) and stops the thread.

A job runs while the engine goes on, so whatever it reads must stay as it was until the job
is reported done: either bytes the job owns (already copied out of the engine cache), or
engine blocks the engine has promised not to free or overwrite until then (vLLM's
``request_finished`` returning True, cleared by ``get_finished``).
"""

from __future__ import annotations

import concurrent.futures
from collections import Counter
from typing import Any, Callable, Hashable

__all__ = ["BackgroundPublisher"]


class BackgroundPublisher:
    """One worker thread running publish jobs in order; results collected by polling."""

    def __init__(self, name: str = "kvpool-publish") -> None:
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
        self._jobs: list[tuple[Hashable, concurrent.futures.Future]] = []
        self._pending: Counter = Counter()

    def submit(self, tag: Hashable, job: Callable[[], Any]) -> None:
        self._jobs.append((tag, self._pool.submit(job)))
        self._pending[tag] += 1

    def done(self) -> list[tuple[Hashable, Any, BaseException | None]]:
        out, keep = [], []
        for tag, fut in self._jobs:
            if not fut.done():
                keep.append((tag, fut))
                continue
            error = fut.exception()
            out.append((tag, None if error else fut.result(), error))
            self._pending[tag] -= 1
            if not self._pending[tag]:
                del self._pending[tag]
        self._jobs = keep
        return out

    def pending(self, tag: Hashable) -> int:
        return self._pending.get(tag, 0)

    def __len__(self) -> int:
        return len(self._jobs)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every queued job has finished (they stay unreported until ``done()``)."""
        _, left = concurrent.futures.wait([f for _, f in self._jobs], timeout=timeout)
        return not left

    def close(self) -> None:
        self._pool.shutdown(wait=True)
