"""`kvpool.integrations` is importable without any engine: the engines load only with their adapter."""

from __future__ import annotations

import subprocess
import sys


def test_kvpool_and_integrations_import_no_engine():
    code = ("import sys, kvpool, kvpool.integrations; "
            "print(sorted(m for m in ('vllm', 'sglang') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"

