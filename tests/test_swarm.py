"""The protocol end to end, in one process, with the torch-free scripted policy."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from conftest import read_rows, run_nodes
from sapod import paths, schema
from sapod.coordinator import Coordinator
from sapod.errors import Displaced
from sapod.state import StateReader
from sapod.store import atomic_write_json, read_json
from sapod.worker import Worker
from sapod import get_experiment_progress


def swarm(make_cfg, workers=2, **over):
    nodes = [Coordinator(make_cfg("coordinator", "coord", **over))]
    nodes += [Worker(make_cfg("worker", f"w{i + 1}", **over)) for i in range(workers)]
    return nodes


def test_rounds_complete_and_every_contract_file_is_there(make_cfg):
    """Coordinator + 2 workers finish MAX_ROUNDS; each file follows the contract."""
    nodes = swarm(make_cfg, max_rounds=4)
    assert run_nodes(*nodes) == [None, None, None]
    root = nodes[0].root
    exp = read_json(paths.experiment_file(root))
    assert exp["schema"] == schema.EXPERIMENT and exp["settings"]["max_rounds"] == 4
    state = schema.parse_state(read_json(paths.state_file(root)))
    assert (state.status, state.round, state.epoch) == ("finished", 3, 1)
    for r in range(4):
        for w in ("w1", "w2"):
            ro = schema.parse_rollouts(read_json(paths.rollout_file(root, r, 0, w), 1 << 24), w, r, 0)
            assert len(ro.items) == 2 and all(len(i.completions) == 4 for i in ro.items)
            sub = schema.parse_submission(read_json(paths.reward_file(root, r, 0, w)), w, r, 0)
            assert sub.n_local == 2 and sub.n_completions == 8
    for w in ("w1", "w2"):
        rows = read_rows(paths.metrics_file(root, w))
        assert [r["round"] for r in rows] == [0, 1, 2, 3]
        assert all(r["n_external"] <= 2 for r in rows)
        assert rows[-1]["cumulative_reward"] == pytest.approx(sum(r["reward_mean"] for r in rows))
        peer = schema.parse_peer(read_json(paths.peer_file(root, w)), w)
        assert peer.status == "finished"
        assert paths.complete_marker(paths.checkpoint_dir(root, 3, w)).is_file()
        events = [e["phase"] for e in read_rows(paths.events_file(root, w))]
        assert events[:3] == ["register", "await_stage", "generate"] and events[-1] == "finished"
    progress = get_experiment_progress(root.parent.parent, "t")
    assert progress["state"]["status"] == "finished"
    assert progress["nodes"]["w1"]["rounds_completed"] == 4 and progress["nodes"]["w1"]["finished"]


def test_nodes_set_the_collector_once_started(make_cfg):
    """Once a node has started, its start-up heap is frozen and the collector runs at
    GC_THRESHOLDS."""
    import gc

    from sapod.daemon import GC_THRESHOLDS

    default = (700, 10, 10)
    gc.unfreeze()
    gc.set_threshold(*default)
    try:
        assert run_nodes(*swarm(make_cfg, max_rounds=1)) == [None, None, None]
        assert gc.get_threshold() == GC_THRESHOLDS and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()


def test_sharing_uses_external_groups(make_cfg):
    """With J=2 workers train on groups from each other; with J=0 on none."""
    nodes = swarm(make_cfg, max_rounds=3)
    run_nodes(*nodes)
    rows = read_rows(paths.metrics_file(nodes[0].root, "w1"))
    assert sum(r["n_external"] for r in rows) > 0
    assert all(set(r["external_from"]) <= {"w2"} for r in rows)


def test_plain_grpo_with_j_zero(make_cfg):
    """J=0 is training alone: no gather wait, no external groups."""
    nodes = swarm(make_cfg, max_rounds=2, num_transplant_trees=0)
    run_nodes(*nodes)
    rows = read_rows(paths.metrics_file(nodes[0].root, "w2"))
    assert [r["n_external"] for r in rows] == [0, 0]


def test_dead_worker_does_not_block_rounds(make_cfg):
    """A registered worker whose heartbeat never moves is judged dead after PEER_TIMEOUT; rounds go on."""
    nodes = swarm(make_cfg, workers=1, max_rounds=2)
    root = nodes[0].root
    ghost = schema.envelope(schema.PEER, "ghost", "g", 0, 0, 0)
    ghost.update(role="worker", model="m", host="h", pid=1, version="0", started_at=0.0, beat=7, phase="train",
                 status="running")
    atomic_write_json(paths.peer_file(root, "ghost"), ghost)
    t0 = time.monotonic()
    assert run_nodes(*nodes, timeout=30) == [None, None]
    # Round 0 waits for the ghost until PEER_TIMEOUT (2 s) passes on the coordinator's clock.
    assert 1.5 < time.monotonic() - t0 < 15


def test_round_timeout_advances_with_a_quorum(make_cfg):
    """A live worker that never submits holds a round only until ROUND_TIMEOUT."""
    nodes = swarm(make_cfg, workers=1, max_rounds=2, round_timeout=1.5)
    root = nodes[0].root

    async def stuck_peer():
        beat = 0
        while True:
            beat += 1
            doc = schema.envelope(schema.PEER, "stuck", "s", 0, 0, 0)
            doc.update(role="worker", model="m", host="h", pid=1, version="0", started_at=0.0, beat=beat,
                       phase="train", status="running")
            atomic_write_json(paths.peer_file(root, "stuck"), doc)
            await asyncio.sleep(0.1)

    async def go():
        hb = asyncio.create_task(stuck_peer())
        try:
            return await asyncio.wait_for(asyncio.gather(*(n.run() for n in nodes)), 30)
        finally:
            hb.cancel()

    t0 = time.monotonic()
    asyncio.run(go())
    elapsed = time.monotonic() - t0
    assert 3.0 <= elapsed < 15  # two rounds, each held for ROUND_TIMEOUT
    events = read_rows(paths.progress_file(root, "coord"))
    done = [e for e in events if e["event"] == "round_complete"]
    assert [e["timed_out"] for e in done] == [True, True] and done[0]["missing"] == ["stuck"]


def test_restart_resumes_from_checkpoint(make_cfg):
    """A stopped worker resumes its counters and policy from its checkpoint and joins the open round."""
    first = swarm(make_cfg, workers=1, max_rounds=3, checkpoint_interval=1)
    run_nodes(*first)
    root = first[0].root
    skill = json.loads((paths.checkpoint_dir(root, 2, "w1") / "scripted.json").read_text())["skill"]
    second = swarm(make_cfg, workers=1, max_rounds=5, checkpoint_interval=1)
    run_nodes(*second)
    w = second[1]
    assert w.rounds_done == 5 and w.last_round == 4
    rows = read_rows(paths.metrics_file(root, "w1"))
    assert [r["round"] for r in rows] == [0, 1, 2, 3, 4]
    assert rows[3]["cumulative_reward"] == pytest.approx(sum(r["reward_mean"] for r in rows[:4]))
    assert StateReader(root).read().epoch == 2
    assert w.policy.skill >= skill


def test_duplicate_node_id_is_displaced(make_cfg):
    """Two daemons with one NODE_ID: the later one is displaced (exit 4); the first keeps going."""
    coord = Coordinator(make_cfg("coordinator", "coord", max_rounds=1000))
    a = Worker(make_cfg("worker", "w1", max_rounds=1000))
    b = Worker(make_cfg("worker", "w1", max_rounds=1000))
    b.started_at = a.started_at + 1

    async def go():
        ta = asyncio.create_task(a.run())
        tc = asyncio.create_task(coord.run())
        await asyncio.sleep(0.5)
        tb = asyncio.create_task(b.run())
        with pytest.raises(Displaced):
            await asyncio.wait_for(tb, 10)
        assert not ta.done()
        a.stop.set()
        coord.stop.set()
        await asyncio.wait_for(asyncio.gather(ta, tc), 10)

    asyncio.run(go())


def test_a_live_owner_whose_file_reads_torn_at_times_is_not_taken_over(make_cfg):
    """On a FUSE mount that copies a replaced file into place, a reader sometimes gets a
    torn peer file. A daemon starting under a NODE_ID whose beat still moves steps down
    before registering even when some of its looks land on a torn copy; it does not
    take a torn read for a dead owner and write over the live one's file."""
    import threading

    from conftest import write_peer

    w = Worker(make_cfg("worker", "w1", max_rounds=5))
    path = paths.peer_file(w.root, "w1")
    done = threading.Event()

    def owner_on_a_fuse_mount():
        beat = 1
        while not done.is_set():
            write_peer(w.root, "w1", beat)
            time.sleep(0.1)
            path.write_text('{"schema": ')  # the copy the mount shows for a moment
            time.sleep(0.03)
            beat += 1

    path.parent.mkdir(parents=True, exist_ok=True)
    write_peer(w.root, "w1", 0)
    t = threading.Thread(target=owner_on_a_fuse_mount)
    t.start()
    try:
        with pytest.raises(Displaced):
            asyncio.run(asyncio.wait_for(w.run(), 10))
    finally:
        done.set()
        t.join()
    assert not w.registered.is_set()


