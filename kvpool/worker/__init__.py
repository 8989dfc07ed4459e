"""Reference model and disaggregated workers.

A :class:`PrefillWorker` computes a prompt's KV (only what the pool does not already
hold), publishes its full blocks and hands the request on with its first token; a
:class:`DecodeWorker` pulls the blocks and generates. The :class:`Router` sends each
request through both. :class:`Engine` is the model with its paged cache; its docstring
says why disaggregated output is token for token that of one process.
"""

from kvpool.worker.config import CONFIGS, ModelConfig
from kvpool.worker.engine import Engine, Sequence
from kvpool.worker.model import LlamaModel
from kvpool.worker.router import Result, Router, WorkerError
from kvpool.worker.workers import ColocatedWorker, DecodeWorker, PrefillWorker

__all__ = ["CONFIGS", "ModelConfig", "LlamaModel", "Engine", "Sequence", "PrefillWorker", "DecodeWorker",
           "ColocatedWorker", "Router", "Result", "WorkerError"]
