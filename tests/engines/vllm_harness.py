"""Drive vLLM's real Scheduler and a worker-role KVPoolConnector step by step, on CPU tensors.

Only the model is played by the test: ``FakeWorker.run`` writes, for every token a step
schedules, a KV value that depends on the token, its position and its layer (so a block
loaded from the pool can be checked against what computing it would have produced), and
answers each finished prefill with a sampled token. Everything else is vLLM's: config
objects, the Scheduler (with its prefix cache and block hasher), KVConnectorFactory, the
connector metadata and the KVConnectorOutput the scheduler consumes.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
from vllm.config import CacheConfig, DeviceConfig, KVTransferConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.outputs import KVConnectorOutput, ModelRunnerOutput
from vllm.v1.request import Request
from vllm.v1.structured_output import StructuredOutputManager

BLOCK = 16
LAYERS, HEADS, DIM = 2, 2, 16
NUM_BLOCKS = 64
LAYER_NAMES = [f"model.layers.{i}.self_attn.attn" for i in range(LAYERS)]

TINY_LLAMA = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 128,
    "intermediate_size": 256, "num_hidden_layers": LAYERS, "num_attention_heads": 2,
    "num_key_value_heads": HEADS, "vocab_size": 512, "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5, "torch_dtype": "float32", "tie_word_embeddings": False,
    "bos_token_id": 1, "eos_token_id": 2,
}


def write_tiny_llama(path: Path) -> str:
    """A config-only Llama (2 layers, 2 KV heads of 64; the CPU attention kernels need head_dim
    >= 32): enough for configs and dummy weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(TINY_LLAMA))
    return str(path)


def kv_transfer_config(address: str, role: str = "kv_both", **extra) -> KVTransferConfig:
    return KVTransferConfig(kv_connector="KVPoolConnector", kv_connector_module_path="kvpool.integrations.vllm",
                            kv_role=role, kv_load_failure_policy="recompute",
                            # Wait long for a Lookup: on a loaded machine 50 ms can pass, and the
                            # scheduler would (rightly) defer the request a step; only
                            # the deferral test asks for that.
                            kv_connector_extra_config={"address": address, "model_id": "tiny-llama",
                                                       "lookup_wait_ms": 5000, **extra})


def make_config(model_dir: str, kvt: KVTransferConfig, step_tokens: int = 512) -> VllmConfig:
    """``step_tokens``: the scheduler's token budget per step (a longer prompt is chunked)."""
    mc = ModelConfig(model=model_dir, skip_tokenizer_init=True, dtype="float32", max_model_len=512)
    sc = SchedulerConfig(max_num_batched_tokens=step_tokens, max_num_seqs=8, max_model_len=512,
                         is_encoder_decoder=False)
    return VllmConfig(model_config=mc, cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=True),
                      scheduler_config=sc, kv_transfer_config=kvt, device_config=DeviceConfig("cpu"))


def kv_cache_config() -> KVCacheConfig:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=HEADS, head_size=DIM, dtype=torch.float32)
    return KVCacheConfig(num_blocks=NUM_BLOCKS, kv_cache_tensors=[],
                         kv_cache_groups=[KVCacheGroupSpec(LAYER_NAMES, spec)])


def make_scheduler(vc: VllmConfig) -> Scheduler:
    vc.cache_config.num_gpu_blocks = NUM_BLOCKS
    return Scheduler(vllm_config=vc, kv_cache_config=kv_cache_config(),
                     structured_output_manager=StructuredOutputManager(vc), block_size=BLOCK, log_stats=True)


_hasher = None


def make_request(req_id: str, prompt: list[int], max_tokens: int = 2, salt: str | None = None) -> Request:
    global _hasher
    if _hasher is None:
        init_none_hash(sha256)
        _hasher = get_request_block_hasher(BLOCK, sha256)
    return Request(req_id, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), None,
                   cache_salt=salt, block_hasher=_hasher)


def token_kv(token: int, pos: int, layer: int) -> torch.Tensor:
    """What "computing" token ``token`` at ``pos`` writes in ``layer``: [2 (K, V), heads, dim]."""
    base = float((token * 131 + pos * 7 + layer * 1009) % 9973)
    return base + torch.arange(2 * HEADS * DIM, dtype=torch.float32).view(2, HEADS, DIM) / 64


