"""Several master addresses, and which one to call: the leader.

``--master a:50051,b:50051`` names masters that share a Redis; one of them leads
(:mod:`kvpool.master.leader`). :class:`MasterList` keeps the address to call. After a call
fails with UNAVAILABLE it moves on: to the leader a standby named (trailing metadata
``kvpool-leader``, see :mod:`kvpool.master.gate`), else to the next address in the list.
Callers retry for up to ``failover_s`` (a takeover needs the leader's lease to lapse).
"""

from __future__ import annotations

__all__ = ["MasterList", "LEADER_METADATA", "leader_hint", "FAILOVER_S", "follows"]

LEADER_METADATA = "kvpool-leader"
#: How long a caller keeps retrying UNAVAILABLE while masters fail over (lease TTL 3 s,
#: plus a takeover's reconciliation, with margin).
FAILOVER_S = 15.0


def leader_hint(exc) -> str:
    """The leader's address that a standby put in a failed call's trailing metadata."""
    try:
        for key, value in exc.trailing_metadata() or ():
            if key == LEADER_METADATA:
                return value
    except Exception:  # not an RPC error, or no metadata
        pass
    return ""


#: How gRPC words a call that never reached a server (its messages; it has no finer code).
_UNREACHED = ("failed to connect", "connection refused", "socket closed", "connection reset", "broken pipe",
              "connection attempt timed out", "goaway", "stream removed", "unreachable")


def follows(exc) -> bool:
    """Whether a failed call should go to another master: a master that does not lead said
    so, or no master answered at all. Other UNAVAILABLE errors (a storage node left the
    pool) are the leader's answer and must reach the caller."""
    try:
        if exc.code().name != "UNAVAILABLE":
            return False
        if any(key == LEADER_METADATA for key, _ in exc.trailing_metadata() or ()):
            return True
        details = (exc.details() or "").lower()
    except Exception:
        return False
    return any(word in details for word in _UNREACHED)


class MasterList:
    def __init__(self, spec: str) -> None:
        self.addresses = [a.strip() for a in spec.split(",") if a.strip()]
        if not self.addresses:
            raise ValueError(f"no master address in {spec!r}; give host:port[,host:port...]")
        self._i = 0
        self.current = self.addresses[0]

    @property
    def several(self) -> bool:
        return len(self.addresses) > 1

    def failed(self, exc=None) -> str:
        """The call to ``current`` failed: pick the address to try next."""
        hint = leader_hint(exc) if exc is not None else ""
        if hint and hint != self.current:
            self.current = hint
            if hint not in self.addresses:
                self.addresses.append(hint)
            self._i = self.addresses.index(hint)
        else:
            self._i = (self._i + 1) % len(self.addresses)
            self.current = self.addresses[self._i]
        return self.current
