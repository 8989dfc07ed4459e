"""kvpool clients: :class:`AsyncClient` (the implementation) and :class:`Client` (blocking facade)."""

from kvpool.client.async_client import DEFAULT_ADDRESS, AsyncClient, PutResult
from kvpool.client.sync_client import Client

__all__ = ["AsyncClient", "Client", "PutResult", "DEFAULT_ADDRESS"]
