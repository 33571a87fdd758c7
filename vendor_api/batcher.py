"""Dynamic batching between concurrent requests and the model.

Requests enqueue single items; one worker task groups items of the same tower (image or text)
into batches of up to `max_batch_size`, waiting at most `max_wait_ms` for a batch to fill, and
runs the model on a dedicated thread, so the event loop keeps parsing and decoding while the
model computes. The queue is bounded by capacity *reservations*: a request reserves room for all
its items before it is charged, so a full server refuses (503 + Retry-After) without ever
debiting, instead of growing its queue without limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch

from .errors import Overloaded
from .metrics import VendorMetrics


@dataclass
class _Item:
    tensor: torch.Tensor
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchTiming:
    """Per-request timing, reported in response headers."""

    queue_s: float = 0.0
    inference_s: float = 0.0


@dataclass(frozen=True)
class Tower:
    """One encoder of the model, with its own queue (images and texts never share a batch)."""

    name: str
    encode: Callable[[torch.Tensor], np.ndarray]


class DynamicBatcher:
    def __init__(
        self,
        towers: dict[str, Callable[[torch.Tensor], np.ndarray]],
        *,
        max_batch_size: int,
        max_wait_ms: float,
        max_queue_items: int,
        metrics: VendorMetrics | None = None,
    ) -> None:
        self.towers = {name: Tower(name, fn) for name, fn in towers.items()}
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.metrics = metrics
        self._queues: dict[str, deque[_Item]] = {name: deque() for name in towers}
        self._reserved = 0
        self._wakeup: asyncio.Event | None = None
        self._worker: asyncio.Task | None = None
        self._model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")
        # What readiness reads instead of running its own forward pass (monotonic seconds).
        self.last_success: float | None = None
        self.last_failure: float | None = None
        self.running_since: float | None = None

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        self._wakeup = asyncio.Event()
        self._worker = asyncio.create_task(self._run(), name="dynamic-batcher")

    async def stop(self) -> None:
        if self._worker is not None:
            self._worker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._worker
        for queue in self._queues.values():
            while queue:
                item = queue.popleft()
                if not item.future.done():
                    item.future.set_exception(Overloaded("server is shutting down", headers={"Retry-After": "1"}))
        self._model_thread.shutdown(wait=True)

    @property
    def alive(self) -> bool:
        return self._worker is not None and not self._worker.done()

    @property
    def depth(self) -> int:
        return sum(len(q) for q in self._queues.values())

    # ------------------------------------------------------------------ capacity
    @contextlib.contextmanager
    def reserve(self, items: int, *, retry_after_s: int = 1) -> Iterator[None]:
        """Hold queue room for `items` for the duration of a request, or refuse with 503."""
        if self._reserved + items > self.max_queue_items:
            if self.metrics:
                self.metrics.rejected_overload.inc()
            raise Overloaded(
                f"the server is at capacity ({self._reserved} items queued); retry shortly",
                headers={"Retry-After": str(retry_after_s)},
            )
        self._reserved += items
        try:
            yield
        finally:
            self._reserved -= items

    # ------------------------------------------------------------------ submission
    async def submit(self, tower: str, tensors: list[torch.Tensor]) -> tuple[np.ndarray, BatchTiming]:
        """Embed `tensors` (one per item) on `tower`; returns rows in order and the timing."""
        if not tensors:
            return np.zeros((0, 0), dtype=np.float32), BatchTiming()
        loop = asyncio.get_running_loop()
        items = [_Item(t, loop.create_future()) for t in tensors]
        self._queues[tower].extend(items)
        assert self._wakeup is not None, "batcher not started"
        self._wakeup.set()
        results = await asyncio.gather(*(item.future for item in items))
        rows = np.stack([row for row, _, _ in results])
        timing = BatchTiming(
            queue_s=max(q for _, q, _ in results),
            inference_s=sum({id(b): s for _, _, (b, s) in results}.values()),
        )
        return rows, timing

    # ------------------------------------------------------------------ worker
    def _oldest_tower(self) -> str | None:
        waiting = [(q[0].enqueued, name) for name, q in self._queues.items() if q]
        return min(waiting)[1] if waiting else None

    async def _run(self) -> None:
        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        while True:
            tower = self._oldest_tower()
            if tower is None:
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            queue = self._queues[tower]
            deadline = queue[0].enqueued + self.max_wait_s
            while len(queue) < self.max_batch_size and time.perf_counter() < deadline:
                self._wakeup.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=max(0.0, deadline - time.perf_counter()))
            batch = [queue.popleft() for _ in range(min(self.max_batch_size, len(queue)))]
            batch = [item for item in batch if not item.future.cancelled()]
            if not batch:
                continue
            started = time.perf_counter()
            self.running_since = time.monotonic()
            try:
                stacked = torch.stack([item.tensor for item in batch])
                rows = await loop.run_in_executor(self._model_thread, self.towers[tower].encode, stacked)
            except Exception as exc:  # the model failed: every waiter gets the error (and refunds)
                self.running_since, self.last_failure = None, time.monotonic()
                for item in batch:
                    if not item.future.done():
                        item.future.set_exception(exc)
                continue
            self.running_since, self.last_success = None, time.monotonic()
            elapsed = time.perf_counter() - started
            if self.metrics:
                self.metrics.observe_batch(tower, len(batch), elapsed, [started - i.enqueued for i in batch])
            marker = object()
            for item, row in zip(batch, rows):
                if not item.future.done():
                    item.future.set_result((row, started - item.enqueued, (marker, elapsed)))
