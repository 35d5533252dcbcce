"""Mailbox: what a request's producers hand its one consumer, taken a batch at a time.

Who calls what (one event loop, no threads): producers call `put(item)` (the node
stream's reader through a prompt's relay, or a prompt's task with its error); the one
consumer (a request's handler, through `PromptStreams`) calls `await take_all()`, which
returns every item put since its last call, in order, and waits only when there is none.

It does what an `asyncio.Queue` drained with `get` then `get_nowait` did, for a little
less per item: on the router's streaming path every token of every request passes
through one, and a put wakes the consumer only when it is waiting, once however many
items come before it runs.
"""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class Mailbox(Generic[T]):
    def __init__(self) -> None:
        self._items: list[T] = []
        self._waiter: asyncio.Future[None] | None = None

    def put(self, item: T) -> None:
        self._items.append(item)
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def take_all(self) -> list[T]:
        """Every item put since the last call (at least one: waits while there is none)."""
        while not self._items:
            waiter = asyncio.get_running_loop().create_future()
            self._waiter = waiter
            try:
                await waiter
            finally:
                self._waiter = None
        items, self._items = self._items, []
        return items

    def __len__(self) -> int:
        return len(self._items)
