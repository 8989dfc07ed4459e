"""A master and storage nodes as separate `kvpool` processes, for tests of operating commands.

Like the fixture of test_cluster.py, with a heartbeat interval of 1 s: a node is forgotten
only after 5 s of silence, so a loaded machine (the full suite on 2 shared cores) does not
make a node vanish in the middle of a test that is about something else.
"""

from __future__ import annotations

import os

import pytest

from kvpool.rpc.v1 import common_pb2
from tests.conftest import start_kvpool
from tests.integration.helpers import wait_for
from tests.integration.rpc_helpers import stubs

HEARTBEAT = "1"


@pytest.fixture
def cluster(tmp_path):
    """``(master, node)``: ``master()`` starts one and returns (process, address);
    ``node(address, name, *args)`` starts a node that joins it. All stop at the end."""
    started = []
    shm: list[str] = []

    def master() -> tuple[object, str]:
        proc, m, _ = start_kvpool(["master", "--port", "0", "--metrics-port", "-1", "--heartbeat-interval", HEARTBEAT],
                                  r"ready grpc=(\S+)")
        started.append(proc)
        return proc, m.group(1)

    def node(master_address: str, name: str = "node-a", *args: str):
        proc, m, _ = start_kvpool(["node", "--master", master_address, "--port", "0", "--node-name", name,
                                   "--data-dir", str(tmp_path / name), *args], r"ready control=\S+ .*shm=(\S+)")
        started.append(proc)
        shm.append(m.group(1))
        return proc

    yield master, node
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=20)
    for path in shm:
        if os.path.exists(path):
            os.unlink(path)


def registered(address: str, count: int = 1) -> bool:
    def nodes() -> int:
        with stubs(address) as (_, admin):
            return admin.Stats(common_pb2.StatsRequest(), timeout=10).nodes

    return wait_for(lambda: nodes() == count, timeout=20)
