"""The Kubernetes manifests' masters and node, as real processes: two ``kvpool master`` and one
``kvpool node`` started with exactly the arguments `kubectl kustomize` renders (the sidecar
overlay), with cluster addresses rewritten to loopback ports and a real redis-server as the
Secret's Redis. One master leads and one stands by; every probe's health service answers
SERVING on both (so Kubernetes restarts neither); the node registers with the leader.
"""

from __future__ import annotations

import re
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from kvpool.rpc.v1 import common_pb2
from tests.conftest import start_kvpool
from tests.integration.helpers import wait_for
from tests.integration.redis_server import free_port, redis_server  # noqa: F401  (fixture)
from tests.integration.rpc_helpers import stubs
from tests.unit.test_deploy_kubernetes import (
    flag_value,
    kvpool_containers,
    master_addresses,
    render,
)


def expand(args: list[str], env: dict[str, str]) -> list[str]:
    """Kubernetes' $(VAR) expansion of container args."""
    return [re.sub(r"\$\((\w+)\)", lambda m: env[m.group(1)], a) for a in args]


def replace_flag(args: list[str], flag: str, value: str) -> list[str]:
    out = list(args)
    out[out.index(flag) + 1] = value
    return out


ADMIN_TOKEN = "admin-token-for-the-rendered-masters"
NODE_TOKEN = "node-token-for-the-rendered-node"
AS_ADMIN = (("authorization", f"Bearer {ADMIN_TOKEN}"),)


def node_count(address: str) -> int:
    try:
        with stubs(address) as (_, admin):
            return admin.Stats(common_pb2.StatsRequest(), timeout=5, metadata=AS_ADMIN).nodes
    except grpc.RpcError:
        return -1


def health(address: str, service: str) -> int:
    with grpc.insecure_channel(address) as ch:
        return health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status


def test_rendered_masters_elect_one_leader_and_the_rendered_node_registers(redis_server, tmp_path):
    docs = render("sidecar")
    names = master_addresses(docs)                                  # kvpool-master-N.kvpool-master:50051
    loopback = {name: f"127.0.0.1:{free_port()}" for name in names}
    (sts, master), = [(w, c) for w, c in kvpool_containers(docs) if c["args"][0] == "master"]
    _, node = next((w, c) for w, c in kvpool_containers(docs) if c["args"][0] == "node")
    # The manifests mount tokens from Secrets; here the same flags point at files of ours.
    tokens = tmp_path / "tokens"
    tokens.write_text(f"{ADMIN_TOKEN} admin\n{NODE_TOKEN} node\n")
    node_token = tmp_path / "node.token"
    node_token.write_text(NODE_TOKEN + "\n")
    started = []
    try:
        masters = []
        for i, name in enumerate(names):
            pod = f"{sts['metadata']['name']}-{i}"
            args = expand(master["args"], {"POD_NAME": pod, "KVPOOL_REDIS_URL": redis_server.url})
            assert flag_value(args, "--advertise-host") + ":" + flag_value(args, "--port") == name
            host, port = loopback[name].split(":")
            args = replace_flag(replace_flag(replace_flag(args, "--host", host), "--port", port), "--advertise-host",
                                host)
            args = replace_flag(replace_flag(args, "--metrics-port", "0"), "--auth-tokens", str(tokens))
            proc, _, lines = start_kvpool(args, r"(ready|standby) grpc=")
            started.append(proc)
            masters.append((loopback[name], lines))
        # One leads, the other stands by; both answer every probe SERVING.
        def took_over(lines) -> bool:
            return "took over with fencing epoch 1" in "".join(lines)

        assert wait_for(lambda: any(took_over(lines) for _, lines in masters), timeout=15)
        (leader,) = [a for a, lines in masters if took_over(lines)]
        (standby,) = [a for a, lines in masters if not took_over(lines)]
        probes = {master[p]["grpc"].get("service", "") for p in ("startupProbe", "readinessProbe", "livenessProbe")}
        for address, _ in masters:
            for service in probes:
                assert health(address, service) == health_pb2.HealthCheckResponse.SERVING, (address, service)

        args = expand(node["args"], {"POD_IP": "127.0.0.1", "POD_NAME": "decode-worker-0"})
        master_list = ",".join(loopback[n] for n in flag_value(args, "--master").split(","))
        for flag, value in (("--master", master_list), ("--port", "0"), ("--data-port", "0"),
                            ("--metrics-port", "0"), ("--dram", "64MiB"), ("--data-dir", str(tmp_path / "node")),
                            ("--token-file", str(node_token))):
            args = replace_flag(args, flag, value)
        proc, _, _ = start_kvpool(args, r"ready control=")
        started.append(proc)
        assert wait_for(lambda: node_count(leader) == 1, timeout=15)
        # The standby names the leader by the address the node was given for it.
        with stubs(standby) as (_, admin), pytest.raises(grpc.RpcError) as info:
            admin.Stats(common_pb2.StatsRequest(), timeout=5, metadata=AS_ADMIN)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert dict(info.value.trailing_metadata())["kvpool-leader"] == leader
    finally:
        for proc in reversed(started):
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=20)
