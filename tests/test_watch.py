"""Choosing how to watch the shared folder, and the inotify bridge onto the loop."""

from __future__ import annotations

import asyncio
import contextlib
import os

import pytest

from sapod.watch import Watcher, mount_fstype, pick_watch_mode

MOUNTS = """/dev/vda1 / ext4 rw 0 0
drive /content/drive fuse.drive rw 0 0
server:/export /mnt/nfs nfs4 rw 0 0
bucket /mnt/gcs fuse.gcsfuse rw 0 0
tmpfs /mnt/nfs/local tmpfs rw 0 0
"""


def test_auto_polls_on_network_and_fuse_mounts(tmp_path):
    """WATCH_MODE=auto picks poll on Drive/gcsfuse (FUSE) and NFS, inotify on a local disk."""
    mounts = tmp_path / "mounts"
    mounts.write_text(MOUNTS)
    m = str(mounts)
    assert pick_watch_mode("auto", "/content/drive/MyDrive/rl-swarm", m) == ("poll", "fuse.drive mount")
    assert pick_watch_mode("auto", "/mnt/gcs/x", m)[0] == "poll"
    assert pick_watch_mode("auto", "/mnt/nfs/shared", m) == ("poll", "nfs4 mount")
    assert pick_watch_mode("auto", "/mnt/nfs/local/x", m)[0] == "inotify"  # the longest mount point wins
    assert pick_watch_mode("auto", "/home/user/swarm", m) == ("inotify", "ext4 mount")
    assert pick_watch_mode("poll", "/home/user/swarm", m) == ("poll", "requested")
    assert pick_watch_mode("inotify", "/home/user/swarm", m) == ("inotify", "requested")
    mode, why = pick_watch_mode("inotify", "/mnt/nfs/shared", m)  # asked for, and blind there: said so
    assert mode == "inotify" and why.startswith("requested on a nfs4 mount, where inotify sees only this machine")
    assert mount_fstype("/x", str(tmp_path / "missing")) == "unknown"


def test_inotify_event_wakes_the_loop(tmp_path):
    """A file written in a watched folder wakes a waiter long before its timeout."""

    async def go():
        w = Watcher("inotify", asyncio.get_running_loop())
        try:
            w.watch([tmp_path / "a"])
            loop = asyncio.get_running_loop()
            loop.call_later(0.2, (tmp_path / "a" / "x.json").write_text, "{}")
            t0 = loop.time()
            woke = await w.wait(10)
            return woke, loop.time() - t0
        finally:
            w.close()

    woke, took = asyncio.run(go())
    assert woke and took < 5


def test_poll_mode_only_times_out(tmp_path):
    """In poll mode nothing is watched; the wait returns at the rescan interval."""

    async def go():
        w = Watcher("poll", asyncio.get_running_loop())
        w.watch([tmp_path])
        (tmp_path / "x.json").write_text("{}")
        return await w.wait(0.2)

    assert asyncio.run(go()) is False


def test_many_nodes_share_one_inotify_watch_per_folder(tmp_path):
    """200 watchers in one process (more than the 128 inotify instances a user may hold) all wake on one write."""

    async def go():
        loop = asyncio.get_running_loop()
        watchers = [Watcher("inotify", loop) for _ in range(200)]
        try:
            for w in watchers:
                w.watch([tmp_path / "state", tmp_path / "round_0"])
            assert not any(w.degraded for w in watchers)
            for w in watchers[:100]:
                w.watch([tmp_path / "state"])  # half of them move on; the shared watch stays for the rest
            loop.call_later(0.2, (tmp_path / "round_0" / "x.json").write_text, "{}")
            woke = await asyncio.gather(*(w.wait(5) for w in watchers[100:]))
            return woke
        finally:
            for w in watchers:
                w.close()

    assert all(asyncio.run(go()))


@contextlib.asynccontextmanager
async def settled_watcher(folder):
    """An inotify Watcher of ``folder`` whose start-up events have passed and been cleared."""
    w = Watcher("inotify", asyncio.get_running_loop())
    try:
        w.watch([folder])
        await asyncio.sleep(0.1)
        w._woken = False
        yield w
    finally:
        w.close()


