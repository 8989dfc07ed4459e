"""The reference model: seeded init, Hugging Face checkpoints written and read back."""

import json

import pytest

torch = pytest.importorskip("torch")

from kvpool.worker import CONFIGS, Engine, LlamaModel  # noqa: E402
from kvpool.worker.checkpoint import weight_shapes  # noqa: E402


def test_seeded_init_is_deterministic_and_seed_dependent():
    a, b, c = LlamaModel.seeded("tiny", seed=3), LlamaModel.seeded("tiny", seed=3), LlamaModel.seeded("tiny", seed=4)
    for name in weight_shapes(CONFIGS["tiny"]):
        assert torch.equal(a.w[name], b.w[name]), name
    assert not torch.equal(a.w["lm_head.weight"], c.w["lm_head.weight"])
    # The weights are part of block identity: other weights, other namespace.
    assert Engine(a, 256).namespace.root == Engine(b, 256).namespace.root
    assert Engine(a, 256).namespace.root != Engine(c, 256).namespace.root


def test_checkpoint_round_trip_in_hugging_face_naming(tmp_path):
    model = LlamaModel.seeded("tiny", seed=1)
    files = model.save_pretrained(str(tmp_path))
    from safetensors import safe_open

    with safe_open(str(tmp_path / files[0]), "pt") as f:
        names = set(f.keys())
    assert "model.layers.1.self_attn.k_proj.weight" in names and "lm_head.weight" in names
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["num_key_value_heads"] == 2 and cfg["architectures"] == ["LlamaForCausalLM"]

    loaded = LlamaModel.from_pretrained(str(tmp_path), block_tokens=16)
    assert loaded.config.with_(name="tiny") == model.config
    prompt = list(range(7, 47))
    assert Engine(loaded, 512).generate(prompt, 6) == Engine(model, 512).generate(prompt, 6)


def test_sharded_tied_checkpoint_loads(tmp_path):
    cfg = CONFIGS["tiny"].with_(tie_word_embeddings=True)
    model = LlamaModel.seeded(cfg, seed=2)
    assert "lm_head.weight" not in model.w
    from kvpool.worker.checkpoint import save_checkpoint

    files = save_checkpoint(str(tmp_path), cfg, model.w, max_file_bytes=64 << 10)
    assert len(files) > 1
    loaded = LlamaModel.from_pretrained(str(tmp_path))
    assert loaded.lm_head is loaded.w["model.embed_tokens.weight"]
    assert Engine(loaded, 512).generate([1, 2, 3], 4) == Engine(model, 512).generate([1, 2, 3], 4)


def test_checkpoint_of_another_shape_is_refused_by_name(tmp_path):
    model = LlamaModel.seeded("tiny")
    model.save_pretrained(str(tmp_path))
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["intermediate_size"] = 96
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight"):
        LlamaModel.from_pretrained(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="config.json"):
        LlamaModel.from_pretrained(str(tmp_path / "nowhere"))
