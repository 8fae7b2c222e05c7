"""Recovering from trouble: a file that cannot be read for a moment (EIO on a network
mount), a stop in the middle of a retry, a checkpoint a power loss left unusable.

The I/O errors are injected at ``os.open`` as the store module sees it: a real
passing EIO cannot be produced on a local disk.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import shutil
import threading
import time
import types

import pytest

from conftest import run_nodes
from sapod import node as node_module
from sapod import PROTOCOL, paths, schema, store
from sapod.checkpoint import list_checkpoints
from sapod.coordinator import Coordinator
from sapod.errors import StartupError, Unreadable
from sapod.gather import own_rollouts, own_submission
from sapod.progress import read_jsonl
from sapod.policy.scripted import ScriptedPolicy
from sapod.state import StateReader
from sapod.store import atomic_write_json, read_json
from sapod.tasks import make_task_source
from sapod import worker as worker_module
from sapod.worker import Worker


def eio_at_open(monkeypatch, suffix: str, times: int = 1) -> list[int]:
    """The next ``times`` opens by the store of a path ending in ``suffix`` fail with EIO.
    Returns a one-item list: the failures still to come."""
    left = [times]
    real = os.open

    def flaky(path, flags, *args, **kwargs):
        if left[0] > 0 and str(path).endswith(suffix):
            left[0] -= 1
            raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))
        return real(path, flags, *args, **kwargs)

    proxy = types.ModuleType("os")
    proxy.__dict__.update(os.__dict__)
    proxy.open = flaky
    monkeypatch.setattr(store, "os", proxy)
    return left


def state_now(root) -> schema.State:
    """The state file as it is (read past the store, so no injected error hits it)."""
    return schema.parse_state(json.loads(paths.state_file(root).read_text()))


@pytest.mark.parametrize("trust_stat", [True, False])
def test_a_passing_read_error_on_the_state_is_not_remembered(tmp_path, monkeypatch, trust_stat):
    """On a local disk readers skip a state file they have seen (same inode, mtime,
    size), and the nodes of a process share what they parsed: an I/O error must be
    neither, or every reader would ignore the state until the next round."""
    atomic_write_json(paths.state_file(tmp_path), schema.state_doc(schema.State(0, 0, 1, 1, "open", 0.0, "c", "i")))
    eio_at_open(monkeypatch, "current_state.json")
    a = StateReader(tmp_path, trust_stat=trust_stat)
    assert a.read() is None
    assert isinstance(a.problem, Unreadable)
    assert a.read() is not None and a.problem is None
    assert StateReader(tmp_path, trust_stat=trust_stat).read() is not None


def test_a_worker_s_own_files_that_cannot_be_read_raise_oserror_for_a_retry(tmp_path, monkeypatch):
    """What an earlier instance published decides whether a round is re-run: a file that
    cannot be read now is an I/O error to retry, not an absent (or unusable) file, and
    never an exception that ends the daemon."""
    root, tasks = tmp_path, make_task_source("default")
    atomic_write_json(paths.reward_file(root, 3, 0, "w1"), {"any": "thing"})
    atomic_write_json(paths.rollout_file(root, 3, 0, "w1"), {"schema": "x"})
    eio_at_open(monkeypatch, "w1.json", times=2)
    with pytest.raises(OSError) as got:
        own_submission(root, 3, 0, "w1")
    assert got.value.errno == errno.EIO
    with pytest.raises(OSError):
        own_rollouts(root, 3, 0, "w1", tasks)
    assert own_submission(root, 3, 0, "w1") is True  # readable again
    paths.reward_file(root, 3, 0, "w1").write_text("")  # torn: taken as not submitted, replaced
    assert own_submission(root, 3, 0, "w1") is False
    assert own_rollouts(root, 3, 0, "w1", tasks) is None  # read, and not usable: regenerated


async def _run_for(nodes, seconds: float) -> None:
    tasks = [asyncio.create_task(n.run()) for n in nodes]
    await asyncio.sleep(seconds)
    for n in nodes:
        n.stop.set()
    await asyncio.wait_for(asyncio.gather(*tasks), 20)


def test_a_restarted_coordinator_waits_out_a_state_file_it_cannot_read(make_cfg, monkeypatch):
    """It carries the swarm on from the state there (seq goes on), never from a guess."""
    over = dict(max_rounds=1000)
    asyncio.run(_run_for([Coordinator(make_cfg("coordinator", "c1", **over)),
                          Worker(make_cfg("worker", "w1", **over))], 1.0))
    c2 = Coordinator(make_cfg("coordinator", "c2", **over))
    before = state_now(c2.root)
    # As on a network mount, where such errors come from: no stat shortcut, every read opens.
    monkeypatch.setattr(node_module, "is_remote", lambda fstype: True)
    left = eio_at_open(monkeypatch, "current_state.json", times=3)

    async def go():
        t = asyncio.create_task(c2.run())
        for _ in range(200):
            await asyncio.sleep(0.05)
            if state_now(c2.root).coordinator == "c2":
                break
        c2.stop.set()
        await asyncio.wait_for(t, 20)

    asyncio.run(go())
    assert left == [0]
    after = state_now(c2.root)
    assert (after.round, after.epoch, after.seq) == (before.round, before.epoch + 1, before.seq + 1)


def test_a_coordinator_takes_over_above_the_epoch_its_workers_follow(make_cfg):
    """The state file shows an older epoch than the workers follow (a replica that has
    not synced, after a coordinator that took over and died before closing a round).
    The heartbeats say which epoch each worker follows, and the new coordinator starts
    above it: otherwise the workers would ignore its state and the swarm would stall."""
    over = dict(max_rounds=1000)
    c1 = Coordinator(make_cfg("coordinator", "c1", **over))
    w1 = Worker(make_cfg("worker", "w1", **over))
    root = c1.root

    async def go():
        tw = asyncio.create_task(w1.run())
        tc = asyncio.create_task(c1.run())
        await asyncio.sleep(1.0)
        c1.stop.set()
        await asyncio.wait_for(tc, 20)
        stale = state_now(root)
        # a coordinator that took over and died: one epoch up, no round closed under it
        newer = schema.State(stale.round, 0, stale.epoch + 1, stale.seq + 1, "open", stale.opened_at, "c2", "i2")
        atomic_write_json(paths.state_file(root), schema.state_doc(newer))
        for _ in range(200):
            await asyncio.sleep(0.05)
            peer = schema.parse_peer(read_json(paths.peer_file(root, "w1")), "w1")
            if peer.epoch == newer.epoch:
                break
        assert peer.epoch == newer.epoch
        atomic_write_json(paths.state_file(root), schema.state_doc(stale))  # the stale replica
        waiting_at = w1.last_round
        c3 = Coordinator(make_cfg("coordinator", "c3", **over))
        tc = asyncio.create_task(c3.run())
        for _ in range(200):
            await asyncio.sleep(0.05)
            if w1.last_round > waiting_at + 1:
                break
        c3.stop.set()
        w1.stop.set()
        await asyncio.wait_for(asyncio.gather(tc, tw), 20)
        assert state_now(root).epoch > newer.epoch
        assert w1.last_round > waiting_at + 1, "the worker never took the new coordinator's rounds"

    asyncio.run(go())


def test_experiment_settings_are_never_written_over_a_file_that_cannot_be_read(make_cfg, monkeypatch):
    cfg = make_cfg("coordinator", "c1", num_train_samples=3)
    asyncio.run(_run_for([Coordinator(cfg)], 0.3))
    c2 = Coordinator(make_cfg("coordinator", "c2", num_train_samples=2))
    left = eio_at_open(monkeypatch, "experiment.json", times=2)
    asyncio.run(_run_for([c2], 1.0))
    assert left == [0]
    doc = read_json(paths.experiment_file(c2.root))
    assert doc["settings"]["num_train_samples"] == 3 and doc["created_by"]["node_id"] == "c1"


def test_a_coordinator_refuses_an_experiment_file_that_is_not_valid(make_cfg):
    c = Coordinator(make_cfg("coordinator", "c1"))
    path = paths.experiment_file(c.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"schema": "something else"}')
    with pytest.raises(StartupError, match="experiment.json is not a valid record"):
        asyncio.run(asyncio.wait_for(c.run(), 20))
    assert path.read_text() == '{"schema": "something else"}'


def test_a_submission_cut_short_by_a_stop_is_sent_when_the_worker_is_back(make_cfg, monkeypatch):
    """A stop while the reward file's publish was being retried: the model trained on the
    round, so it is not re-run, and its submission is owed. With a single worker the
    coordinator would wait for it for ever; it goes out when the worker is back."""
    over = dict(max_rounds=4, checkpoint_interval=10, round_timeout=30)
    c1, w1 = Coordinator(make_cfg("coordinator", "coord", **over)), Worker(make_cfg("worker", "w1", **over))
    real = Worker.publish

    async def failing(self, path, doc):
        if path == paths.reward_file(self.root, 1, 0, self.node_id):
            self.stop.set()  # SIGTERM while the mount throws EIO
            raise OSError(errno.EIO, "Input/output error")
        return await real(self, path, doc)

    monkeypatch.setattr(Worker, "publish", failing)

    async def first():
        tc, tw = asyncio.create_task(c1.run()), asyncio.create_task(w1.run())
        await asyncio.wait_for(tw, 30)
        c1.stop.set()
        await asyncio.wait_for(tc, 20)

    asyncio.run(first())
    root = c1.root
    assert w1.last_round == 1 and not paths.reward_file(root, 1, 0, "w1").exists()
    rows = read_jsonl(paths.metrics_file(root, "w1"))  # the round was played: its row is kept
    assert [(x["round"], x["submitted"], x.get("owed")) for x in rows] == [(0, True, None), (1, False, True)]
    monkeypatch.setattr(Worker, "publish", real)
    c2, w2 = Coordinator(make_cfg("coordinator", "coord", **over)), Worker(make_cfg("worker", "w1", **over))

    async def second():
        await asyncio.wait_for(asyncio.gather(c2.run(), w2.run()), 30)

    asyncio.run(second())
    assert paths.reward_file(root, 1, 0, "w1").exists()
    assert state_now(root).status == "finished" and w2.last_round == 3
    assert [x["round"] for x in read_jsonl(paths.metrics_file(root, "w1"))] == [0, 1, 2, 3]


def test_a_worker_resumes_from_an_older_checkpoint_when_the_newest_is_unusable(make_cfg):
    """A restore that fails (a model file a power loss emptied) falls back to the
    previous checkpoint kept; with none restorable the worker refuses to start."""
    over = dict(max_rounds=4, checkpoint_interval=1)
    run_nodes(Coordinator(make_cfg("coordinator", "coord", **over)), Worker(make_cfg("worker", "w1", **over)))
    root = make_cfg().root
    found = list_checkpoints(root, "w1")
    assert [r for r, _ in found] == [2, 3]
    (found[-1][1] / "scripted.json").write_text("")  # a save cut short by a power loss

    async def resume(worker):
        await worker._resume()

    w = Worker(make_cfg("worker", "w1", max_rounds=10))
    w.policy = ScriptedPolicy()
    asyncio.run(resume(w))
    assert w.last_round == 2
    (found[0][1] / "scripted.json").write_text("")
    w = Worker(make_cfg("worker", "w1", max_rounds=10))
    w.policy = ScriptedPolicy()
    with pytest.raises(StartupError, match="no checkpoint can be restored"):
        asyncio.run(resume(w))


def test_a_heartbeat_write_in_flight_at_a_stop_never_lands_after_the_final_one(make_cfg, monkeypatch):
    """On a network mount a heartbeat's write runs in a thread, which cancelling the
    heartbeat task does not stop: the final "stopped" beat must come after it."""
    monkeypatch.setattr(node_module, "is_remote", lambda fstype: True)
    real = node_module.atomic_write_json
    in_flight = threading.Event()

    def slow(path, doc, durable=True):
        if doc.get("status") == "running" and doc.get("beat", 0) >= 3:
            in_flight.set()
            time.sleep(1.0)  # a Drive write that takes a moment
        real(path, doc, durable)

    monkeypatch.setattr(node_module, "atomic_write_json", slow)

    class Idle(node_module.Node):
        role = "worker"

        async def main(self):
            await self.set_phase("idle")
            await self.stop.wait()

    n = Idle(make_cfg("worker", "w7", heartbeat_interval=0.2))

    async def go():
        t = asyncio.create_task(n.run())
        while not in_flight.is_set():
            await asyncio.sleep(0.01)
        n.stop.set()  # SIGTERM while that write is in flight
        await asyncio.wait_for(t, 20)
        await asyncio.sleep(1.5)  # time for a write left behind to land

    asyncio.run(go())
    assert read_json(paths.peer_file(n.root, "w7"))["status"] == "stopped"


def test_a_stop_does_not_wait_for_the_model_to_load(make_cfg, monkeypatch):
    """A hub download or a big model on a slow disk: the worker stops at once (the
    loading thread is left to the process's exit, which does not wait for it)."""
    release = threading.Event()
    real = worker_module.load_policy

    def slow_load(cfg, prompt):
        release.wait(30)
        return real(cfg, prompt)

    monkeypatch.setattr(worker_module, "load_policy", slow_load)
    w = Worker(make_cfg("worker", "w8"))

    async def go():
        t = asyncio.create_task(w.run())
        await asyncio.sleep(1.0)
        started = time.monotonic()
        w.stop.set()
        await asyncio.wait_for(t, 20)
        return time.monotonic() - started

    try:
        took = asyncio.run(go())
    finally:
        release.set()
    assert took < 5 and w.phase == "register"


def test_a_worker_refuses_recorded_settings_that_break_their_rules(make_cfg):
    """A hand-edited experiment.json: a one-line startup error naming the setting (exit 3),
    not a ZeroDivisionError in the first round."""
    w = Worker(make_cfg("worker", "w1"))
    path = paths.experiment_file(w.root)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, {"schema": schema.EXPERIMENT, "protocol": PROTOCOL, "settings": {"num_generations": 0}})
    with pytest.raises(StartupError, match="settings.num_generations=0 is not allowed"):
        asyncio.run(asyncio.wait_for(w.run(), 30))


