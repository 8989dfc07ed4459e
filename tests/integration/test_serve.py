"""`kvpool serve` as a process: endpoints, health, reflection, metrics, config, shutdown."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import urllib.request

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from kvpool import Client
from kvpool.rpc.v1 import common_pb2, pool_pb2
from tests.integration.helpers import fresh_namespace, random_blocks, tokens
from tests.integration.rpc_helpers import register, stubs


def test_ready_line_names_every_endpoint(server):
    line = next(l for l in server.lines if "ready" in l)
    for part in ("grpc=127.0.0.1:", "metrics=http://127.0.0.1:", "dram=64.0MiB", "shm=/dev/shm/kvpool-", "policy="):
        assert part in line
    assert os.path.exists(server.shm_path)


def test_health_and_reflection(server):
    with grpc.insecure_channel(server.address) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", "kvpool.v1.KVPool", "kvpool.v1.Admin"):
            resp = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        refl = reflection_pb2_grpc.ServerReflectionStub(ch)
        answers = list(refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5))
        names = {s.name for s in answers[0].list_services_response.service}
        assert {"kvpool.v1.KVPool", "kvpool.v1.Admin", "grpc.health.v1.Health"} <= names


def test_metrics_follow_prometheus_conventions(server):
    ns = fresh_namespace()
    with Client(server.address, ns) as c:
        c.publish(tokens(32), random_blocks(2))
        c.match(tokens(32))
    body = urllib.request.urlopen(server.metrics_url, timeout=5).read().decode()
    for name in ("kvpool_tier_blocks{", "kvpool_tier_used_bytes{", "kvpool_tier_capacity_bytes{",
                 "kvpool_hits_total", "kvpool_misses_total", "kvpool_puts_total", "kvpool_put_bytes_total",
                 "kvpool_evictions_total{", "kvpool_rpc_duration_seconds_bucket{"):
        assert name in body, name
    puts = [l for l in body.splitlines() if l.startswith("kvpool_puts_total ")]
    assert float(puts[0].split()[1]) >= 2
    assert 'kvpool_rpc_duration_seconds_count{code="OK",method="PutStart"}' in body


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_clean_shutdown_aborts_puts_and_unlinks_shm(serve_factory, sig):
    sp = serve_factory()
    ns = fresh_namespace()
    with stubs(sp.address) as (pool, _):
        ns_id = register(pool, ns)
        pool.PutStart(pool_pb2.PutStartRequest(namespace_id=ns_id, keys=os.urandom(16), sizes=[ns.layout.block_bytes]))
    assert sp.stop(sig) == 0
    assert not os.path.exists(sp.shm_path)
    log = sp.log()
    assert "aborted 1 in-flight put blocks" in log and "shared memory unlinked" in log


def test_config_precedence_flags_over_toml_over_env(serve_factory, tmp_path):
    cfg = tmp_path / "kvpool.toml"
    cfg.write_text('dram = "32MiB"\neviction_policy = "lru"\nlease_ttl = 12.5\n')
    # env says 16MiB, TOML 32MiB: TOML wins.
    sp = serve_factory("--config", str(cfg), env={"KVPOOL_DRAM": "16MiB", "KVPOOL_GRANT_TTL": "7"})
    with stubs(sp.address) as (_, admin):
        assert admin.Stats(common_pb2.StatsRequest()).tiers[0].capacity_bytes == 32 * 2**20
    # A flag beats both.
    sp2 = serve_factory("--config", str(cfg), "--dram", "8MiB", env={"KVPOOL_DRAM": "16MiB"})
    with stubs(sp2.address) as (_, admin):
        assert admin.Stats(common_pb2.StatsRequest()).tiers[0].capacity_bytes == 8 * 2**20
    # Env alone applies when neither flag nor file says otherwise.
    sp3 = serve_factory(env={"KVPOOL_DRAM": "16MiB"})
    with stubs(sp3.address) as (_, admin):
        assert admin.Stats(common_pb2.StatsRequest()).tiers[0].capacity_bytes == 16 * 2**20


def run_serve(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvpool", "serve", "--port", "0", "--metrics-port", "-1", *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})})


def test_bad_settings_fail_fast_with_a_message(tmp_path):
    r = run_serve("--dram", "lots")
    assert r.returncode == 2 and "4GiB" in r.stderr
    bad = tmp_path / "bad.toml"
    bad.write_text("dramm = 1\n")
    r = run_serve("--config", str(bad))
    assert r.returncode == 2 and "unknown setting 'dramm'" in r.stderr
    r = run_serve("--dram", "1TiB")
    assert r.returncode == 1 and "/dev/shm" in r.stderr


def test_port_in_use_is_reported(server, tmp_path):
    port = server.address.rsplit(":", 1)[1]
    r = run_serve("--port", port, "--dram", "8MiB", "--data-dir", str(tmp_path))
    assert r.returncode != 0 and "in use" in r.stderr


def test_metrics_pass_promtool_lint(server):
    import shutil

    from tests.conftest import unavailable

    promtool = shutil.which("promtool")
    if promtool is None:
        unavailable("promtool is not installed (make test installs it with the prometheus package)")
    body = urllib.request.urlopen(server.metrics_url, timeout=5).read()
    r = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert r.returncode == 0, r.stdout.decode() + r.stderr.decode()


def test_hbm_without_cuda_fails_with_a_reason(tmp_path):
    from kvpool.tiers.hbm import HbmArena

    if HbmArena.available()[0]:
        pytest.skip("CUDA is present: tests/gpu covers the HBM tier")
    r = run_serve("--hbm", "64MiB", "--dram", "8MiB", "--data-dir", str(tmp_path))
    assert r.returncode == 1 and "needs CUDA" in r.stderr and "Traceback" not in r.stderr
