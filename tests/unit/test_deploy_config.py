"""The example TOML in deploy/ stays valid: every key is a real setting."""

from __future__ import annotations

from pathlib import Path

from kvpool.config import ServeSettings, resolve_settings

EXAMPLE = Path(__file__).resolve().parents[2] / "deploy" / "kvpool.example.toml"


def test_example_config_loads_and_matches_defaults():
    loaded = resolve_settings(ServeSettings, {}, config_path=str(EXAMPLE), environ={})
    defaults = ServeSettings()
    for name in ("port", "metrics_port", "dram", "slab_bytes", "lease_ttl", "grant_ttl", "max_batch",
                 "high_watermark", "low_watermark", "eviction_policy", "prefault", "data_port",
                 "advertise_host", "ucx"):
        assert getattr(loaded, name) == getattr(defaults, name), name