def test_the_reward_earned_after_the_last_checkpoint_is_not_lost_to_a_crash(make_cfg):
    """A crash between checkpoints takes the model back to the last one, but the rounds
    played since were scored and submitted: cumulative_reward never goes down, and the
    rounds count. (Checkpoints of rounds 1 and 2 removed, as if the worker had been
    killed with only round 0's written.)"""
    first = dict(max_rounds=3, checkpoint_interval=1, checkpoint_keep=5)
    run_nodes(Coordinator(make_cfg("coordinator", "coord", **first)), Worker(make_cfg("worker", "w1", **first)))
    root = make_cfg().root
    for r in (1, 2):
        shutil.rmtree(paths.checkpoint_dir(root, r, "w1"))
    w = Worker(make_cfg("worker", "w1", max_rounds=5, checkpoint_interval=1))
    run_nodes(Coordinator(make_cfg("coordinator", "coord", max_rounds=5, checkpoint_interval=1)), w)
    rows = [json.loads(line) for line in paths.metrics_file(root, "w1").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    running = 0.0
    for row in rows:
        running += row["reward_mean"]
        assert row["cumulative_reward"] == pytest.approx(running)
    assert w.rounds_done == 5


def test_a_straggler_never_submits_into_the_last_round_once_the_swarm_finished(make_cfg):
    """The last round closes without the round moving on (state finished at r): a worker still in it sees it closed."""
    w = Worker(make_cfg("worker", "w1"))
    w.reader = StateReader(w.root)
    atomic_write_json(paths.state_file(w.root), schema.state_doc(schema.State(4, 0, 1, 9, "finished", 0.0, "c", "i")))
    assert w._round_closed(4) and w._round_closed(3)
    atomic_write_json(paths.state_file(w.root), schema.state_doc(schema.State(5, 0, 1, 10, "open", 0.0, "c", "i")))
    assert not w._round_closed(5) and w._round_closed(4)
