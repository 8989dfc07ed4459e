"""The Redis records of kvpool.master.metastore that need no server: tenant settings and
namespace records with their settings."""

from __future__ import annotations

import dataclasses
import json

import pytest

from kvpool.config import parse_quotas
from kvpool.identity import Namespace
from kvpool.layout import KVLayout
from kvpool.master.index import NamespaceInfo
from kvpool.master.metastore import (
    NamespaceSettings,
    namespace_from_json,
    namespace_to_json,
    tenant_from_json,
    tenant_to_json,
)

NS = Namespace(model="m", layout=KVLayout(num_layers=2, num_kv_heads=2, head_dim=64, block_tokens=16),
               tenant="alice", lora="l", salt="s")


def test_tenant_settings_round_trip_what_parse_quotas_gives():
    quotas = parse_quotas("alice:dram=8GiB,alice:hbm=1GiB,:dram=2GiB")
    for tenant, tiers in quotas.items():
        assert tenant_from_json(tenant_to_json(tiers)) == tiers
    assert tenant_to_json({"dram": 5}) == b'{"quotas": {"dram": 5}}'


@pytest.mark.parametrize("record", [b'{"quotas": {"nvme": 5}}', b'{"quotas": {"dram": -1}}',
                                    b'{"quotas": {"dram": "8GiB"}}', b'{"quotas": {"dram": 1.5}}', b"not json"])
def test_unreadable_tenant_settings_are_refused(record):
    with pytest.raises(ValueError):
        tenant_from_json(record)


@pytest.mark.parametrize("replicas", [0, 1, 3])
def test_a_namespace_record_keeps_its_settings(replicas):
    ns, settings = namespace_from_json(namespace_to_json(NamespaceInfo(NS, NS.layout.block_bytes, replicas)))
    assert (ns, ns.id, settings) == (NS, NS.id, NamespaceSettings(replicas=replicas))


def test_a_record_written_before_settings_were_kept_loads_with_none_set():
    ns, settings = namespace_from_json(json.dumps(dataclasses.asdict(NS)).encode())
    assert (ns, settings.replicas) == (NS, 0)


@pytest.mark.parametrize("settings", [{"replicas": -1}, {"replicas": 99}, {"replicas": "2"}, {"copies": 2}])
def test_unreadable_namespace_settings_are_refused(settings):
    record = dataclasses.asdict(NS) | {"settings": settings}
    with pytest.raises((ValueError, TypeError)):
        namespace_from_json(json.dumps(record).encode())
