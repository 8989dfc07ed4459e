"""tools/bench_load.py runs as the README shows (short form) and ends with its summary line."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "tools" / "bench_load.py"
KEYS = ["bench", "clients", "seconds", "ops", "errors", "wrong_bytes", "lookup_per_s", "lookup_p99_ms", "put_per_s",
        "master_cpu_us_per_op", "client_lookup_p99_ms"]


def test_short_load_run_verifies_every_byte_and_prints_the_summary_line():
    r = subprocess.run([sys.executable, str(BENCH), "--clients", "2", "--seconds", "2", "--ceiling-seconds", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    *_, detail_line, last = r.stdout.strip().splitlines()
    summary, detail = json.loads(last), json.loads(detail_line)
    assert list(summary) == KEYS and summary["bench"] == "load" and summary["clients"] == 2
    assert summary["ops"] > 0 and summary["errors"] == 0 and summary["wrong_bytes"] == 0
    assert summary["lookup_per_s"] > 0 and summary["put_per_s"] > 0 and summary["master_cpu_us_per_op"] > 0
    assert detail["blocks_read_verified"] > 0 and detail["ceiling_health_rpc_per_s"] > 0
    # The master's own latency (arrival to answer) is there beside the clients', per RPC.
    assert 0 < summary["lookup_p99_ms"] <= 1000 and detail["client_nice"] == 10
    assert set(detail["master_rpc_ms_at_most"]) >= {"Lookup", "PutStart", "PutCommit"}
    assert detail["master_cpu_us_per_health_check"] > 0
