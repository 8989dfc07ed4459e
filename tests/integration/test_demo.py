"""`kvpool demo` as the README shows it, with sizes small enough to take seconds."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

from kvpool.cli.demo import SETUPS, format_table

ROOT = Path(__file__).resolve().parents[2]


def readme_demo_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Prefill and decode workers.*?```sh\n(.*?)```", text, re.S).group(1)
    first = next(line.split("#")[0].split() for line in block.splitlines() if "kvpool demo" in line)
    assert first == [".venv/bin/kvpool", "demo"], first
    return first


def test_demo_runs_as_the_readme_says(tmp_path):
    # A FAST'25 trace of six records: three share a two-block prefix, two share one block.
    records = [[0, 1, 2], [0, 1, 3], [0, 1, 4, 5], [6, 7], [6, 7, 8], [9]]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("".join(json.dumps({"timestamp": i, "input_length": 512 * len(ids) - 100,
                                         "output_length": 200, "hash_ids": ids}) + "\n"
                             for i, ids in enumerate(records)))
    cmd = readme_demo_command() + ["--model", "tiny", "--trace", str(trace), "--trace-requests", "6",
                                   "--max-tokens", "3", "--concurrency", "1", "--dram", "64MiB",
                                   "--cache-tokens", "2048", "--json"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert report["identical_outputs"] is True
    setups = report["setups"]
    assert set(setups) == {k for k, _ in SETUPS}
    for s in setups.values():
        assert s["requests"] == 6 and s["output_tokens"] == 6 * 3 and s["ttft_p99_ms"] >= s["ttft_p50_ms"] > 0
    # Trace blocks are one pool block (16 tokens) each; the last is cut to 12 of 16 tokens.
    prompt = sum(16 * len(ids) - 3 for ids in records)
    assert setups["colocated"]["prompt_tokens"] == prompt == setups["colocated"]["computed_tokens"]
    assert setups["colocated"]["fetched_bytes"] == 0
    assert setups["no_reuse"]["prefix_hit_rate"] == 0.0 and setups["no_reuse"]["fetched_bytes"] > 0
    # With the pool, records 1 and 2 find blocks 0 and 1 that record 0 published; record 4
    # finds block 6 (record 3's block 7 was partial, so it was never published): 5 blocks.
    assert setups["pool"]["prefix_hit_rate"] == round(5 * 16 / prompt, 4)
    assert setups["pool"]["computed_tokens"] < setups["no_reuse"]["computed_tokens"]

    table = format_table(report).splitlines()
    assert [line.split("  ")[0] for line in table[3:6]] == [label for _, label in SETUPS]
    assert table[-1].startswith("outputs: identical in all three setups (6 requests")


def test_demo_refuses_a_missing_trace_with_a_message(tmp_path):
    r = subprocess.run(readme_demo_command() + ["--trace", str(tmp_path / "none.jsonl")], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "none.jsonl" in r.stderr and "Traceback" not in r.stderr