def test_reads_do_not_wake_watchers(tmp_path):
    """Reading a watched file (open, close without writing) is not a change and wakes nobody."""
    (tmp_path / "state.json").write_text("{}")

    async def go():
        async with settled_watcher(tmp_path) as w:
            asyncio.get_running_loop().call_later(0.05, (tmp_path / "state.json").read_text)
            return await w.wait(0.5)

    assert asyncio.run(go()) is False


def test_only_changes_reach_the_loop_and_temp_files_wake_nobody(tmp_path, monkeypatch):
    """The kernel's inotify mask leaves out reads and in-place modifications (every node reads
    every peer's file: those events would wake the loop for nothing), and writing one of
    our hidden temp files wakes nobody; the rename that publishes it does."""
    from sapod.watch import _HEADER, _Inotify

    masks: list[int] = []
    parse = _Inotify._parse

    def recording(self, buf, touched, woken):
        i = 0
        while i + 16 <= len(buf):
            _, mask, _, length = _HEADER.unpack_from(buf, i)
            masks.append(mask)
            i += 16 + length
        return parse(self, buf, touched, woken)

    monkeypatch.setattr(_Inotify, "_parse", recording)
    (tmp_path / "peer.json").write_text("{}")
    noise_bits = 0x1 | 0x2 | 0x4 | 0x10 | 0x20  # IN_ACCESS, IN_MODIFY, IN_ATTRIB, IN_CLOSE_NOWRITE, IN_OPEN

    async def go():
        async with settled_watcher(tmp_path) as w:
            masks.clear()
            for _ in range(20):
                (tmp_path / "peer.json").read_bytes()
            os.utime(tmp_path / "peer.json")
            tmp = tmp_path / ".w1.json.tmp-1-abcdef01"
            with open(tmp, "w") as fh:
                fh.write("{")
                fh.flush()
                fh.write("}")
            quiet = await w.wait(0.5)
            seen = list(masks)
            os.replace(tmp, tmp_path / "w1.json")
            return quiet, seen, await w.wait(5)

    quiet, seen, woke = asyncio.run(go())
    assert seen, "the temp file's creation and close reach the loop (and are passed over there)"
    assert [m for m in seen if m & noise_bits] == [] and quiet is False and woke is True


def test_a_failed_inotify_instance_is_replaced_with_its_watches(tmp_path, monkeypatch):
    """If reading the loop's inotify descriptor fails, every watcher is woken to rescan, and
    the next rescan watches the same folders on a new instance, whose events flow again."""
    import errno

    from sapod import watch

    real_read = os.read

    async def go():
        loop = asyncio.get_running_loop()
        w = Watcher("inotify", loop)
        try:
            w.watch([tmp_path / "a"])
            first = watch._Inotify._by_loop[loop]

            def failing(fd, n):
                if fd == first.fd:
                    raise OSError(errno.EIO, "Input/output error")
                return real_read(fd, n)

            monkeypatch.setattr(watch.os, "read", failing)
            (tmp_path / "a" / "x.json").write_text("{}")
            assert await w.wait(5.0) is True  # woken by the failure: look again now
            monkeypatch.setattr(watch.os, "read", real_read)
            assert first.closed
            assert await w.wait(0.05) is False  # a rescan: moves to a new instance
            second = watch._Inotify._by_loop[loop]
            assert second is not first and str(tmp_path / "a") in second.folders
            loop.call_later(0.2, (tmp_path / "a" / "y.json").write_text, "{}")
            t0 = loop.time()
            assert await w.wait(5.0) is True
            return loop.time() - t0
        finally:
            w.close()

    assert asyncio.run(go()) < 2.0


