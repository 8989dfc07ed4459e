"""kvpool: a tiered KV-cache pool for disaggregated LLM inference.

The public surface::

    from kvpool import Client, AsyncClient, Namespace, KVLayout
    from kvpool import errors   # the exception tree
"""

from kvpool import errors
from kvpool.client import AsyncClient, Client, PutResult
from kvpool.errors import KvpoolError
from kvpool.identity import Namespace
from kvpool.layout import KVLayout

__all__ = ["AsyncClient", "Client", "KVLayout", "KvpoolError", "Namespace", "PutResult", "errors"]
__version__ = "0.1.0"