def test_a_restarted_node_removes_the_heartbeat_temp_files_a_kill_left(make_cfg):
    """A node killed between creating its heartbeat's temp file and renaming it leaves
    the temp in peers/ for good; the node removes its own old ones when it registers.
    A young one (a write that may be in flight) and another node's are left alone."""
    import os

    nodes = swarm(make_cfg, workers=1, max_rounds=1)
    peers = paths.peers_dir(nodes[0].root)
    peers.mkdir(parents=True)
    old, young, others = (peers / ".w1.json.tmp-41-0badf00d", peers / ".w1.json.tmp-42-1badf00d",
                          peers / ".w2.json.tmp-43-2badf00d")
    for f in (old, young, others):
        f.write_text('{"schema": ')
    for f in (old, others):
        os.utime(f, (time.time() - 600, time.time() - 600))
    assert run_nodes(*nodes) == [None, None]
    assert not old.exists()
    assert young.exists() and others.exists()


def test_newer_coordinator_displaces_older(make_cfg):
    """A second coordinator takes the next epoch; the first steps down with Displaced."""
    old = Coordinator(make_cfg("coordinator", "c1", max_rounds=1000))
    new = Coordinator(make_cfg("coordinator", "c2", max_rounds=1000))
    w = Worker(make_cfg("worker", "w1", max_rounds=1000))

    async def go():
        to = asyncio.create_task(old.run())
        tw = asyncio.create_task(w.run())
        await asyncio.sleep(0.5)
        tn = asyncio.create_task(new.run())
        with pytest.raises(Displaced):
            await asyncio.wait_for(to, 10)
        assert StateReader(new.root).read().epoch == 2
        new.stop.set()
        w.stop.set()
        await asyncio.wait_for(asyncio.gather(tn, tw), 10)

    asyncio.run(go())