def test_a_deleted_folder_is_watched_afresh(tmp_path):
    """A watched folder that is deleted (a round's folder tidied away) wakes its watchers
    and is forgotten; watching it again once it is back gets its events."""
    from sapod.watch import _Inotify, folder_version

    folder = tmp_path / "round_3"

    async def go():
        loop = asyncio.get_running_loop()
        async with settled_watcher(folder) as w:
            (folder / "w1.json").write_text("{}")
            assert await w.wait(5.0) is True
            while await w.wait(0.2):
                pass
            (folder / "w1.json").unlink()
            folder.rmdir()
            assert await w.wait(5.0) is True
            while await w.wait(0.2):  # until the watch's removal has been read
                pass
            assert str(folder) not in _Inotify._by_loop[loop].folders and folder_version(str(folder)) is None
            w.watch([folder])  # made again and watched
            assert folder.is_dir() and folder_version(str(folder)) is not None
            loop.call_later(0.1, (folder / "w2.json").write_text, "{}")
            return await w.wait(5.0)

    assert asyncio.run(go()) is True


def test_a_lost_queue_wakes_every_watcher(tmp_path):
    """More events than the kernel queues (fs.inotify.max_queued_events) while the loop is
    busy: the overflow wakes every watcher, whatever events it expects, and changes every
    folder's version, since any folder may have changed unseen."""
    from sapod.watch import folder_version

    limit = int(open("/proc/sys/fs/inotify/max_queued_events").read())
    if limit > 50_000:
        pytest.skip(f"max_queued_events is {limit}: too many files to overflow it here")
    busy, quiet = tmp_path / "busy", tmp_path / "quiet"

    async def go():
        loop = asyncio.get_running_loop()
        a, b = Watcher("inotify", loop), Watcher("inotify", loop)
        try:
            a.watch([busy])
            b.watch([quiet])
            await asyncio.sleep(0.1)
            version = folder_version(str(quiet))
            b.expect(str(quiet), version, 1000)  # whatever it expects
            for i in range(limit + 100):  # the loop does not run meanwhile: the queue overflows
                open(busy / f"{i}", "w").close()
            return await b.wait(5.0), folder_version(str(quiet)) != version
        finally:
            a.close()
            b.close()

    assert asyncio.run(go()) == (True, True)


def test_loops_in_two_threads_each_get_their_events(tmp_path):
    """Each event loop reads its own inotify instance: two loops in two threads watching one
    folder are both woken by one write."""
    import threading

    folder = tmp_path / "shared"
    folder.mkdir()
    ready = threading.Barrier(3)
    results: list[bool] = []

    def run():
        async def go():
            w = Watcher("inotify", asyncio.get_running_loop())
            try:
                w.watch([folder])
                await asyncio.to_thread(ready.wait, 5)
                return await w.wait(5.0)
            finally:
                w.close()

        results.append(asyncio.run(go()))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    ready.wait(5)
    (folder / "x.json").write_text("{}")
    for t in threads:
        t.join(10)
    assert results == [True, True]


def test_many_watchers_share_one_watch_and_all_wake(tmp_path):
    """Fifty watchers of one folder in one loop: one inotify watch, every watcher woken by
    a burst of writes, each wait woken promptly, the watch dropped with its last watcher."""
    from sapod.watch import _Inotify

    folder = tmp_path / "round"

    async def go():
        loop = asyncio.get_running_loop()
        ws = [Watcher("inotify", loop) for _ in range(50)]
        try:
            for w in ws:
                w.watch([folder])
            inst = _Inotify._by_loop[loop]
            assert list(inst.folders) == [str(folder)] and inst.users == 50
            handler = inst.folders[str(folder)]
            assert len(handler.watchers) == 50
            for round_ in range(3):
                for i in range(20):  # a burst: many events, coalesced into few wake-ups
                    loop.call_later(0.05, (folder / f"w{round_}-{i}.json").write_text, "{}")
                woke = await asyncio.gather(*(w.wait(10) for w in ws))
                assert all(woke)
            for w in ws[:-1]:
                w.watch([])
            assert len(handler.watchers) == 1 and str(folder) in inst.folders
            ws[-1].watch([])
            assert str(folder) not in inst.folders
        finally:
            for w in ws:
                w.close()
        assert inst.closed and loop not in _Inotify._by_loop  # closed with its last watcher

    asyncio.run(asyncio.wait_for(go(), 30))


def publish(path):
    """A file published as sapod publishes (a hidden temp file renamed): one event."""
    from sapod.store import atomic_write_bytes

    atomic_write_bytes(path, b"{}", durable=False)


