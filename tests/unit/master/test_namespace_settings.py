"""A namespace's settings reach the index's observers (the Redis store writes them), and a
registration that states no setting keeps the one there is."""

from __future__ import annotations

from kvpool.identity import Namespace
from kvpool.master.index import BlockIndex, IndexConfig
from kvpool.master.nodes import NodeRegistry
from tests.unit.master.test_placement import LAYOUT


class Told:
    def __init__(self) -> None:
        self.infos = []

    def namespace(self, info) -> None:
        self.infos.append((info.namespace.model, info.replicas))


def test_observers_hear_of_a_namespace_and_every_change_of_its_settings():
    index = BlockIndex(NodeRegistry(), IndexConfig(eviction_policy="lru"))
    told = Told()
    index.observers.append(told)
    a, b = Namespace("a", LAYOUT), Namespace("b", LAYOUT)
    index.register_namespace(a)
    index.register_namespace(b, replicas=2)            # told once, with its setting
    index.set_replicas(a.id, 3)
    index.register_namespace(a)                        # states nothing: keeps 3, nothing to tell
    index.set_replicas(a.id, 3)                        # no change: nothing to tell
    index.register_namespace(a, replicas=1)
    assert told.infos == [("a", 0), ("b", 2), ("a", 3), ("a", 1)]
    assert index.replicas_of(a.id) == 1 and index.replicas_of(b.id) == 2
