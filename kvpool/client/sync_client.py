"""Client: a blocking facade over :class:`AsyncClient`, not a copy of it.

It owns an event loop on a background thread and runs each AsyncClient coroutine there.
Every public method below is generated from the AsyncClient method of the same name, so
the two can never drift apart; only the plumbing lives here.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading

from kvpool.client.async_client import AsyncClient

__all__ = ["Client"]

#: AsyncClient coroutines exposed as blocking methods.
_FORWARDED = (
    "connect", "register", "register_buffers", "put_blocks", "get_blocks", "lookup", "lookup_leased", "release",
    "remove", "stats", "match", "publish", "fetch",
)


class Client:
    """Blocking kvpool client. Same arguments and methods as :class:`AsyncClient`."""

    def __init__(self, *args, **kwargs) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="kvpool-client", daemon=True)
        self._thread.start()
        self._async = AsyncClient(*args, **kwargs)
        self._async._private_loop = True  # the loop below runs this client alone

    @property
    def namespace(self):
        return self._async.namespace

    def _run(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, name: str, *args, **kwargs) -> concurrent.futures.Future:
        """Start the AsyncClient call ``name`` without waiting; a Future of its result.

        For callers that must not block (an engine's scheduler loop): poll ``done()``.
        """
        if name not in _FORWARDED:
            raise ValueError(f"Client.submit: {name!r} is not a client call; use one of {_FORWARDED}")
        return asyncio.run_coroutine_threadsafe(getattr(self._async, name)(*args, **kwargs), self._loop)

    def close(self) -> None:
        if self._loop.is_closed():
            return
        self._run(self._async.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _blocking(name: str):
    target = getattr(AsyncClient, name)

    @functools.wraps(target)
    def method(self: Client, *args, **kwargs):
        return self._run(getattr(self._async, name)(*args, **kwargs))

    return method


for _name in _FORWARDED:
    setattr(Client, _name, _blocking(_name))
del _name
