"""Watching the client's connection, so that nobody pays for an answer they did not get.

Once a route has read the request body, the only message the ASGI server can still send it is
`http.disconnect`. `ClientWatch` waits for that message in a task of its own; `run()` races the
request's work against it and cancels the work when the client goes (the service refunds a
debit on cancellation), and the response settles the debit only if the client is still there
just before the first byte is written (`SettlingResponse` in `app.py`).

Why not `Request.is_disconnected()`: it polls, so it only notices at the moments someone asks;
a watcher notices at once, during the queue wait or the forward pass, and the batcher then
drops the request's items that have not started.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from starlette.types import Receive

from .errors import ClientDisconnected

T = TypeVar("T")


class ClientWatch:
    """Started after the body was read (it takes over `receive`); `close()` when done."""

    def __init__(self, receive: Receive) -> None:
        self._gone = asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._watch(receive), name="client-watch")

    async def _watch(self, receive: Receive) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                self._gone.set()
                return

    @property
    def gone(self) -> bool:
        return self._gone.is_set()

    def raise_if_gone(self) -> None:
        if self.gone:
            raise ClientDisconnected("the client closed the connection; nothing was charged")

    async def run(self, work: Awaitable[T]) -> T:
        """`await work`, unless the client goes first: then the work is cancelled (and waited
        for, so its refund is written) and `ClientDisconnected` is raised."""
        task = asyncio.ensure_future(work)
        gone = asyncio.ensure_future(self._gone.wait())
        try:
            await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            gone.cancel()
        if task.done():
            return task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise ClientDisconnected("the client closed the connection; its request was cancelled and refunded")

    def close(self) -> None:
        self._task.cancel()
