"""A KV-event subscriber as a router runs it, in its own process (ZMQ SUB + msgpack).

    python tests/integration/kv_event_subscriber.py tcp://HOST:PORT SECONDS [UNTIL]
    KVPOOL_TOKEN=... python tests/integration/kv_event_subscriber.py grpc://HOST:PORT SECONDS [UNTIL]

``tcp://`` reads the master's ZMQ PUB socket (every tenant's events, for trusted routers);
``grpc://`` streams ``Admin/SubscribeEvents`` with the bearer token in ``$KVPOOL_TOKEN``
(a client token receives its own tenant's events only). Prints ``subscribed`` once connected,
then, after SECONDS or once the event UNTIL arrived, one JSON line: the batches received, each ``{"seq", "ts", "events"}``, with
block hashes as hex. UNTIL is an event kind (``BlockRemoved``), or a kind and a block hash
in hex (``BlockRemoved:0a1b...``): the first event of that kind that names that block.
"""

from __future__ import annotations

import json
import sys
import time

import msgpack
import zmq


def _decode(events) -> tuple[list, list[str]]:
    """The events with hashes in hex, and the marks UNTIL can match: each event's kind, and
    ``kind:hash`` for each block it names."""
    out, marks = [], []
    for ev in events:
        kind = ev[0]
        marks.append(kind)
        if kind in ("BlockStored", "BlockRemoved"):
            ev = [kind, [h.hex() for h in ev[1]], *ev[2:]]
            marks += [f"{kind}:{h}" for h in ev[1]]
        out.append(ev)
    return out, marks


def main() -> None:
    endpoint, seconds = sys.argv[1], float(sys.argv[2])
    until = sys.argv[3] if len(sys.argv) > 3 else None
    if endpoint.startswith("grpc://"):
        return over_grpc(endpoint.removeprefix("grpc://"), seconds, until)
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    time.sleep(0.3)  # ZMQ's slow joiner: let the subscription reach the publisher
    print("subscribed", flush=True)
    batches = []
    deadline = time.monotonic() + seconds
    done = False
    while not done and time.monotonic() < deadline:
        if not sub.poll(100):
            continue
        topic, seq, payload = sub.recv_multipart()
        ts, events = msgpack.unpackb(payload, raw=False)
        out, kinds = _decode(events)
        done = until in kinds
        batches.append({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"), "ts": ts, "events": out})
    print(json.dumps(batches), flush=True)
    sub.close(0)
    ctx.term()


def over_grpc(address: str, seconds: float, until: str | None) -> None:
    import os

    import grpc

    from kvpool.auth import bearer_metadata
    from kvpool.rpc.v1 import admin_pb2, admin_pb2_grpc

    batches = []
    with grpc.insecure_channel(address) as channel:
        call = admin_pb2_grpc.AdminStub(channel).SubscribeEvents(
            admin_pb2.SubscribeEventsRequest(), metadata=bearer_metadata(os.environ.get("KVPOOL_TOKEN")),
            timeout=seconds)
        call.initial_metadata()  # the master sends its headers once the subscription is in place
        print("subscribed", flush=True)
        try:
            for batch in call:
                ts, events = msgpack.unpackb(batch.payload, raw=False)
                out, kinds = _decode(events)
                batches.append({"seq": batch.seq, "ts": ts, "events": out})
                if until in kinds:
                    break
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                print(f"SubscribeEvents failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
                sys.exit(1)
        call.cancel()
    print(json.dumps(batches), flush=True)


if __name__ == "__main__":
    main()
