"""The threads that do blocking work for the event loop: one for the GPU, a few for
writes, a few for the JSONL records.

One GPU thread keeps CUDA work serialized (several nodes may share a GPU) and keeps
the event loop free for heartbeats, file events and signals while the GPU is busy.
Durable writes (temp file, fsync, rename) wait on the disk, so they run on a small
pool of their own: the nodes of a process wait for their fsyncs side by side.
The caller's contextvars are copied in, so log lines from these threads carry the
node, round and stage bound on the loop.

A lane is a queue and its threads, nothing more: a call is handed over with its
future and the result comes back through ``call_soon_threadsafe``. That is a
fraction of what ``run_in_executor`` costs per call (no concurrent.futures Future
and its condition variable, no chained futures), which counts when a process runs
many nodes and each makes a few hops per round.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import queue
import threading
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

T = TypeVar("T")


class Lane:
    """Daemon threads taking calls from one queue: ``threads`` started on first use, and
    more, up to ``max_threads``, while calls wait with every thread busy.

    A lane of waits (fsyncs) grows: its calls spend their time waiting on the disk, not
    the interpreter, and a journaling file system commits the fsyncs that wait together
    in one go, so with many nodes in a process more writes in flight finish sooner.
    Threads once started stay (a swarm's next round needs them again). Daemon threads:
    a call stuck past STOP_TIMEOUT must not keep the process from exiting (``busy``
    tells the daemon to leave without waiting for it).
    """

    def __init__(self, name: str, threads: int, max_threads: int | None = None):
        self.name = name
        self.threads = threads
        self.max_threads = max(threads, max_threads or threads)
        self._queue: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[Any], Callable[[], Any]]]
        self._queue = queue.SimpleQueue()
        self._started = 0
        self._lock = threading.Lock()
        self.running = 0  # calls in progress
        self.in_flight = 0  # calls handed over and not yet finished (queued or running)

    def submit(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> asyncio.Future[T]:
        """Hand ``fn(*args, **kwargs)`` over; the future (of the running loop) settles with it."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        ctx = contextvars.copy_context()
        with self._lock:
            self.in_flight += 1
            want = min(self.max_threads, max(self.threads, self.in_flight))
            while self._started < want:
                self._start()
        self._queue.put((loop, fut, functools.partial(ctx.run, fn, *args, **kwargs)))
        return fut

    async def run(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        return await self.submit(fn, *args, **kwargs)

    def _start(self) -> None:
        """One more thread (the lock held)."""
        self._started += 1
        threading.Thread(target=self._serve, name=f"{self.name}_{self._started - 1}", daemon=True).start()

    def _serve(self) -> None:
        while True:
            loop, fut, call = self._queue.get()
            with self._lock:
                self.running += 1
            try:
                result, error = call(), None
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting coroutine
                result, error = None, exc
            finally:
                with self._lock:
                    self.running -= 1
                    self.in_flight -= 1
            try:
                loop.call_soon_threadsafe(_settle, fut, result, error)
            except RuntimeError:
                pass  # the loop is closed: nobody is waiting any more
            del fut, call, result, error


def _settle(fut: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if fut.cancelled():
        return
    if error is None:
        fut.set_result(result)
    elif isinstance(error, StopIteration):  # a future cannot hold StopIteration
        fut.set_exception(RuntimeError(f"StopIteration raised in a {fut!r} call"))
    else:
        fut.set_exception(error)


GPU = Lane("sapod-gpu", 1)
WRITES = Lane("sapod-write", 4, max_threads=32)
# JSONL appends (a node has one batch in flight at a time, so its records stay in order).
RECORDS = Lane("sapod-records", 4)


async def finish(aw: Awaitable[T]) -> T:
    """``await aw`` through to its end even if the awaiting task is cancelled meanwhile
    (the cancel is raised after it): for work in a thread, which a cancel does not stop,
    and which must not land after what the cancelled task's successor writes."""
    fut = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(fut)
    except asyncio.CancelledError:
        await asyncio.wait({fut})
        raise


async def first_done(*futures: asyncio.Future[Any]) -> None:
    """Until one of ``futures`` is done: ``asyncio.wait(..., FIRST_COMPLETED)`` without its
    tasks and sets, for waits a node makes every round (N nodes in a process, N times)."""
    if any(f.done() for f in futures):
        return
    waiter = asyncio.get_running_loop().create_future()

    def settle(_: asyncio.Future[Any]) -> None:
        if not waiter.done():
            waiter.set_result(None)

    for f in futures:
        f.add_done_callback(settle)
    try:
        await waiter
    finally:
        for f in futures:
            f.remove_done_callback(settle)


async def run_on_gpu(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` on the process's GPU thread."""
    return await GPU.run(fn, *args, **kwargs)


async def run_write(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` (a durable write) on the write threads."""
    return await WRITES.run(fn, *args, **kwargs)


async def run_append(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)`` (appends to JSONL records) on the records threads."""
    return await RECORDS.run(fn, *args, **kwargs)


def busy() -> bool:
    """True while the GPU thread is still running a call (e.g. abandoned at stop)."""
    return GPU.running > 0