def test_reader_never_goes_backwards(tmp_path):
    """A state with a lower (epoch, seq) than one already seen is ignored."""
    f = paths.state_file(tmp_path)
    atomic_write_json(f, schema.state_doc(schema.State(5, 0, 2, 10, "open", 0.0, "c", "i")))
    reader = StateReader(tmp_path)
    assert reader.read().round == 5
    atomic_write_json(f, schema.state_doc(schema.State(3, 0, 1, 40, "open", 0.0, "c", "i")))
    assert reader.read().round == 5
    atomic_write_json(f, schema.state_doc(schema.State(6, 0, 2, 11, "open", 0.0, "c", "i")))
    assert reader.read().round == 6


def test_bad_peer_rollouts_do_not_stop_training(make_cfg):
    """Garbage, forged and misnamed peer rollouts are rejected and counted; the worker trains on."""
    nodes = swarm(make_cfg, workers=1, max_rounds=1)
    root = nodes[0].root
    folder = paths.rollouts_dir(root, 0, 0)
    folder.mkdir(parents=True)
    (folder / "evil.json").write_text('{"schema": "sapod.rollouts/1", "node_id": "ev')
    forged = schema.envelope(schema.ROLLOUTS, "forger", "f", 0, 0, 1)
    forged.update(model="m", items=[{"task": "basic_arithmetic", "seed": 1, "index": 0, "question": "1+1=?",
                                     "answer": "2", "metadata": {}, "completions": ["<answer>2</answer>", "x"]}])
    atomic_write_json(folder / "forger.json", forged)
    (folder / "forger (1).json").write_text("{}")
    assert run_nodes(*nodes) == [None, None]
    row = read_rows(paths.metrics_file(root, "w1"))[0]
    assert row["rejected_invalid"] == 2 and row["n_external"] == 0


