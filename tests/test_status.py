"""`sapod status`: rows per node from peers/, liveness from moving beats, metrics tails."""

from __future__ import annotations

import json
import time

import pytest

from sapod import paths
from sapod.cli import main
from sapod.status import collect_status, read_tail

from conftest import beating, read_rows, write_peer


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """A finished demo swarm: a coordinator and two workers, six rounds."""
    shared = tmp_path_factory.mktemp("status")
    assert main(["demo", "--model", "sapod:scripted", "--workers", "2", "--rounds", "6", "--shared", str(shared)]) == 0
    return shared, paths.experiment_root(shared, "demo")


def test_rows_per_node_with_rounds_and_reward(demo):
    """Each node has a row; rounds and cumulative reward match the last metrics row; finished is not alive."""
    _, root = demo
    status = collect_status(root)
    nodes = {n["node"]: n for n in status["nodes"]}
    assert list(nodes) == ["coordinator", "worker-1", "worker-2"]
    assert status["max_rounds"] == 6 and status["state"]["status"] == "finished"
    for node in nodes.values():
        assert node["round"] == 5 and node["rounds_done"] == 6
        assert not node["alive"] and node["liveness"] == "finished"
        assert node["eta_s"] == 0.0
    for worker in ("worker-1", "worker-2"):
        last = read_rows(paths.metrics_file(root, worker))[-1]
        assert nodes[worker]["cumulative_reward"] == pytest.approx(last["cumulative_reward"])
        assert nodes[worker]["rounds_per_hour"] > 0


def test_json_output_parses(demo, capsys):
    """`sapod status --json` prints one JSON object with a row per node."""
    shared, _ = demo
    capsys.readouterr()
    assert main(["status", "--shared", str(shared), "--experiment", "demo", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [n["node"] for n in doc["nodes"]] == ["coordinator", "worker-1", "worker-2"]
    assert all(n["liveness"] == "finished" for n in doc["nodes"])


def test_table_output_names_every_node(demo, capsys):
    """The plain output is a table with the state line and one finished row per node."""
    shared, _ = demo
    capsys.readouterr()
    assert main(["status", "--shared", str(shared), "--experiment", "demo"]) == 0
    out = capsys.readouterr().out
    assert "state: finished  round 5 (6/6 done)" in out
    rows = [line for line in out.splitlines() if line.startswith(("coordinator", "worker-"))]
    assert len(rows) == 3 and all("finished" in r and "alive" not in r for r in rows)


def test_moving_heartbeat_is_alive_and_frozen_one_dead(tmp_path, capsys):
    """A node whose beat moves shows alive with an age; a running node whose beat stands still shows dead."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w2", 7)
    with beating(root, "w1"):
        assert main(["status", "--shared", str(tmp_path), "--experiment", "e", "--json",
                     "--heartbeat-interval", "0.3", "--peer-timeout", "2"]) == 0
    nodes = {n["node"]: n for n in json.loads(capsys.readouterr().out)["nodes"]}
    assert nodes["w1"]["alive"] and nodes["w1"]["liveness"] == "alive"
    assert nodes["w1"]["heartbeat_age_s"] is not None and nodes["w1"]["heartbeat_age_s"] < 1.0
    assert not nodes["w2"]["alive"] and nodes["w2"]["liveness"] == "dead" and nodes["w2"]["heartbeat_age_s"] is None


def test_missing_experiment_exits_1(tmp_path, capsys):
    """A missing experiment folder exits 1 with a one-line message."""
    assert main(["status", "--shared", str(tmp_path), "--experiment", "nope"]) == 1
    err = capsys.readouterr().err
    assert "no experiment folder" in err and len(err.strip().splitlines()) == 1


def test_watch_stops_cleanly_on_ctrl_c(demo, capsys, monkeypatch):
    """`--watch` draws, then Ctrl-C during the wait exits 0."""
    shared, _ = demo

    def interrupt(_seconds):
        raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", interrupt)
    capsys.readouterr()
    assert main(["status", "--shared", str(shared), "--experiment", "demo", "--watch", "1"]) == 0
    assert capsys.readouterr().out.count("experiment demo") == 1


def test_read_tail_reads_only_the_end(tmp_path):
    """Only complete rows in the last bytes are read; the row cut by the seek is dropped."""
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"round": r, "pad": "x" * 100}) + "\n" for r in range(2000)) + '{"round": 20')
    rows = read_tail(path, max_bytes=4096)
    assert rows and rows[-1]["round"] == 1999
    assert [r["round"] for r in rows] == list(range(rows[0]["round"], 2000))
    assert len(rows) < 40
