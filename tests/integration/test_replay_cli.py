"""`kvpool replay` and `tools/gen_traces.py` run exactly as the README shows them."""

from __future__ import annotations

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_gen_traces_then_kvpool_replay(tmp_path):
    r = subprocess.run([sys.executable, "tools/gen_traces.py", str(tmp_path), "--requests", "300"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    written = json.loads(r.stdout.strip().splitlines()[-1])["traces"]
    path = written["conversations"]["path"]
    assert os.path.exists(path)

    r = subprocess.run([sys.executable, "-m", "kvpool", "replay", path, "--capacity", "50", "--capacity", "400"],
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert "of belady" in lines[1] and "us/ref" in lines[1]
    last = json.loads(lines[-1])
    assert list(last) == ["bench", "capacities", "policy", "lru", "belady", "geomean_gain_vs_lru",
                          "min_gain_vs_lru", "us_per_ref"]
    assert last["capacities"] == [50, 400]
    for p, b in zip(last["policy"], last["belady"]):
        assert 0 < p <= b + 1e-9
    assert last["us_per_ref"] > 0


def test_kvpool_replay_says_what_is_wrong_with_a_bad_trace(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"timestamp": 0}\n')
    r = subprocess.run([sys.executable, "-m", "kvpool", "replay", str(bad), "--capacity", "4"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "not a FAST'25 trace record" in r.stderr