def test_restarted_worker_keeps_what_it_published(make_cfg):
    """A node that restarts mid-round reuses its published rollouts instead of rewriting them."""
    from sapod.gather import rollouts_doc
    from sapod.tasks import make_task_source

    nodes = swarm(make_cfg, workers=1, max_rounds=1)
    root = nodes[0].root
    items = make_task_source("").sample(2, 7)
    completions = [["<answer>x</answer>", "<answer>y</answer>", "z", "w"] for _ in items]
    earlier = rollouts_doc("w1", "earlier-instance", 0, 0, 1, "sapod:scripted", items, completions)
    atomic_write_json(paths.rollout_file(root, 0, 0, "w1"), earlier)
    assert run_nodes(*nodes) == [None, None]
    assert read_json(paths.rollout_file(root, 0, 0, "w1"), 1 << 24)["instance"] == "earlier-instance"
    row = read_rows(paths.metrics_file(root, "w1"))[0]
    assert row["tokens_generated"] == 0 and row["n_local"] == 2


def test_late_joiner_starts_at_the_open_round(make_cfg):
    """A worker that joins late trains from the round open when it arrives, never a closed one."""
    coord = Coordinator(make_cfg("coordinator", "coord", max_rounds=100_000))  # stopped below, not finished
    w1 = Worker(make_cfg("worker", "w1"))
    w2 = Worker(make_cfg("worker", "w2"))
    root = coord.root

    def rows(node: str) -> list[dict]:
        f = paths.metrics_file(root, node)
        return read_rows(f) if f.exists() else []

    def open_round() -> int:
        state = StateReader(root).read()
        return -1 if state is None else state.round

    async def go():
        tasks = [asyncio.create_task(coord.run()), asyncio.create_task(w1.run())]
        # w1 has trained two rounds and the coordinator has moved on: round 2 or later is open
        # (w1's records are appended in the background, so a row can land before the round closes).
        while len(rows("w1")) < 2 or open_round() < 2:
            await asyncio.sleep(0.05)
        tasks.append(asyncio.create_task(w2.run()))
        while not rows("w2"):
            await asyncio.sleep(0.05)
        for node in (coord, w1, w2):
            node.stop.set()
        await asyncio.wait_for(asyncio.gather(*tasks), 60)

    asyncio.run(asyncio.wait_for(go(), 120))
    first = rows("w2")[0]["round"]
    assert first >= 2
    w1_rounds = [r["round"] for r in rows("w1")]
    assert w1_rounds == list(range(len(w1_rounds))) and w1_rounds[-1] >= first - 1  # w1 never skipped a round


def test_workers_adopt_the_recorded_settings(make_cfg):
    """I, J and G recorded by the coordinator in experiment.json are the swarm's, whatever a worker was given."""
    coord = Coordinator(make_cfg("coordinator", "coord", max_rounds=1, num_train_samples=3, num_generations=5))
    w = Worker(make_cfg("worker", "w1", num_train_samples=1, num_generations=2))
    run_nodes(coord, w)
    row = read_rows(paths.metrics_file(coord.root, "w1"))[0]
    assert row["n_local"] == 3 and len(row["rewards"]) == 15


