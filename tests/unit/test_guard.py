"""LogLimiter: one line per key per interval, carrying the count of the lines it held back."""

from __future__ import annotations

import logging

from kvpool.guard import LogLimiter


def test_one_line_per_key_per_interval_with_a_count(caplog):
    now = [0.0]
    lim = LogLimiter(logging.getLogger("t.guard"), interval=10.0, clock=lambda: now[0])
    with caplog.at_level(logging.WARNING, logger="t.guard"):
        assert lim.event("/a", "bad") is True
        assert [lim.event("/a", "bad") for _ in range(99)] == [False] * 99
        assert lim.event("/b", "bad") is True          # keys are limited separately
        now[0] = 10.0
        assert lim.event("/a", "bad") is True
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["/a: bad", "/b: bad", "/a: bad (and 99 more like it in the last 10s)"]
