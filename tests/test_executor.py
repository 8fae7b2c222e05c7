"""The GPU thread and the write threads: results, errors, order, and stop-time state."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from sapod.executor import GPU, Lane, busy, run_on_gpu, run_write


def test_results_errors_and_one_gpu_thread():
    """Calls return their value or raise their error in the caller; GPU calls all run, in
    order, on the one GPU thread, across event loops."""
    seen: list[tuple[int, str]] = []

    def work(i: int) -> int:
        seen.append((i, threading.current_thread().name))
        return i * i

    def fails() -> None:
        raise ValueError("bad shape")

    async def go() -> list[int]:
        out = await asyncio.gather(*(run_on_gpu(work, i) for i in range(20)))
        with pytest.raises(ValueError, match="bad shape"):
            await run_on_gpu(fails)
        return out

    assert asyncio.run(go()) == [i * i for i in range(20)]
    assert asyncio.run(go()) == [i * i for i in range(20)]  # a second loop, the same thread
    assert [i for i, _ in seen] == list(range(20)) * 2
    assert {name for _, name in seen} == {"sapod-gpu_0"}


def test_write_threads_run_side_by_side():
    """Four blocking writes that each wait 0.3 s finish together, not one after another."""

    async def go() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(run_write(time.sleep, 0.3) for _ in range(4)))
        return time.monotonic() - t0

    assert asyncio.run(go()) < 1.0


def test_a_lane_grows_while_calls_wait_up_to_its_bound_and_keeps_its_threads():
    """A lane of 2 threads (at most 5) given 8 calls that all block: 5 run at once, the
    other 3 queue; once they finish, the lane keeps its 5 threads and a later call starts
    none. A lane of one thread (the GPU's) never grows, whatever waits."""
    release = threading.Event()
    lane, single = Lane("grow-test", 2, max_threads=5), Lane("single-test", 1)
    peak = {"lane": 0, "single": 0}

    def hold(key: str, which: Lane) -> None:
        peak[key] = max(peak[key], which.running)
        release.wait(10)

    async def go() -> None:
        calls = [lane.submit(hold, "lane", lane) for _ in range(8)]
        calls += [single.submit(hold, "single", single) for _ in range(3)]
        for _ in range(200):
            if lane.running == 5 and single.running == 1:
                break
            await asyncio.sleep(0.01)
        assert lane._started == 5 and lane.running == 5 and lane.in_flight == 8
        assert single._started == 1 and single.running == 1
        release.set()
        await asyncio.gather(*calls)
        assert lane.in_flight == 0 and lane.running == 0
        await lane.run(time.sleep, 0)
        assert lane._started == 5

    asyncio.run(asyncio.wait_for(go(), 30))
    assert peak == {"lane": 5, "single": 1}


def test_busy_while_a_gpu_call_runs_and_a_cancelled_caller_leaves_the_lane_working():
    """busy() is true while the GPU thread runs a call (the daemon then exits without
    waiting); a caller that gives up does not stop the call or jam the lane."""
    release = threading.Event()

    async def go() -> int:
        stuck = asyncio.ensure_future(run_on_gpu(release.wait, 5))
        await asyncio.sleep(0.1)
        assert busy()
        stuck.cancel()
        await asyncio.sleep(0.05)
        release.set()
        return await run_on_gpu(lambda: 7)

    assert asyncio.run(go()) == 7
    assert not busy() and GPU.running == 0


def test_stop_iteration_from_a_call_is_an_error_not_a_hang():
    """A call that raises StopIteration (which no future can hold) fails cleanly."""
    lane = Lane("t", 1)

    async def go() -> None:
        await lane.run(next, iter(()))

    with pytest.raises(RuntimeError, match="StopIteration"):
        asyncio.run(go())


def test_first_done_returns_with_the_first_future_and_leaves_no_callbacks():
    """first_done returns once any future is done (at once if one already is), and takes
    its callbacks off every future, whether it returns or is cancelled."""
    from sapod.executor import first_done

    def hooks(f: asyncio.Future) -> int:
        return len(f._callbacks or ())  # the C Future shows none as None

    async def go() -> None:
        loop = asyncio.get_running_loop()
        a, b = loop.create_future(), loop.create_future()
        loop.call_later(0.05, b.set_result, "b")
        t0 = loop.time()
        await first_done(a, b)
        assert b.done() and not a.done() and loop.time() - t0 < 2.0
        assert hooks(a) == 0 and hooks(b) == 0  # nothing left behind on the slow one
        await asyncio.wait_for(first_done(a, b), 1.0)  # one already done: no wait at all
        c = loop.create_future()
        waiting = asyncio.ensure_future(first_done(a, c))
        await asyncio.sleep(0.01)
        assert hooks(a) == 1 and hooks(c) == 1
        waiting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiting
        assert hooks(a) == 0 and hooks(c) == 0
        a.set_result(None)
        c.cancel()

    asyncio.run(go())


def test_a_stop_waits_for_gpu_work_up_to_stop_timeout_then_abandons_it(make_cfg):
    """A worker's GPU call under a stop request: one that ends within STOP_TIMEOUT gives its
    result; one still running after it is abandoned (Stopping, gpu_abandoned) and the
    worker does not wait for it any longer."""
    from sapod.errors import Stopping
    from sapod.worker import Worker

    release = threading.Event()

    async def go() -> tuple[str, float]:
        worker = Worker(make_cfg(stop_timeout="0.5"))
        loop = asyncio.get_running_loop()
        worker.stopping = loop.create_future()
        worker.stop.set()
        worker.stopping.set_result(None)
        quick = await worker._gpu(lambda: (time.sleep(0.1), "trained")[1])
        t0 = loop.time()
        with pytest.raises(Stopping):
            await worker._gpu(release.wait, 10)
        return quick, loop.time() - t0

    try:
        quick, waited = asyncio.run(go())
    finally:
        release.set()
    assert quick == "trained" and 0.4 < waited < 3.0
