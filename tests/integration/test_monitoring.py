"""The dashboard and the alert rules against a real Prometheus scraping a real pool.

`promtool check rules` accepts the rules; a Prometheus started here scrapes `kvpool serve`,
loads the rules and evaluates them; every metric that the Grafana dashboard or a rule uses
exists in its query API, and every expression is valid PromQL there.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import pytest

from kvpool import Client
from tests.conftest import start_kvpool
from tests.integration.helpers import fresh_namespace, random_blocks, wait_for

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "kvpool-rules.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "kvpool.json"
METRIC = re.compile(r"\b(kvpool_[a-z0-9_]+|up)\b")
#: Grafana's variables, as a query at "now" would see them.
GRAFANA_VARS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}


def need(tool: str) -> str:
    path = shutil.which(tool)
    if path is None:
        why = f"{tool} is not installed (make system-deps installs Debian's prometheus package)"
        if os.environ.get("CI"):  # CI runs make test, which installs it: missing there is a failure
            pytest.fail(why)
        pytest.skip(why)
    return path


def dashboard_exprs() -> list[str]:
    exprs = [t["expr"] for p in json.loads(DASHBOARD.read_text())["panels"] for t in p.get("targets", [])]
    out = []
    for e in exprs:
        for var, value in GRAFANA_VARS.items():
            e = e.replace(var, value)
        out.append(e)
    return out


def rule_exprs() -> list[str]:
    import yaml

    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [r["expr"] for g in groups for r in g["rules"]]


def test_promtool_accepts_the_rules():
    r = subprocess.run([need("promtool"), "check", "rules", str(RULES)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 6 rules found" in r.stdout


def test_the_dashboard_covers_what_operators_watch():
    text = " ".join(dashboard_exprs())
    for metric in ("kvpool_hits_total", "kvpool_tier_used_bytes", "kvpool_put_bytes_total",
                   "kvpool_rpc_duration_seconds_bucket", "kvpool_evictions_total", "kvpool_corrupt_blocks_total",
                   "kvpool_nodes", "kvpool_active_leases"):
        assert metric in text, metric


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def api(base: str, path: str, **params) -> dict:
    url = f"{base}{path}" + ("?" + urllib.parse.urlencode(params) if params else "")
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.loads(resp.read())


def test_prometheus_scrapes_every_metric_the_dashboard_and_rules_use(server, tmp_path):
    prometheus = need("prometheus")
    # A node process beside the server's own node: it exports its tiers itself.
    node, m, _ = start_kvpool(["node", "--master", server.address, "--port", "0", "--metrics-port", "0",
                               "--node-name", "metrics-node", "--data-dir", str(tmp_path / "node")],
                              r"ready control=\S+ .*metrics=http://(\S+)/metrics .*shm=(\S+)")
    targets = {"kvpool": server.metrics_url.split("//")[1].split("/")[0], "kvpool-node": m.group(1)}
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        f"rule_files: [{json.dumps(str(RULES))}]\n"
        "scrape_configs:\n" + "".join(
            f"  - job_name: {job}\n    static_configs: [{{targets: [{json.dumps(t)}]}}]\n" for job, t in targets.items()))
    port = free_port()
    proc = subprocess.Popen([prometheus, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                             f"--web.listen-address=127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        # Traffic, so that counters move and the RPC histogram has series.
        ns = fresh_namespace()
        keys = [os.urandom(16) for _ in range(4)]
        with Client(server.address, ns) as c:
            c.put_blocks(keys, random_blocks(4))
            c.get_blocks(keys)
            c.lookup([os.urandom(16)])

        def scraped() -> bool:
            try:
                names = set(api(base, "/api/v1/label/__name__/values")["data"])
            except OSError:
                return False
            return {"kvpool_rpc_duration_seconds_bucket", "kvpool_hits_total", "kvpool_node_tier_used_bytes",
                    "up"} <= names

        assert wait_for(scraped, timeout=60, interval=0.5), "Prometheus never scraped the pool"
        names = set(api(base, "/api/v1/label/__name__/values")["data"])
        exprs = dashboard_exprs() + rule_exprs()
        used = {m for e in exprs for m in METRIC.findall(e)}
        assert len(used) >= 15
        assert not used - names, f"used by the dashboard or rules but not exported: {sorted(used - names)}"
        for expr in exprs:
            result = api(base, "/api/v1/query", query=expr)
            assert result["status"] == "success", (expr, result)
        up = api(base, "/api/v1/query", query='up{job="kvpool"}')["data"]["result"]
        assert up and up[0]["value"][1] == "1"

        def rules_healthy() -> bool:  # loaded, evaluated, and no expression failed
            rules = [r for g in api(base, "/api/v1/rules")["data"]["groups"] for r in g["rules"]]
            return len(rules) == 6 and all(r["health"] == "ok" for r in rules)

        assert wait_for(rules_healthy, timeout=30)
        firing = [a["labels"]["alertname"] for a in api(base, "/api/v1/alerts")["data"]["alerts"]]
        assert "KvpoolMasterDown" not in firing and "KvpoolCorruptBlocks" not in firing
    finally:
        node.terminate()
        node.wait(timeout=20)
        if os.path.exists(m.group(2)):
            os.unlink(m.group(2))
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
