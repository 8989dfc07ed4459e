"""``python -m kvpool.worker ROLE``: run one worker process.

    python -m kvpool.worker prefill   --pool 127.0.0.1:50051 [--model small] [--port 0]
    python -m kvpool.worker decode    --pool 127.0.0.1:50051
    python -m kvpool.worker colocated

It logs ``kvpool worker ready role=ROLE listen=HOST:PORT namespace=ID kernels=K`` once it
serves, and stops on SIGTERM or SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from kvpool.worker.protocol import MAX_LINE

__all__ = ["main", "build_parser", "make_engine"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m kvpool.worker", description="run a prefill, decode or colocated worker")
    p.add_argument("role", choices=("prefill", "decode", "colocated"))
    p.add_argument("--pool", default="127.0.0.1:50051", help="kvpool master address (not used by colocated)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on for the router")
    p.add_argument("--port", type=int, default=0, help="port to listen on (0 picks a free one)")
    add_model_flags(p)
    p.add_argument("--reuse", choices=("true", "false"), default="true",
                   help="prefill: fetch cached prefixes from the pool (false: compute every prompt)")
    p.add_argument("--transport", default=None, help="force a data-plane transport (tcp, shm, ucx)")
    return p


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="small", help="named config (tiny, small) or a Hugging Face checkpoint directory")
    p.add_argument("--seed", type=int, default=0, help="seed of the named config's weights")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--block-tokens", type=int, default=None, help="pool block = prefill chunk, in tokens")
    p.add_argument("--cache-tokens", type=int, default=65536, help="paged KV cache capacity, in tokens")
    p.add_argument("--kernels", default="auto", choices=("auto", "triton", "torch"))
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads; every process of one deployment must use the same count")


def make_engine(args):
    import os

    import torch

    from kvpool.worker.config import CONFIGS
    from kvpool.worker.engine import Engine
    from kvpool.worker.model import LlamaModel

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    if args.model in CONFIGS:
        cfg = CONFIGS[args.model]
        if args.block_tokens:
            cfg = cfg.with_(block_tokens=args.block_tokens)
        model = LlamaModel.seeded(cfg, seed=args.seed, dtype=dtype, device=args.device)
    elif os.path.isdir(args.model):
        model = LlamaModel.from_pretrained(args.model, dtype=dtype, device=args.device,
                                           block_tokens=args.block_tokens or 16)
    else:
        raise SystemExit(f"--model {args.model!r} is neither a named config ({', '.join(CONFIGS)}) "
                         f"nor a checkpoint directory")
    return Engine(model, capacity_tokens=args.cache_tokens, kernels=args.kernels)


async def serve(args) -> None:
    from kvpool.client import AsyncClient
    from kvpool.worker.workers import WORKERS

    engine = make_engine(args)
    client = None
    if args.role != "colocated":
        client = AsyncClient(args.pool, engine.namespace, transport=args.transport)
        await client.connect()
    kwargs = {"reuse": args.reuse == "true"} if args.role == "prefill" else {}
    worker = WORKERS[args.role](engine, client, **kwargs)
    await worker.warm_up()
    server = await asyncio.start_server(worker.handle, args.host, args.port, limit=MAX_LINE)
    host, port = server.sockets[0].getsockname()[:2]
    logging.getLogger("kvpool.worker").info(
        "kvpool worker ready role=%s listen=%s:%d namespace=%s kernels=%s model=%s",
        args.role, host, port, engine.namespace.id, engine.kernels.name, engine.config.name)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop_task = asyncio.create_task(worker.run())
    await stop.wait()
    loop_task.cancel()
    server.close()
    if client is not None:
        await client.close()


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    asyncio.run(serve(args))
    return 0
