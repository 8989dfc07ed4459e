"""From a batch's locations to the copies the client runs: one :class:`Share` per thread.

The master answers a batch with a ``Locations`` message: the nodes involved, a record per
block, and a capability per node. This module groups the records by node and tier, opens
(through the :class:`~kvpool.transport.base.TransportFactory`) the transport that reaches
each group, cuts each group into contiguous shares for the copy threads, and attaches the
node's capability to shares whose transport crosses a network.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kvpool.transport.base import Access, Share, Transport, TransportCaps, TransportFactory
from kvpool.transport.endpoint import NodeEndpoint
from kvpool.wire import TIER_NAMES, decode_locations

__all__ = ["Planned", "plan"]


@dataclass
class Planned:
    """One share and where it goes: ``index`` are the blocks' positions in the batch."""

    transport: Transport
    node: NodeEndpoint
    index: list[int]
    share: Share


def _endpoints(locations, cache: dict[int, NodeEndpoint]) -> dict[int, NodeEndpoint]:
    out = {}
    for msg in locations.nodes:
        ep = cache.get(msg.node_id)
        if ep is None:  # node ids are never reused, so an endpoint never changes
            ep = cache[msg.node_id] = NodeEndpoint.from_proto(msg)
        out[msg.node_id] = ep
    return out


def plan(locations, factory: TransportFactory, op: int, grant_id: str, threads: int,
         endpoint_cache: dict[int, NodeEndpoint]) -> list[Planned]:
    records = decode_locations(locations)
    if not len(records):
        return []
    nodes = _endpoints(locations, endpoint_cache)
    caps = {c.node_id: c for c in locations.caps}
    out: list[Planned] = []
    node_ids = records["node_id"]
    for node_id in np.unique(node_ids).tolist():
        node_idx = np.flatnonzero(node_ids == node_id)
        node_recs = records[node_idx]  # the records this node's capability covers, in order
        tiers = node_recs["tier"]
        for tier in np.unique(tiers).tolist():
            pos = np.flatnonzero(tiers == tier)
            transport = factory.get(nodes[node_id], TIER_NAMES[tier])
            access = None
            if TransportCaps.NETWORK in transport.caps and node_id in caps:
                cap = caps[node_id]
                access = Access(op, grant_id, node_id, cap.expires_unix_ms, bytes(cap.mac), node_recs.tobytes(),
                                cap.tenant)
            n = max(1, min(threads, len(pos)))
            bounds = [len(pos) * k // n for k in range(n + 1)]
            for a, b in zip(bounds, bounds[1:]):
                if b > a:
                    p = pos[a:b]
                    out.append(Planned(transport, nodes[node_id], node_idx[p].tolist(),
                                       Share(node_recs[p], p, access)))
    return out
