"""LlamaModel: a Llama-architecture decoder (RMSNorm, RoPE, GQA attention, SwiGLU MLP).

The model owns weights only; the KV cache and the attention kernel are the engine's
(:mod:`kvpool.worker.engine`). :meth:`LlamaModel.forward` runs a batch of *chunks*, each a
run of consecutive tokens of one sequence whose earlier tokens already have KV in the
paged cache, and appends the chunk's K/V there (``prefix_attention`` does the append).

Weights come from a seeded, deterministic init of a named config (:meth:`seeded`: the
same bits on every machine, generated on the CPU in float32 and then cast and moved) or
from a Hugging Face Llama checkpoint directory (:meth:`from_pretrained`).

Batch invariance (the property the workers' token-for-token guarantee rests on): every
matrix product involving a chunk's rows is one torch call on that chunk's rows alone, and
every per-row operation (norms, RoPE from a fixed table, SiLU) is elementwise or reduces
within its row. So a chunk's outputs are a function of its tokens, its positions and the
cached K/V it attends to, whatever else is in the batch.
"""

from __future__ import annotations

import math
import os

import xxhash

from kvpool.worker.checkpoint import load_checkpoint, save_checkpoint, weight_shapes
from kvpool.worker.config import ModelConfig, config_named

__all__ = ["LlamaModel", "Chunk"]


class Chunk:
    """Tokens ``start .. start + len(tokens) - 1`` of one sequence; ``block_row`` is its
    row of the batch's block table. The K/V of positions ``< start`` are in the cache."""

    __slots__ = ("tokens", "start", "block_row")

    def __init__(self, tokens, start: int, block_row) -> None:
        self.tokens = tokens
        self.start = start
        self.block_row = block_row


class LlamaModel:
    def __init__(self, config: ModelConfig, weights: dict, identity: str) -> None:
        import torch

        self.config = config
        self.w = weights
        first = weights["model.embed_tokens.weight"]
        self.dtype = first.dtype
        self.device = first.device
        #: Names the weights in the pool namespace: blocks of other weights never mix.
        self.identity = identity
        self.layers = [self._layer(i) for i in range(config.num_layers)]
        self.lm_head = weights.get("lm_head.weight", first)
        # RoPE tables in float64, rounded once to the model dtype: a position's rotation
        # is a table row, the same bits in every chunk and every process.
        d = config.head_dim
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d))
        angles = torch.outer(torch.arange(config.max_positions, dtype=torch.float64), inv)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos = angles.cos().to(self.dtype).to(self.device)
        self.sin = angles.sin().to(self.dtype).to(self.device)

    def _layer(self, i: int) -> dict:
        p = f"model.layers.{i}."
        return {k: self.w[p + n] for k, n in (
            ("ln1", "input_layernorm.weight"), ("q", "self_attn.q_proj.weight"),
            ("k", "self_attn.k_proj.weight"), ("v", "self_attn.v_proj.weight"),
            ("o", "self_attn.o_proj.weight"), ("ln2", "post_attention_layernorm.weight"),
            ("gate", "mlp.gate_proj.weight"), ("up", "mlp.up_proj.weight"),
            ("down", "mlp.down_proj.weight"))}

    # -- construction ---------------------------------------------------------------------

    @classmethod
    def seeded(cls, config: ModelConfig | str, seed: int = 0, dtype: str = "float32",
               device: str = "cpu") -> "LlamaModel":
        """Deterministic random weights: normal(0, 1/sqrt(fan_in)), norms at 1."""
        import torch

        cfg = config_named(config) if isinstance(config, str) else config
        gen = torch.Generator().manual_seed(seed)
        weights = {}
        for name, shape in weight_shapes(cfg).items():
            if len(shape) == 1:
                t = torch.ones(shape)
            else:
                std = 1.0 if name == "model.embed_tokens.weight" else 1.0 / math.sqrt(shape[1])
                t = torch.randn(shape, generator=gen) * std
            weights[name] = t.to(getattr(torch, dtype)).to(device)
        return cls(cfg, weights, identity=f"seed{seed}")

    @classmethod
    def from_pretrained(cls, path: str, dtype: str | None = None, device: str = "cpu",
                        block_tokens: int = 16) -> "LlamaModel":
        """Load ``config.json`` + safetensors (Hugging Face Llama names) from ``path``."""
        import torch

        cfg, tensors = load_checkpoint(path, block_tokens=block_tokens)
        digest = xxhash.xxh3_64()
        for name in sorted(n for n in os.listdir(path) if n.endswith(".safetensors")):
            with open(os.path.join(path, name), "rb") as f:
                for piece in iter(lambda: f.read(1 << 24), b""):
                    digest.update(piece)
        target = getattr(torch, dtype) if dtype else None
        weights = {n: (t.to(target) if target else t).to(device) for n, t in tensors.items()}
        return cls(cfg, weights, identity=f"ckpt-{digest.hexdigest()}")

    def save_pretrained(self, path: str) -> list[str]:
        return save_checkpoint(path, self.config, self.w)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    # -- the forward pass -----------------------------------------------------------------

    def _rms_norm(self, x, weight):
        import torch

        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.config.rms_norm_eps)
        return weight * x32.to(x.dtype)

    def _rope(self, x, positions):
        import torch

        cos = self.cos[positions][:, None, :]
        sin = self.sin[positions][:, None, :]
        half = x.shape[-1] // 2
        rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
        return x * cos + rotated * sin

    def forward(self, chunks: list[Chunk], attend) -> list:
        """Run ``chunks`` through every layer; return each chunk's last-token logits.

        ``attend(layer, q, k, v, query_start_loc, prefix_lens, block_table)`` is the
        engine's ``prefix_attention`` over one layer of its paged cache, for the whole batch.
        """
        import torch
        import torch.nn.functional as F

        cfg = self.config
        d = cfg.head_dim
        dev = self.device
        positions = [torch.arange(c.start, c.start + len(c.tokens), device=dev) for c in chunks]
        h = [self.w["model.embed_tokens.weight"][torch.as_tensor(c.tokens, device=dev)] for c in chunks]
        lens = [len(c.tokens) for c in chunks]
        starts = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32, device=dev)
        prefixes = torch.tensor([c.start for c in chunks], dtype=torch.int32, device=dev)
        table = torch.stack([c.block_row for c in chunks])
        for li, L in enumerate(self.layers):
            qs, ks, vs = [], [], []
            for x, pos in zip(h, positions):
                n = x.shape[0]
                a = self._rms_norm(x, L["ln1"])
                qs.append(self._rope(F.linear(a, L["q"]).view(n, cfg.num_heads, d), pos))
                ks.append(self._rope(F.linear(a, L["k"]).view(n, cfg.num_kv_heads, d), pos))
                vs.append(F.linear(a, L["v"]).view(n, cfg.num_kv_heads, d))
            out = attend(li, torch.cat(qs), torch.cat(ks), torch.cat(vs), starts, prefixes, table)
            for i, (lo, n) in enumerate(zip(starts.tolist(), lens)):
                x = h[i] + F.linear(out[lo:lo + n].reshape(n, cfg.num_heads * d).clone(), L["o"])
                m = self._rms_norm(x, L["ln2"])
                h[i] = x + F.linear(F.silu(F.linear(m, L["gate"])) * F.linear(m, L["up"]), L["down"])
        norm = self.w["model.norm.weight"]
        return [F.linear(self._rms_norm(x[-1:], norm), self.lm_head)[0] for x in h]