class FakeWorker:
    """A worker-role connector over CPU tensors in vLLM's CPU backend layout
    (``[blocks, heads, block_size, 2 * dim]`` per layer), plus a stand-in for the model."""

    def __init__(self, vc: VllmConfig) -> None:
        self.connector = KVConnectorFactory.create_connector(vc, KVConnectorRole.WORKER, kv_cache_config())
        self.caches = {n: torch.full((NUM_BLOCKS, HEADS, BLOCK, 2 * DIM), -1.0) for n in LAYER_NAMES}
        self.connector.register_kv_caches(self.caches)
        self.blocks: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.load_errors: set[int] = set()
        self.stats: dict[str, int] = {}
        self.sample = 300

    def kv_at(self, layer: int, block: int, offset: int) -> torch.Tensor:
        """[2, heads, dim] of one token slot, read back out of the CPU layout."""
        t = self.caches[LAYER_NAMES[layer]].view(NUM_BLOCKS, HEADS, 2, BLOCK, DIM)
        return t[block, :, :, offset].transpose(0, 1)

    def _compute(self, req_id: str, start: int, n: int) -> None:
        for pos in range(start, start + n):
            block, off = self.blocks[req_id][pos // BLOCK], pos % BLOCK
            for layer in range(LAYERS):
                t = self.caches[LAYER_NAMES[layer]].view(NUM_BLOCKS, HEADS, 2, BLOCK, DIM)
                t[block, :, :, off] = token_kv(self.tokens[req_id][pos], pos, layer).transpose(0, 1)

    def run(self, so, requests) -> ModelRunnerOutput:
        """One engine step: load, "forward", save, then report like vLLM's model runner."""
        c = self.connector
        c.bind_connector_metadata(so.kv_connector_metadata)
        c.start_load_kv(None)
        req_ids, sampled = [], []
        for new in so.scheduled_new_reqs:
            self.blocks[new.req_id] = list(new.block_ids[0])
            self.tokens[new.req_id] = list(new.prompt_token_ids)
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            if cached.new_block_ids[i] is not None:
                self.blocks[rid].extend(cached.new_block_ids[i][0])
        for rid in so.num_scheduled_tokens:  # the token ids as the scheduler holds them
            self.tokens[rid] = list(requests[rid].all_token_ids)
        starts = {n.req_id: n.num_computed_tokens for n in so.scheduled_new_reqs}
        starts.update(zip(cached.req_ids, cached.num_computed_tokens))
        for rid, n in so.num_scheduled_tokens.items():
            self._compute(rid, starts[rid], n)
            req_ids.append(rid)
            if starts[rid] + n >= len(self.tokens[rid]):  # all known tokens computed: sample one
                self.sample += 1
                self.tokens[rid].append(self.sample)
                sampled.append([self.sample])
            else:
                sampled.append([])
        c.wait_for_save()
        sending, recving = c.get_finished(so.finished_req_ids)
        errors = c.get_block_ids_with_load_errors()
        self.load_errors |= errors
        worker_meta = c.build_connector_worker_meta()
        stats = c.get_kv_connector_stats()
        if stats is not None:
            for k, v in stats.data.items():
                self.stats[k] = self.stats.get(k, 0) + v
        c.clear_connector_metadata()
        out = KVConnectorOutput(finished_sending=sending, finished_recving=recving, invalid_block_ids=errors,
                                kv_connector_stats=stats, kv_connector_worker_meta=worker_meta)
        return ModelRunnerOutput(req_ids=req_ids, req_id_to_index={r: i for i, r in enumerate(req_ids)},
                                 sampled_token_ids=sampled, kv_connector_output=out)


class Engine:
    """A real Scheduler and a FakeWorker sharing one config: one vLLM engine, minus the model."""

    def __init__(self, vc: VllmConfig) -> None:
        self.scheduler = make_scheduler(vc)
        self.worker = FakeWorker(vc)
        self.events: list = []
        # The scheduler publishes each step's KV events (its own and the connector's) here;
        # record them instead of opening a ZMQ socket.
        self.scheduler.kv_event_publisher.publish = lambda batch: self.events.extend(batch.events)

    def step(self):
        so = self.scheduler.schedule()
        out = self.worker.run(so, self.scheduler.requests)
        self.scheduler.update_from_output(so, out)
        return so

    def run_until_idle(self, timeout_s: float = 30.0) -> int:
        """Step as vLLM's engine loop does while the scheduler has work, including the empty
        steps that wait for the connector's background publishes (``has_pending_push_work``)."""
        deadline = time.monotonic() + timeout_s
        steps = 0
        while time.monotonic() < deadline:
            so = self.step()
            steps += 1
            if not self.scheduler.has_requests():
                return steps
            if not so.total_num_scheduled_tokens:
                time.sleep(0.002)  # an empty step: the publisher is at work
        raise AssertionError(f"engine still busy after {timeout_s} s ({steps} steps)")

    def close(self) -> None:
        self.scheduler.connector.shutdown()
        self.worker.connector.shutdown()
