"""Following the leader among several masters (kvpool.masters)."""

from __future__ import annotations

import grpc
import pytest

from kvpool.masters import MasterList, follows


class Failed:
    """What a grpc error offers: code, details, trailing metadata."""

    def __init__(self, code, details="", metadata=()):
        self._code, self._details, self._metadata = code, details, metadata

    def code(self):
        return self._code

    def details(self):
        return self._details

    def trailing_metadata(self):
        return self._metadata


def test_a_standby_names_the_leader_and_the_list_goes_there():
    masters = MasterList("a:1, b:2")
    assert masters.several and masters.current == "a:1"
    assert masters.failed(Failed(grpc.StatusCode.UNAVAILABLE, "", (("kvpool-leader", "c:3"),))) == "c:3"
    assert masters.addresses == ["a:1", "b:2", "c:3"]
    assert masters.failed(Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses")) == "a:1"


def test_only_unreached_masters_and_standbys_are_followed():
    assert follows(Failed(grpc.StatusCode.UNAVAILABLE, "failed to connect to all addresses; Connection refused"))
    assert follows(Failed(grpc.StatusCode.UNAVAILABLE, "whatever", (("kvpool-leader", ""),)))
    # The leader's own answer (a storage node left) must reach the caller, not be retried elsewhere.
    assert not follows(Failed(grpc.StatusCode.UNAVAILABLE, "PutCommit: node n1 holding slots of put 1 left the pool"))
    assert not follows(Failed(grpc.StatusCode.NOT_FOUND, "failed to connect"))


def test_an_empty_list_is_refused():
    with pytest.raises(ValueError, match="no master address"):
        MasterList(" , ")
