from __future__ import annotations

import pytest

from kvpool.config import ServeSettings, format_size, parse_size, resolve_settings


@pytest.mark.parametrize("text,n", [("4GiB", 4 * 2**30), ("512MiB", 512 * 2**20), ("2GB", 2 * 10**9),
                                    ("1048576", 2**20), ("1.5KiB", 1536), (" 8 mib ", 8 * 2**20), (7, 7)])
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["lots", "4XB", "-1", "GiB"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


def test_format_size():
    assert format_size(4 * 2**30) == "4.0GiB" and format_size(10) == "10B"


def test_precedence(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('port = 6000\ndram = "1GiB"\nprefault = false\n')
    env = {"KVPOOL_PORT": "5000", "KVPOOL_DRAM": "2GiB", "KVPOOL_METRICS_PORT": "7000", "KVPOOL_PREFAULT": "true"}
    s = resolve_settings(ServeSettings, {"port": 4000, "dram": None}, config_path=str(cfg), environ=env)
    assert s.port == 4000            # flag
    assert s.dram == 2**30           # TOML over env
    assert s.prefault is False       # TOML over env
    assert s.metrics_port == 7000    # env over default
    assert s.lease_ttl == 30.0       # default


def test_config_path_from_env_and_unknown_keys(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text("metrics-port = 1234\n")
    s = resolve_settings(ServeSettings, {}, environ={"KVPOOL_CONFIG": str(cfg)})
    assert s.metrics_port == 1234
    cfg.write_text("colour = 'blue'\n")
    with pytest.raises(ValueError, match="unknown setting 'colour'"):
        resolve_settings(ServeSettings, {}, config_path=str(cfg), environ={})


def test_validation():
    with pytest.raises(ValueError, match="watermark"):
        resolve_settings(ServeSettings, {"low_watermark": 0.99, "high_watermark": 0.5}, environ={})
    with pytest.raises(ValueError, match="true or false"):
        resolve_settings(ServeSettings, {}, environ={"KVPOOL_PREFAULT": "maybe"})


def test_the_default_eviction_policy_is_the_masters():
    from kvpool.config import MasterSettings
    from kvpool.master.eviction import DEFAULT_POLICY, POLICIES

    assert MasterSettings().eviction_policy == DEFAULT_POLICY and DEFAULT_POLICY in POLICIES
