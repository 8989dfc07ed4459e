"""Checkpoints in the Hugging Face Llama layout: ``config.json`` plus safetensors files.

Tensor names are Hugging Face's (``model.layers.0.self_attn.q_proj.weight``, ...); weights
may be split over several ``*.safetensors`` files (with or without an index file), and
``lm_head.weight`` is absent when the embeddings are tied. Loading checks every tensor's
presence and shape against the config, so a checkpoint of another shape fails with the
name of the first tensor that does not fit.
"""

from __future__ import annotations

import json
import os

from kvpool.worker.config import ModelConfig

__all__ = ["weight_shapes", "load_checkpoint", "save_checkpoint"]


def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor of the model, by its Hugging Face name."""
    h, d = cfg.hidden_size, cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, h)}
    for i in range(cfg.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (h,),
            p + "self_attn.q_proj.weight": (cfg.num_heads * d, h),
            p + "self_attn.k_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.v_proj.weight": (cfg.num_kv_heads * d, h),
            p + "self_attn.o_proj.weight": (h, cfg.num_heads * d),
            p + "post_attention_layernorm.weight": (h,),
            p + "mlp.gate_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.up_proj.weight": (cfg.intermediate_size, h),
            p + "mlp.down_proj.weight": (h, cfg.intermediate_size),
        })
    shapes["model.norm.weight"] = (h,)
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, h)
    return shapes


def load_checkpoint(path: str, block_tokens: int = 16):
    """(config, {name: CPU tensor}) from a checkpoint directory."""
    from safetensors.torch import load_file

    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{path} has no config.json: not a Hugging Face checkpoint directory")
    with open(cfg_path) as f:
        cfg = ModelConfig.from_hf(json.load(f), name=os.path.basename(os.path.normpath(path)),
                                  block_tokens=block_tokens)
    files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    tensors = {}
    for name in files:
        tensors.update(load_file(os.path.join(path, name)))
    for name, shape in weight_shapes(cfg).items():
        if name not in tensors:
            raise ValueError(f"checkpoint {path} lacks tensor {name}")
        if tuple(tensors[name].shape) != shape:
            raise ValueError(f"checkpoint tensor {name} has shape {tuple(tensors[name].shape)}, "
                             f"config.json implies {shape}")
    return cfg, tensors


def save_checkpoint(path: str, cfg: ModelConfig, tensors: dict, max_file_bytes: int = 2 << 30) -> list[str]:
    """Write ``config.json`` and safetensors shards of at most ``max_file_bytes`` each."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(cfg.to_hf(dtype), f, indent=2)
    shards: list[dict] = [{}]
    size = 0
    for name in weight_shapes(cfg):
        t = tensors[name].detach().to("cpu").contiguous()
        if shards[-1] and size + t.numel() * t.element_size() > max_file_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += t.numel() * t.element_size()
    names = []
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        save_file(shard, os.path.join(path, fname), metadata={"format": "pt"})
        names.append(fname)
    return names
