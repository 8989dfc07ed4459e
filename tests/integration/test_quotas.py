"""Byte quotas per tenant and tier, against a real server: a tenant past its quota loses its
own blocks first, gets RESOURCE_EXHAUSTED naming the quota when none can go, and
`kvpool admin stats` shows use per tenant."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kvpool import Client
from kvpool.errors import PoolFull
from tests.integration.helpers import SMALL, fresh_namespace, random_blocks

QUOTA = 16 * SMALL.block_bytes  # 256 KiB: 16 blocks


def _keys(n):
    return [os.urandom(16) for _ in range(n)]


def test_a_tenant_past_its_quota_loses_its_own_blocks_then_is_refused(serve_factory):
    sp = serve_factory("--quotas", f"alice:dram={QUOTA}")
    alice_ns, bob_ns = fresh_namespace(tenant="alice"), fresh_namespace(tenant="bob")
    bob_keys, bob_data = _keys(8), random_blocks(8, seed=1)
    first, second = _keys(16), _keys(8)
    with Client(sp.address, bob_ns) as bob, Client(sp.address, alice_ns) as alice:
        bob.put_blocks(bob_keys, bob_data)
        assert alice.put_blocks(first, random_blocks(16, seed=2)).written == 16
        # 8 more: 8 of her own older blocks make room; bob's are untouched.
        new = random_blocks(8, seed=3)
        assert alice.put_blocks(second, new).written == 8
        assert np.array_equal(np.stack(alice.get_blocks(second)), new)
        kept = alice.get_blocks(first, allow_missing=True)
        assert sum(b is not None for b in kept) == 8
        assert np.array_equal(np.stack(bob.get_blocks(bob_keys)), bob_data)
        # With every block of hers leased, nothing of hers can go: refused, naming the quota.
        held = alice.lookup_leased(second)
        leased_first = [k for k, b in zip(first, kept) if b is not None]
        held2 = alice.lookup_leased(leased_first) if leased_first else None
        with pytest.raises(PoolFull, match=rf"quota exceeded: 'alice' may hold {QUOTA} bytes in dram"):
            alice.put_blocks(_keys(1), random_blocks(1, seed=4))
        alice.release([held.lease_id] + ([held2.lease_id] if held2 else []))
        # More than the whole quota at once can never fit.
        with pytest.raises(PoolFull, match="quota exceeded"):
            alice.put_blocks(_keys(17), random_blocks(17, seed=5))
        # Tenants without a quota are not limited by alice's.
        assert bob.put_blocks(_keys(20), random_blocks(20, seed=6)).written == 20

    r = subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", sp.address, "stats"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0
    row = next(line.split() for line in r.stdout.splitlines() if line.startswith("alice"))
    assert row[:3] == ["alice", "dram", "16"] and row[-1] == "100.0%"
    stats = json.loads(subprocess.run([sys.executable, "-m", "kvpool", "admin", "--address", sp.address, "--json",
                                       "stats"], capture_output=True, text=True, timeout=60).stdout)
    use = {t["tenant"]: t for t in stats["tenants"]}
    assert int(use["alice"]["used_bytes"]) == QUOTA and int(use["alice"]["quota_bytes"]) == QUOTA
    assert int(use["bob"]["blocks"]) == 28 and "quota_bytes" not in use["bob"]


def test_a_bad_quota_is_refused_at_start(tmp_path):
    r = subprocess.run([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--data-dir", str(tmp_path / "d"),
                        "--quotas", "alice:nvme=1GiB"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "memory tiers dram and hbm" in r.stderr