def test_a_waiter_that_expects_n_files_sleeps_through_fewer_events(tmp_path):
    """Watcher.expect: a waiter that needs three more files in a folder is not woken by
    the first two and is woken by the third; events of its other folders wake it at
    once; enough events already come make the wait return at once; and the expectation
    holds for one wait only."""
    from sapod.watch import folder_version

    rollouts, state = tmp_path / "rollouts", tmp_path / "state"

    async def go():
        loop = asyncio.get_running_loop()
        w = Watcher("inotify", loop)
        try:
            w.watch([rollouts, state])
            await asyncio.sleep(0.1)
            w._woken = False
            since = folder_version(str(rollouts))
            w.expect(str(rollouts), since, 3)
            for i, at in enumerate((0.1, 0.3, 0.5)):  # one at a time: the loop reads each alone
                loop.call_later(at, publish, rollouts / f"w{i}.json")
            woke = await w.wait(10)
            events_at_wake = folder_version(str(rollouts))[1] - since[1]

            loop.call_later(0.1, publish, rollouts / "w3.json")  # the expectation is gone: one wakes
            t0 = loop.time()
            woke_again = await w.wait(10)
            one_took = loop.time() - t0

            w.expect(str(rollouts), folder_version(str(rollouts)), 5)
            loop.call_later(0.1, publish, state / "current_state.json")  # another folder: at once
            t0 = loop.time()
            woke_by_state = await w.wait(10)
            state_took = loop.time() - t0

            w.expect(str(rollouts), since, 4)  # four have come since `since` already
            t0 = loop.time()
            woke_at_once = await w.wait(10)
            at_once_took = loop.time() - t0
            return (woke, events_at_wake, woke_again, one_took, woke_by_state, state_took, woke_at_once,
                    at_once_took)
        finally:
            w.close()

    woke, events_at_wake, woke_again, one_took, woke_by_state, state_took, woke_at_once, at_once_took = \
        asyncio.run(asyncio.wait_for(go(), 30))
    assert woke and events_at_wake == 3
    assert woke_again and one_took < 5
    assert woke_by_state and state_took < 5
    assert woke_at_once and at_once_took < 0.05


def test_an_expectation_never_outlasts_the_rescan(tmp_path):
    """A waiter expecting more events than come still returns at its rescan timeout."""
    from sapod.watch import folder_version

    folder = tmp_path / "rewards"

    async def go():
        async with settled_watcher(folder) as w:
            w.expect(str(folder), folder_version(str(folder)), 10)
            asyncio.get_running_loop().call_later(0.05, publish, folder / "w1.json")
            return await w.wait(0.5)

    assert asyncio.run(go()) is False


def test_a_listing_is_shared_until_an_event_comes_for_its_folder(tmp_path, monkeypatch):
    """With inotify, the nodes of a process share one listing of a rollouts folder until a
    file is published, moved or deleted there (or the listing is LISTING_MAX_AGE old);
    writing a hidden temp file changes nothing. Folders not watched are listed every time."""
    import sapod.gather as gather
    from sapod.store import IO, atomic_write_json
    from sapod.watch import folder_version

    monkeypatch.setattr(gather, "LISTING_MAX_AGE", 30.0)
    folder, other = tmp_path / "round_0", tmp_path / "elsewhere"
    other.mkdir()

    async def settled(w):
        while await w.wait(0.2):  # events of earlier writes, until quiet
            pass

    async def go():
        async with settled_watcher(folder) as w:
            atomic_write_json(folder / "w1.json", {"n": 1})
            await settled(w)
            version = folder_version(str(folder))
            first = gather.peer_files(folder)
            listings = IO["listings"]
            assert gather.peer_files(folder) is first and IO["listings"] == listings
            (folder / ".w2.json.tmp-1-00000000").write_text("{}")  # a publish under way
            await settled(w)
            assert folder_version(str(folder)) == version and gather.peer_files(folder) is first
            os.replace(folder / ".w2.json.tmp-1-00000000", folder / "w2.json")
            await settled(w)
            assert folder_version(str(folder)) != version
            assert set(gather.peer_files(folder)) == {"w1", "w2"} and IO["listings"] == listings + 1
            (folder / "w1.json").unlink()
            await settled(w)
            assert set(gather.peer_files(folder)) == {"w2"}
            monkeypatch.setattr(gather, "LISTING_MAX_AGE", 0.0)  # not trusted for long
            before = IO["listings"]
            gather.peer_files(folder)
            assert IO["listings"] == before + 1
            assert folder_version(str(other)) is None
            gather.peer_files(other)
            gather.peer_files(other)
            assert IO["listings"] == before + 3
        assert folder_version(str(folder)) is None  # no longer watched

    asyncio.run(go())


