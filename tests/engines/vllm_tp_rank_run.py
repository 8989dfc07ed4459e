"""One tensor-parallel rank of a worker-role KVPoolConnector, in its own process.

    python tests/engines/vllm_tp_rank_run.py MODEL_DIR POOL_ADDRESS RANK INIT_PORT

Two of these (ranks 0 and 1) form a real TP=2 group through vLLM's own
``init_distributed_environment`` / ``ensure_model_parallel_initialized`` (gloo, on the CPU),
so the connector learns its rank exactly as inside a vLLM worker. Each fills its KV cache
shard with its own rank's bytes, publishes the first four blocks of ``PROMPT`` through a
finish save, waits until ``get_finished`` names the request, and prints ``DONE``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root: tests.engines


def main() -> None:
    model, address, rank, port = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    from vllm.config import ParallelConfig, set_current_vllm_config
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
    from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
    from vllm.distributed.parallel_state import ensure_model_parallel_initialized, init_distributed_environment

    from kvpool.integrations.vllm import BlockTransfer, KVPoolConnectorMetadata
    from tests.engines.test_vllm_tp import PROMPT, rank_fill
    from tests.engines.vllm_harness import (BLOCK, LAYER_NAMES, NUM_BLOCKS, kv_cache_config, kv_transfer_config,
                                            make_config)

    import torch

    vc = make_config(model, kv_transfer_config(address))
    vc.parallel_config = ParallelConfig(tensor_parallel_size=2)
    with set_current_vllm_config(vc):
        init_distributed_environment(world_size=2, rank=rank, local_rank=rank, backend="gloo",
                                     distributed_init_method=f"tcp://127.0.0.1:{port}")
        ensure_model_parallel_initialized(2, 1)
    worker = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kv_cache_config())
    heads = kv_cache_config().kv_cache_groups[0].kv_cache_spec.num_kv_heads
    caches = {n: torch.full((NUM_BLOCKS, heads, BLOCK, 2 * 16), rank_fill(rank)) for n in LAYER_NAMES}
    worker.register_kv_caches(caches)
    save = BlockTransfer("tp-req", PROMPT[: 4 * BLOCK], 0, 4, [3, 5, 7, 9])
    worker.bind_connector_metadata(KVPoolConnectorMetadata(finish_saves=[save]))
    worker.wait_for_save()
    worker.clear_connector_metadata()
    deadline = time.monotonic() + 60
    while True:
        sent, _ = worker.get_finished(set())
        if sent:
            break
        if time.monotonic() > deadline:
            raise SystemExit("the finish save never completed")
        time.sleep(0.01)
    meta = worker.build_connector_worker_meta()
    assert meta is not None and meta.published == [("tp-req", 0)], meta
    worker.shutdown()
    print(f"DONE rank={worker._tp_rank} sent={sorted(sent)}", flush=True)


if __name__ == "__main__":
    main()