def test_coordinator_never_imports_torch(tmp_path):
    """A coordinator run through the CLI entry point loads neither torch, transformers nor reasoning-gym."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(f"""
        import signal, sys, threading, os
        from sapod.cli import main
        threading.Timer(1.5, lambda: os.kill(os.getpid(), signal.SIGTERM)).start()
        code = main(["--role", "coordinator", "--shared", {str(tmp_path)!r}, "--log-format", "json"])
        bad = [m for m in ("torch", "transformers", "reasoning_gym") if m in sys.modules]
        assert code == 0 and not bad, (code, bad)
    """)
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=60)
    assert (tmp_path / "experiments" / "sapod" / "state" / "current_state.json").is_file()


def test_coordinator_tidies_old_rounds(make_cfg):
    """With cleanup on, the coordinator keeps the last N rounds and archives the rest, one file per round."""
    import tarfile

    nodes = swarm(make_cfg, max_rounds=6, rollout_cleanup_enabled="true", rollout_keep_last_n_rounds=3,
                  rollout_archive_old="true")
    assert run_nodes(*nodes) == [None, None, None]
    root = nodes[0].root
    assert sorted(p.name for p in (root / "rollouts").iterdir()) == ["round_3", "round_4", "round_5"]
    assert sorted(p.name for p in (root / "rewards").iterdir()) == ["round_3", "round_4", "round_5"]
    archives = paths.archives_dir(root.parent.parent) / "t"
    assert sorted(p.name for p in archives.iterdir()) == ["round_0.tar.gz", "round_1.tar.gz", "round_2.tar.gz"]
    with tarfile.open(archives / "round_1.tar.gz") as tar:
        assert "rollouts/round_1/stage_0/w2.json" in tar.getnames()
    rows = read_rows(paths.metrics_file(root, "w1"))
    assert [r["round"] for r in rows] == list(range(6))


def _tally(root, r, epoch):
    from sapod.rounds import RoundBook

    doc = RoundBook(r, 0).tally(live=set(), reason="all_submitted", coordinator="c0", instance="i0", epoch=epoch,
                                seconds=1.0, collected_at=0.0, closed_at=0.0)
    atomic_write_json(paths.tally_file(root, r, 0), doc)


def test_coordinator_on_a_stale_view_does_not_reopen_closed_rounds(make_cfg):
    """A restart on a replica that has not synced: the state says round 3, tallies prove
    rounds up to 5 closed (under epoch 4); the coordinator opens round 6 above epoch 4."""
    c = Coordinator(make_cfg("coordinator", "coord", max_rounds=1000))
    root = c.root
    atomic_write_json(paths.state_file(root), schema.state_doc(schema.State(3, 0, 1, 7, "open", 0.0, "c0", "i0")))
    for r in range(6):
        _tally(root, r, 4)

    async def go():
        t = asyncio.create_task(c.run())
        await asyncio.sleep(0.5)
        c.stop.set()
        await asyncio.wait_for(t, 10)

    asyncio.run(go())
    state = schema.parse_state(read_json(paths.state_file(root)))
    assert (state.round, state.status, state.epoch) == (6, "open", 5)


def test_coordinator_puts_its_state_back_over_an_older_one(make_cfg):
    """An older coordinator (or a stale replica) writes over the state: the current one
    restores its own at its next wake; a newer epoch makes it step down."""
    c = Coordinator(make_cfg("coordinator", "coord", max_rounds=1000))
    root = c.root

    async def go():
        t = asyncio.create_task(c.run())
        await asyncio.sleep(0.5)
        mine = schema.parse_state(read_json(paths.state_file(root)))
        atomic_write_json(paths.state_file(root),
                          schema.state_doc(schema.State(0, 0, mine.epoch - 1, 99, "open", 0.0, "old", "x")))
        await asyncio.sleep(0.5)
        assert schema.parse_state(read_json(paths.state_file(root))) == mine
        atomic_write_json(paths.state_file(root),
                          schema.state_doc(schema.State(0, 0, mine.epoch + 1, 1, "open", 0.0, "new", "y")))
        with pytest.raises(Displaced):
            await asyncio.wait_for(t, 10)

    asyncio.run(go())


def _stopped_mid_round(root, round_: int, behind: str) -> None:
    """Make a finished run look stopped in ``round_`` after every worker but ``behind`` had
    submitted it: ``behind`` has neither its submission, its metrics row nor its checkpoint
    for the round, there is no tally, and the state is open at the round."""
    import shutil

    paths.reward_file(root, round_, 0, behind).unlink()
    paths.tally_file(root, round_, 0).unlink()
    shutil.rmtree(paths.checkpoint_dir(root, round_, behind))
    metrics = paths.metrics_file(root, behind)
    kept = [r for r in read_rows(metrics) if r["round"] != round_]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
    done = schema.parse_state(read_json(paths.state_file(root)))
    opened = schema.State(round_, 0, done.epoch, done.seq + 1, "open", time.time(), done.coordinator, done.instance)
    atomic_write_json(paths.state_file(root), schema.state_doc(opened))


@pytest.mark.parametrize("io", ["inline", "threads"])
@pytest.mark.parametrize("behind", ["worker-1", "worker-2"])
def test_a_swarm_restarted_mid_round_does_not_close_it_before_its_workers_are_back(make_cfg, monkeypatch,
                                                                                   behind, io):
    """The whole swarm stopped in a round that one worker had not submitted yet. On the rerun
    the coordinator finds the others' submissions but no live worker; it must not close the
    round before the worker that owes it is back, or that worker skips it for good. That
    worker is also the slowest to start, and with file work in threads (as on a network
    folder) the nodes' startups interleave."""
    from sapod import node
    from sapod.demo import run_swarm

    monkeypatch.setattr(node, "is_remote", lambda fstype: io == "threads")
    real_yield = node.Node._yield_to_live_owner

    async def slow_to_start(self):  # a mount that answers the worker that owes the round slowly
        if self.node_id == behind:
            await asyncio.sleep(0.5)
        await real_yield(self)

    monkeypatch.setattr(node.Node, "_yield_to_live_owner", slow_to_start)
    base = make_cfg(max_rounds=2, checkpoint_interval=1)
    assert run_swarm(base, 2) == 0
    root = base.root
    _stopped_mid_round(root, 1, behind)  # the last round
    assert run_swarm(base, 2) == 0
    assert StateReader(root).read().status == "finished"
    for w in ("worker-1", "worker-2"):
        assert sorted(r["round"] for r in read_rows(paths.metrics_file(root, w))) == [0, 1], w
    tally = read_json(paths.tally_file(root, 1, 0))
    assert set(tally["counted"]) == {"worker-1", "worker-2"}