# -- the rescan cadence in poll mode ----------------------------------------------------
def record_rescans(monkeypatch) -> list[float]:
    """Every Watcher.wait timeout from now on, in order: the node's rescan period."""
    seen: list[float] = []
    real = Watcher.wait

    async def wait(self, timeout):
        seen.append(round(timeout, 6))
        return await real(self, timeout)

    monkeypatch.setattr(Watcher, "wait", wait)
    return seen


def slowed_down_then_hot_again(seen: list[float], interval: float) -> bool:
    """A rescan at the normal pace followed, later in the same wait, by quick ones."""
    hot, cold = round(interval / 8, 6), round(interval, 6)
    return cold in seen and hot in seen[seen.index(cold):]


def test_poll_gather_rescans_quickly_again_when_a_peer_publishes(make_cfg, monkeypatch):
    """In poll mode a worker gathering peers' rollouts slows to POLL_INTERVAL when nothing
    comes, and goes back to rescanning 8 times as often once one peer's file arrives:
    the others are likely close behind."""
    from conftest import write_peer
    from sapod import paths
    from sapod.peers import PeerTable
    from sapod.state import StateReader
    from sapod.store import atomic_write_json
    from sapod.worker import Worker
    from test_schema import rollouts

    interval = 0.4
    w = Worker(make_cfg("worker", "w1", watch_mode="poll", poll_interval=interval, peer_timeout=60,
                        gather_timeout=30))
    for node in ("w1", "w2", "w3"):
        write_peer(w.root, node, 1)
    seen = record_rescans(monkeypatch)

    async def go():
        w.watcher = Watcher("poll", asyncio.get_running_loop())
        w.table, w.reader = PeerTable(w.root, 60), StateReader(w.root)
        gather = asyncio.create_task(w._gather(0, 0))
        await asyncio.sleep(2.5 * interval)  # nothing arrives: the normal pace
        assert seen and set(seen) == {interval}
        atomic_write_json(paths.rollout_file(w.root, 0, 0, "w2"), rollouts("w2"))
        await asyncio.sleep(4 * interval)  # seen, quick rescans for one interval, then slow again
        before_w3 = list(seen)
        atomic_write_json(paths.rollout_file(w.root, 0, 0, "w3"), rollouts("w3"))
        return await asyncio.wait_for(gather, 10), before_w3

    result, before_w3 = asyncio.run(go())
    assert sorted(result.files) == ["w2", "w3"] and not result.rollouts  # listed, none read yet
    assert slowed_down_then_hot_again(before_w3, interval), before_w3
    assert before_w3[-1] == interval, before_w3  # nothing more came: back to the normal pace


def test_poll_coordinator_rescans_quickly_again_when_a_submission_arrives(make_cfg, monkeypatch):
    """The coordinator collecting submissions in poll mode: the same quickening on arrival."""
    from conftest import beating
    from sapod import paths
    from sapod.coordinator import Coordinator
    from sapod.store import atomic_write_json
    from test_schema import submission

    interval = 0.4
    c = Coordinator(make_cfg("coordinator", "coord", watch_mode="poll", poll_interval=interval, max_rounds=1))
    seen = record_rescans(monkeypatch)

    async def go():
        run = asyncio.create_task(c.run())
        while c.phase != "collect":
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.5 * interval)  # the open round's quick rescans are over
        collecting = len(seen)
        atomic_write_json(paths.reward_file(c.root, 0, 0, "w1"), submission("w1"))
        await asyncio.sleep(2 * interval)
        during = list(seen[collecting - 1:])
        atomic_write_json(paths.reward_file(c.root, 0, 0, "w2"), submission("w2"))
        await asyncio.wait_for(run, 10)
        return during

    with beating(c.root, "w1"), beating(c.root, "w2"):
        during = asyncio.run(go())
    assert slowed_down_then_hot_again(during, interval), during


