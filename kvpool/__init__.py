"""kvpool: a tiered KV-cache pool for disaggregated LLM inference."""

from kvpool.errors import KvpoolError
from kvpool.identity import Namespace
from kvpool.layout import KVLayout

__all__ = ["KVLayout", "KvpoolError", "Namespace"]
__version__ = "0.1.0"
