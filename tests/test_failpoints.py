"""Failpoints (SAPOD_FAILPOINTS) and how nodes ride out the errors they inject."""

from __future__ import annotations

import errno

import pytest

from sapod import failpoints
from sapod.config import build_config
from sapod.errors import ConfigError
from sapod.store import atomic_write_json, list_node_entries


@pytest.fixture(autouse=True)
def _reset():
    yield
    failpoints.configure("")


def test_parse_and_hit(tmp_path):
    assert failpoints.parse("list=EIO:0.5, write=ENOSPC:1") == {
        "list": [(errno.EIO, 0.5)], "write": [(errno.ENOSPC, 1.0)]}
    for bad in ("list", "list=EIO", "nowhere=EIO:1", "list=ENOTANERRNO:1", "list=EIO:2"):
        with pytest.raises(ValueError):
            failpoints.parse(bad)
    failpoints.configure("list=ENOTCONN:1,write=ENOSPC:1")
    with pytest.raises(OSError) as e:
        list_node_entries(tmp_path)
    assert e.value.errno == errno.ENOTCONN
    with pytest.raises(OSError) as e:
        atomic_write_json(tmp_path / "x.json", {})
    assert e.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())  # nothing half-written
    failpoints.configure("list=EIO:0")
    assert list_node_entries(tmp_path) == {}


def test_bad_spec_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="SAPOD_FAILPOINTS"):
        build_config({"shared": str(tmp_path)}, environ={"SAPOD_FAILPOINTS": "list=EIO"})
    assert build_config({"shared": str(tmp_path)}, environ={}).failpoints == ""


def _swarm(make_cfg, workers=2, **over):
    from sapod.coordinator import Coordinator
    from sapod.worker import Worker

    nodes = [Coordinator(make_cfg("coordinator", "coord", **over))]
    return nodes + [Worker(make_cfg("worker", f"w{i + 1}", **over)) for i in range(workers)]