def test_a_gathering_worker_is_not_woken_by_each_peer_file(make_cfg, monkeypatch):
    """With inotify, a worker waiting for five peers' rollouts files that land one by one
    looks at the folder twice: at the start, and once all five can have come. (Woken by
    each file, N nodes waiting for N peers' files make N x N wakes a round.) The rescan
    interval is long here, so no rescan wakes it either."""
    import time

    import sapod.worker
    from conftest import write_peer
    from sapod import paths
    from sapod.peers import PeerTable
    from sapod.state import StateReader
    from sapod.store import atomic_write_json
    from sapod.worker import Worker
    from test_schema import rollouts

    peers = [f"w{i}" for i in range(2, 7)]
    w = Worker(make_cfg("worker", "w1", watch_mode="inotify", poll_interval=30, peer_timeout=60, gather_timeout=60))
    for node in ["w1", *peers]:
        write_peer(w.root, node, 1)
    looks = []
    real = sapod.worker.list_peer_rollouts
    monkeypatch.setattr(sapod.worker, "list_peer_rollouts", lambda *a: (looks.append(1), real(*a))[1])

    async def go():
        loop = asyncio.get_running_loop()
        w.watcher = Watcher("inotify", loop)
        w.table, w.reader = PeerTable(w.root, 60), StateReader(w.root)
        try:
            for i, node in enumerate(peers):
                loop.call_later(0.2 + 0.1 * i, atomic_write_json, paths.rollout_file(w.root, 0, 0, node),
                                rollouts(node))
            t0 = time.monotonic()
            result = await asyncio.wait_for(w._gather(0, 0), 30)
            return result, time.monotonic() - t0
        finally:
            w.watcher.close()

    result, took = asyncio.run(go())
    assert sorted(result.files) == peers and took < 10, took
    assert len(looks) == 2, looks


def test_a_collecting_coordinator_is_not_woken_by_each_submission(make_cfg, monkeypatch):
    """The coordinator waiting for six workers' submissions that land one by one, with
    inotify: it looks at the rewards folder far fewer times than once per submission."""
    from conftest import write_peer
    from sapod import paths
    from sapod.coordinator import Coordinator
    from sapod.store import atomic_write_json
    from test_schema import submission

    workers = [f"w{i}" for i in range(1, 7)]
    c = Coordinator(make_cfg("coordinator", "coord", watch_mode="inotify", poll_interval=30, peer_timeout=60,
                             heartbeat_interval=20, max_rounds=1))  # its own heartbeats wake it too
    for node in workers:
        write_peer(c.root, node, 1)
    looks = []
    real = Coordinator._collect
    monkeypatch.setattr(Coordinator, "_collect", lambda self, book: (looks.append(len(book.accepted)),
                                                                      real(self, book))[1])

    async def go():
        run = asyncio.create_task(c.run())
        while c.phase != "collect":
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.3)  # the coordinator's own start-up writes have passed
        start = len(looks)
        for node in workers:
            atomic_write_json(paths.reward_file(c.root, 0, 0, node), submission(node))
            await asyncio.sleep(0.1)
        await asyncio.wait_for(run, 20)
        return looks[start:]

    after_start = asyncio.run(go())
    # Before: one look per submission, and the last look of the close. Now: the look
    # once all six can be there, and the last look.
    assert after_start[-1] == len(workers) and len(after_start) <= 3, after_start