def test_a_coordinator_alone_waits_for_a_worker_before_closing_a_round_on_leftovers(make_cfg):
    """Restarted alone mid-round, with one worker's submission left from before the stop and
    no worker live, the coordinator does not call that "every live worker submitted": the
    round stays open until a worker is back or ROUND_TIMEOUT closes it."""
    from sapod.demo import run_swarm

    base = make_cfg(max_rounds=2, checkpoint_interval=1, round_timeout=1.5)
    assert run_swarm(base, 2) == 0
    root = base.root
    _stopped_mid_round(root, 1, "worker-1")
    t0 = time.monotonic()
    assert run_nodes(Coordinator(base.with_(role="coordinator", node_id="coordinator"))) == [None]
    assert time.monotonic() - t0 >= 1.5
    tally = read_json(paths.tally_file(root, 1, 0))
    assert tally["reason"] == "timeout" and set(tally["counted"]) == {"worker-2"}


def test_tidying_old_rounds_does_not_stop_the_coordinator_s_heartbeat(make_cfg, monkeypatch):
    """A long tidy (cleanup turned on after many rounds) runs off the event loop: the coordinator's heartbeat goes on."""
    import sapod.coordinator as coordinator_module

    nodes = swarm(make_cfg, workers=1, max_rounds=3, rollout_cleanup_enabled="true", rollout_keep_last_n_rounds=2)
    beats = []

    def slow_tidy(cfg, open_round):
        before = nodes[0].beat
        time.sleep(1.0)  # packing many old rounds
        beats.append(nodes[0].beat - before)

    monkeypatch.setattr(coordinator_module, "tidy_for", slow_tidy)
    assert run_nodes(*nodes, timeout=30) == [None, None]
    assert beats and min(beats) >= 2, beats  # HEARTBEAT_INTERVAL 0.2 s


