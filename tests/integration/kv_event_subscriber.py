"""A KV-event subscriber as a router runs it, in its own process (ZMQ SUB + msgpack).

    python tests/integration/kv_event_subscriber.py tcp://HOST:PORT SECONDS [UNTIL_KIND]

Prints ``subscribed`` once connected, then, after SECONDS or once an event of kind UNTIL_KIND
arrived, one JSON line: the batches received, each ``{"seq", "ts", "events"}``, with
block hashes as hex.
"""

from __future__ import annotations

import json
import sys
import time

import msgpack
import zmq


def main() -> None:
    endpoint, seconds = sys.argv[1], float(sys.argv[2])
    until = sys.argv[3] if len(sys.argv) > 3 else None
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
        out = []
        for ev in events:
            kind = ev[0]
            if kind in ("BlockStored", "BlockRemoved"):
                ev = [kind, [h.hex() for h in ev[1]], *ev[2:]]
            out.append(ev)
            done = done or kind == until
        batches.append({"topic": topic.decode(), "seq": int.from_bytes(seq, "big"), "ts": ts, "events": out})
    print(json.dumps(batches), flush=True)
    sub.close(0)
    ctx.term()


if __name__ == "__main__":
    main()
