"""ModelConfig: the shape of a Llama-architecture model, and the named configs ``tiny``, ``small``.

A config maps one to one onto a Hugging Face Llama ``config.json`` (:meth:`to_hf`,
:meth:`from_hf`). ``block_tokens`` is kvpool's, not the model's: it is the pool block size
and also the prefill chunk (see :mod:`kvpool.worker.engine` for why the two are equal).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

__all__ = ["ModelConfig", "CONFIGS", "config_named"]


@dataclass(frozen=True)
class ModelConfig:
    name: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    max_positions: int = 65536
    tie_word_embeddings: bool = False
    #: Tokens per pool block and per prefill chunk: a multiple of ENGINE_BLOCK_SIZE.
    block_tokens: int = 16

    def __post_init__(self) -> None:
        for field in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                      "intermediate_size", "max_positions", "block_tokens"):
            value = getattr(self, field)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"ModelConfig.{field} must be a positive int, got {value!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if self.head_dim is None:
            if self.hidden_size % self.num_heads:
                raise ValueError("hidden_size must be a multiple of num_heads when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")

    @property
    def model_id(self) -> str:
        """The model part of the pool namespace: the config's name and every shape field."""
        return (f"kvpool-llama/{self.name}:v{self.vocab_size}-h{self.hidden_size}-l{self.num_layers}"
                f"-q{self.num_heads}-kv{self.num_kv_heads}-d{self.head_dim}-i{self.intermediate_size}"
                f"-theta{self.rope_theta:g}-eps{self.rms_norm_eps:g}")

    def to_hf(self, dtype: str = "float32") -> dict:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_positions,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "torch_dtype": dtype,
        }

    @classmethod
    def from_hf(cls, cfg: dict, name: str, block_tokens: int = 16) -> "ModelConfig":
        arch = cfg.get("architectures") or ["LlamaForCausalLM"]
        if cfg.get("model_type", "llama") != "llama" and "LlamaForCausalLM" not in arch:
            raise ValueError(f"config.json describes {arch}, not a Llama model")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {cfg['hidden_act']!r} is not supported (Llama uses silu)")
        if cfg.get("rope_scaling"):
            raise ValueError("rope_scaling is not supported by the reference model")
        return cls(
            name=name,
            vocab_size=int(cfg["vocab_size"]),
            hidden_size=int(cfg["hidden_size"]),
            num_layers=int(cfg["num_hidden_layers"]),
            num_heads=int(cfg["num_attention_heads"]),
            num_kv_heads=int(cfg.get("num_key_value_heads", cfg["num_attention_heads"])),
            intermediate_size=int(cfg["intermediate_size"]),
            head_dim=int(cfg["head_dim"]) if cfg.get("head_dim") else None,
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", 10000.0)),
            max_positions=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            block_tokens=block_tokens,
        )

    def with_(self, **changes) -> "ModelConfig":
        return replace(self, **changes)

    def as_dict(self) -> dict:
        return asdict(self)


CONFIGS: dict[str, ModelConfig] = {
    # Seconds-long tests: two layers, GQA 4:2, blocks of 16 tokens.
    "tiny": ModelConfig("tiny", vocab_size=512, hidden_size=64, num_layers=2, num_heads=4,
                        num_kv_heads=2, intermediate_size=160, block_tokens=16),
    # The demo and the TTFT benchmark: a 4K-token prefill takes about a second on two cores.
    "small": ModelConfig("small", vocab_size=4096, hidden_size=256, num_layers=4, num_heads=8,
                         num_kv_heads=2, intermediate_size=704, block_tokens=64),
}


def config_named(name: str) -> ModelConfig:
    try:
        return CONFIGS[name]
    except KeyError:
        raise ValueError(f"unknown model config {name!r}; choose one of {sorted(CONFIGS)} "
                         f"or pass a checkpoint directory") from None
