"""Dynamic batching: requests wait in a bounded asyncio queue; one collector takes up to
``max_batch`` of them, waiting at most ``max_wait_ms`` after the first for more, stacks them
and runs the model in a worker thread (so the event loop keeps accepting and answering
requests while the kernels run; they release the GIL). One batch runs at a time: the
kernels already use every core through torch's intra-op threads."""
from __future__ import annotations

import asyncio
import concurrent.futures
import time
from typing import Callable, Optional

import torch

from .metrics import Metrics


class QueueFull(Exception):
    """The bounded queue is full: answer 503 (the client retries later)."""


class ShuttingDown(Exception):
    """The server stops: requests still queued are answered 503."""


class Batcher:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], *, max_batch: int = 32, max_wait_ms: float = 5.0,
                 queue_size: int = 256, metrics: Optional[Metrics] = None) -> None:
        if max_batch < 1 or queue_size < 1 or max_wait_ms < 0:
            raise ValueError("max_batch and queue_size must be >= 1 and max_wait_ms >= 0")
        self.fn, self.max_batch, self.max_wait = fn, max_batch, max_wait_ms / 1e3
        self.queue_size = queue_size
        self.metrics = metrics or Metrics()
        self._queue: Optional[asyncio.Queue] = None
        self._wakeup: Optional[asyncio.Event] = None
        self._task: Optional[asyncio.Task] = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="pysparse-batch")

    async def start(self) -> None:
        self._queue = asyncio.Queue(self.queue_size)
        self._wakeup = asyncio.Event()
        self._task = asyncio.create_task(self._collect())

    async def stop(self) -> None:
        """Stop collecting, answer what is still queued with ShuttingDown, join the worker."""
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        while self._queue is not None and not self._queue.empty():
            _, fut = self._queue.get_nowait()
            if not fut.done():
                fut.set_exception(ShuttingDown())
        self._pool.shutdown(wait=True)

    @property
    def depth(self) -> int:
        return self._queue.qsize() if self._queue is not None else 0

    async def submit(self, x: torch.Tensor) -> torch.Tensor:
        """Queue one item (no batch dim); its output row when its batch has run."""
        if self._task is None:
            raise ShuttingDown()
        fut = asyncio.get_running_loop().create_future()
        try:
            self._queue.put_nowait((x, fut))
        except asyncio.QueueFull:
            raise QueueFull() from None
        self.metrics.queue_depth = self._queue.qsize()
        self._wakeup.set()
        return await fut

    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            items = [await self._queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                try:
                    items.append(self._queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                self._wakeup.clear()  # no other coroutine runs between the empty check and here
                try:
                    await asyncio.wait_for(self._wakeup.wait(), left)
                except asyncio.TimeoutError:
                    break
            self.metrics.queue_depth = self._queue.qsize()
            live = [(x, f) for x, f in items if not f.done()]  # a client that went away is not computed
            if not live:
                continue
            xs = torch.stack([x for x, _ in live])
            self.metrics.batch(len(live))
            try:
                ys = await loop.run_in_executor(self._pool, self._run, xs)
            except Exception as e:  # the model failed on this batch: every request in it gets the error
                for _, f in live:
                    if not f.done():
                        f.set_exception(e)
                continue
            for (_, f), y in zip(live, ys):
                if not f.done():
                    f.set_result(y)

    def _run(self, xs: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():  # grad mode is per thread: set it in the worker
            return self.fn(xs)