def test_gather_does_not_wait_out_its_timeout_for_a_live_peer_whose_file_is_bad(make_cfg):
    """A live peer's rollouts file that does not parse is there all the same: the gather ends
    once it is listed (the sampler passes over it) instead of waiting GATHER_TIMEOUT for it
    to become whole."""
    import time

    from conftest import write_peer
    from sapod import paths
    from sapod.peers import PeerTable
    from sapod.state import StateReader
    from sapod.worker import Worker

    w = Worker(make_cfg("worker", "w1", watch_mode="poll", poll_interval=0.1, peer_timeout=60, gather_timeout=20))
    for node in ("w1", "w2"):
        write_peer(w.root, node, 1)
    bad = paths.rollout_file(w.root, 0, 0, "w2")
    bad.parent.mkdir(parents=True)
    bad.write_text('{"schema": "sapod.rollouts/1", "node_id": "w')  # torn

    async def go():
        w.watcher = Watcher("poll", asyncio.get_running_loop())
        w.table, w.reader = PeerTable(w.root, 60), StateReader(w.root)
        t0 = time.monotonic()
        result = await asyncio.wait_for(w._gather(0, 0), 30)
        return result, time.monotonic() - t0

    result, took = asyncio.run(go())
    assert list(result.files) == ["w2"] and took < 5, took


def test_nodes_take_in_only_what_changed_between_shared_listings(tmp_path, monkeypatch):
    """A new shared listing of a watched rollouts folder knows which entries differ from
    the one before it (new files, a file replaced under a new inode); a node one listing
    behind takes in just those, a node further behind compares everything, and both end
    with every file listed."""
    import sapod.gather as gather
    from sapod import paths
    from sapod.gather import GatherResult, list_peer_rollouts
    from sapod.store import atomic_write_json

    monkeypatch.setattr(gather, "LISTING_MAX_AGE", 30.0)
    root = tmp_path / "exp"
    folder = paths.rollouts_dir(root, 1, 0)

    async def settled(w):
        while await w.wait(0.2):
            pass

    async def go():
        async with settled_watcher(folder) as w:
            near, far = GatherResult(), GatherResult()
            atomic_write_json(folder / "w2.json", {"n": 2})
            await settled(w)
            list_peer_rollouts(root, 1, 0, "me", near)
            list_peer_rollouts(root, 1, 0, "me", far)
            first = near.listed
            atomic_write_json(folder / "w3.json", {"n": 3})
            await settled(w)
            list_peer_rollouts(root, 1, 0, "me", near)
            second = near.listed
            assert second.previous is first and second.changed == {"w3"}
            atomic_write_json(folder / "w2.json", {"n": 22})  # replaced: a new inode
            atomic_write_json(folder / "w4.json", {"n": 4})
            atomic_write_json(folder / "me.json", {"n": 0})  # our own file is never a peer's
            await settled(w)
            list_peer_rollouts(root, 1, 0, "me", near)
            third = near.listed
            assert third.changes_since(second) == {"w2", "w4", "me"} and third.changes_since(first) is None
            assert first.previous is None  # one step kept
            list_peer_rollouts(root, 1, 0, "me", far)  # two listings behind: compares everything
            assert far.listed is third
            return near, far

    near, far = asyncio.run(go())
    assert near.files == far.files and set(near.files) == {"w2", "w3", "w4"}
    assert near.files["w2"][1] == os.stat(folder / "w2.json").st_ino


def test_no_new_inotify_instance_leaves_the_watcher_rescanning(tmp_path, monkeypatch):
    """If the loop's inotify instance fails and no new one can be had (EMFILE: the user's
    inotify instances are all taken), the watcher is degraded, says why, and its waits
    go on timing out (the node rescans); nothing raises, and closing it is clean."""
    import errno

    from sapod import watch

    async def go():
        loop = asyncio.get_running_loop()
        w = Watcher("inotify", loop)
        try:
            w.watch([tmp_path / "a"])
            watch._Inotify._by_loop[loop].close()  # as a failed read does

            def refuse(self, loop):
                raise OSError(errno.EMFILE, "Too many open files")

            monkeypatch.setattr(watch._Inotify, "__init__", refuse)
            assert await w.wait(0.05) is False
            w.watch([tmp_path / "a", tmp_path / "b"])
            assert await w.wait(0.05) is False
            return w.degraded, w.error
        finally:
            w.close()

    degraded, error = asyncio.run(go())
    assert degraded and "Too many open files" in error