def test_swarm_rides_out_failing_listings_and_writes(make_cfg, capsys, monkeypatch):
    """EIO/ENOTCONN on listings and writes: nodes back off, say so, and finish every round once."""
    from conftest import read_rows, run_nodes
    from sapod import paths, schema
    from sapod.store import read_json

    # At these rates an attempt that makes several listings and writes (the coordinator closing
    # a round) often fails: a streak of 12 failures in one run backed off for up to 58 s and
    # outlasted the time limit below. The 60 s cap is tested on its own (next test); a 2 s cap
    # keeps this one about riding the failures out.
    monkeypatch.setattr("sapod.node.BACKOFF_MAX", 2.0)
    failpoints.configure("list=EIO:0.1,list=ENOTCONN:0.05,write=EIO:0.05", seed=7)
    nodes = _swarm(make_cfg, max_rounds=6)
    assert run_nodes(*nodes, timeout=120) == [None, None, None]
    failpoints.configure("")
    root = nodes[0].root
    for r in range(6):
        tally = schema.parse_tally(read_json(paths.tally_file(root, r, 0)), r, 0)
        assert set(tally.counted) <= {"w1", "w2"} and tally.counted
    for w in ("w1", "w2"):
        rows = read_rows(paths.metrics_file(root, w))
        assert [r["round"] for r in rows] == list(range(6))  # every round trained once
    logged = [__import__("json").loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    errors = [e for e in logged if e.get("event") == "io_error"]
    assert errors and {e["errno"] for e in errors} <= {"EIO", "ENOTCONN"}
    assert all(e["retry_in"] > 0 for e in errors)


def test_trouble_degrades_backs_off_and_recovers(make_cfg):
    """Consecutive failures double the wait (with jitter, capped); success clears the state."""
    import asyncio

    from sapod.node import BACKOFF_MAX
    from sapod.worker import Worker

    node = Worker(make_cfg(poll_interval=0.01))

    async def go():
        waits = []
        for _ in range(4):
            t0 = asyncio.get_running_loop().time()
            await node.io_trouble(OSError(errno.EIO, "Input/output error"), "gather")
            waits.append(asyncio.get_running_loop().time() - t0)
            assert node.status == "degraded"
        node.io_ok()
        return waits

    waits = asyncio.run(go())
    assert node.status == "running" and node._io_failures == 0
    assert 0.004 <= waits[0] < 0.05 and waits[3] >= 0.04  # 0.01 * 2**3 * [0.5, 1]
    assert BACKOFF_MAX == 60.0


def test_failed_checkpoints_keep_the_previous_one_and_are_retried(make_cfg, capsys):
    """ENOSPC while checkpointing: no half-written folder, the last good checkpoint stays,
    training goes on, and the owed checkpoint is taken as soon as writes work again."""
    from conftest import run_nodes
    from sapod.checkpoint import latest_checkpoint, list_checkpoints
    from sapod.worker import Worker

    nodes = _swarm(make_cfg, workers=1, max_rounds=2, checkpoint_interval=1)
    assert run_nodes(*nodes) == [None, None]
    root = nodes[0].root
    assert latest_checkpoint(root, "w1")[0] == 1
    failpoints.configure("checkpoint=ENOSPC:1")
    nodes = _swarm(make_cfg, workers=1, max_rounds=4, checkpoint_interval=1)
    assert run_nodes(*nodes) == [None, None]
    assert isinstance(nodes[1], Worker) and nodes[1].rounds_done == 4 and nodes[1].checkpoint_owed
    assert [r for r, _ in list_checkpoints(root, "w1")] == [0, 1]  # untouched, still complete
    leftovers = [p for p in (root / "checkpoints").rglob("*") if ".tmp-" in p.name]
    assert leftovers == []
    assert "checkpoint_failed" in capsys.readouterr().out
    failpoints.configure("")
    nodes = _swarm(make_cfg, workers=1, max_rounds=5, checkpoint_interval=100)
    assert run_nodes(*nodes) == [None, None]
    assert latest_checkpoint(root, "w1")[0] == 4  # owed, taken after the next round anyway


def test_registration_retries_a_flaky_folder_but_not_a_missing_one(make_cfg, tmp_path):
    """EIO while registering: a few backed-off tries (here the 4th succeeds); a folder
    that is not there, or one that keeps failing, is a failed start (exit 3)."""
    import asyncio

    from sapod import paths
    from sapod.coordinator import Coordinator
    from sapod.errors import StartupError
    from sapod.node import STARTUP_TRIES

    failpoints.configure("write=EIO:0.7", seed=9)  # draws: fail, fail, fail, pass
    node = Coordinator(make_cfg("coordinator", "coord", poll_interval=0.01))
    asyncio.run(node.startup())
    node.watcher.close()
    assert node.status == "running" and paths.peer_file(node.root, "coord").is_file()

    failpoints.configure("write=EIO:1")
    with pytest.raises(StartupError, match="Input/output error"):
        asyncio.run(Coordinator(make_cfg("coordinator", "coord", poll_interval=0.01)).startup())
    assert STARTUP_TRIES > 1
    failpoints.configure("")
    missing = Coordinator(make_cfg("coordinator", "coord", shared=tmp_path / "not-mounted"))
    with pytest.raises(StartupError, match="is not a folder"):
        asyncio.run(missing.startup())


@pytest.mark.parametrize("first", ["coord", "w1"])
def test_errors_between_registering_and_the_first_round_are_retried(make_cfg, monkeypatch, capsys, first):
    """Every write and listing fails for a while right after one node has registered (the
    coordinator's experiment file and takeover; the worker's id check, settings and
    resume): it backs off, says where, and then runs every round, instead of crashing
    or failing to start. (POLL_INTERVAL 0.2 s: the other node's registration tries
    outlast the 0.4 s window.)"""
    import asyncio
    import json

    from conftest import read_rows, run_nodes
    from sapod import paths
    from sapod.node import Node

    register = Node.startup

    async def startup(self):
        await register(self)
        if self.node_id == first:  # from now on, for 0.4 s, nothing goes through
            failpoints.configure("write=EIO:1,list=ENOTCONN:1")
            asyncio.get_running_loop().call_later(0.4, failpoints.configure, "")

    monkeypatch.setattr(Node, "startup", startup)
    nodes = _swarm(make_cfg, workers=1, max_rounds=2, poll_interval=0.2)
    assert run_nodes(*nodes, timeout=60) == [None, None]
    assert [r["round"] for r in read_rows(paths.metrics_file(nodes[0].root, "w1"))] == [0, 1]
    logged = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    where = {e["where"] for e in logged if e.get("event") == "io_error" and e["node"] == first}
    assert where & ({"experiment", "takeover"} if first == "coord" else {"claim_id", "settings"})