def test_a_coordinator_restarted_with_max_rounds_below_the_open_round_finishes(make_cfg):
    """MAX_ROUNDS lowered between restarts: no round at or beyond it is run; raising it again reopens that round."""
    coord = Coordinator(make_cfg("coordinator", "coord", max_rounds=3))
    atomic_write_json(paths.state_file(coord.root), schema.state_doc(schema.State(5, 0, 1, 6, "open", 0.0, "c", "i")))
    assert run_nodes(coord, timeout=10) == [None]
    state = schema.parse_state(read_json(paths.state_file(coord.root)))
    assert (state.round, state.status) == (4, "finished")
    again = Coordinator(make_cfg("coordinator", "coord", max_rounds=10))
    run_nodes(again, timeout=10, stop_after=1.0)
    state = schema.parse_state(read_json(paths.state_file(coord.root)))
    assert (state.round, state.status) == (5, "open")


def test_inotify_asked_for_on_a_network_mount_is_warned_about(make_cfg, monkeypatch):
    """WATCH_MODE=inotify on a network mount: inotify sees only this machine's writes there.
    The nodes run (rescans find the rest) and each says so at start, with the fix."""
    import io
    import sys

    from sapod import node, watch
    from sapod.logs import configure_logging

    monkeypatch.setattr(node, "is_remote", lambda fstype: True)
    monkeypatch.setattr(watch, "is_remote", lambda fstype: True)
    out = io.StringIO()
    configure_logging("json", "warning", stream=out)
    try:
        assert run_nodes(*swarm(make_cfg, workers=1, max_rounds=2, watch_mode="inotify")) == [None, None]
    finally:
        configure_logging("json", "warning", stream=sys.stdout)
    warned = [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == "inotify_on_network_mount"]
    assert sorted(e["node"] for e in warned) == ["coord", "w1"]
    assert all(e["hint"] == "WATCH_MODE=auto polls here" and "only this machine" in e["reason"] for e in warned)


def test_finished_flags_travel_from_generation_to_training(make_cfg, monkeypatch):
    """A worker publishes its Generation's finished flags in its rollouts file and trains on
    them: its own groups with its flags, its peer's groups with the flags the peer published."""
    from sapod.policy.scripted import ScriptedPolicy
    from sapod.types import Generation

    real_generate = ScriptedPolicy.generate
    trained: list = []

    def generate(self, items, num_generations, seed):
        gen = real_generate(self, items, num_generations, seed)
        flags = [[(seed + i) % 2 == 0 and g % 2 == 0 for g in range(num_generations)] for i in range(len(items))]
        return Generation(gen.completions, gen.tokens, flags)

    def train_step(self, groups):
        trained.extend(groups)
        return {"loss": 0.0, "grad_norm": 0.0, "tokens": 0}

    monkeypatch.setattr(ScriptedPolicy, "generate", generate)
    monkeypatch.setattr(ScriptedPolicy, "train_step", train_step)
    nodes = swarm(make_cfg, max_rounds=2)
    assert run_nodes(*nodes) == [None, None, None]
    root = nodes[0].root
    published = {}
    for r in range(2):
        for w in ("w1", "w2"):
            doc = read_json(paths.rollout_file(root, r, 0, w), 1 << 24)
            for it in schema.parse_rollouts(doc, w, r, 0).items:
                published[(w, it.task, it.seed, it.index, it.completions)] = list(it.finished) or [False] * 4
    assert any(any(f) for f in published.values()) and any(not any(f) for f in published.values())
    assert trained and any(g.source == "w1" for g in trained) and any(g.source == "w2" for g in trained)
    for g in trained:
        assert g.finished == published[(g.source, g.item.task, g.item.seed, g.item.index, tuple(g.completions))]
