"""The one thread that does GPU work, shared by every node in the process.

One thread keeps CUDA work serialized (several nodes may share a GPU) and keeps the
event loop free for heartbeats, file events and signals while the GPU is busy.
The caller's contextvars are copied in, so log lines from the GPU thread carry the
node, round and stage bound on the loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

_lock = threading.Lock()
_executor: ThreadPoolExecutor | None = None
_running = 0


def gpu_executor() -> ThreadPoolExecutor:
    global _executor
    with _lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sapod-gpu")
        return _executor


async def run_on_gpu(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    ctx = contextvars.copy_context()
    call = functools.partial(ctx.run, _counted, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(gpu_executor(), call)


def _counted(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    global _running
    _running += 1  # only ever touched from the one GPU thread
    try:
        return fn(*args, **kwargs)
    finally:
        _running -= 1


def busy() -> bool:
    """True while the GPU thread is still running a call (e.g. abandoned at stop)."""
    return _running > 0
