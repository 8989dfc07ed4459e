"""The Redis records of kvpool.master.metastore that need no server: tenant settings."""

from __future__ import annotations

import pytest

from kvpool.config import parse_quotas
from kvpool.master.metastore import tenant_from_json, tenant_to_json


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
