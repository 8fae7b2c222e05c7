"""`sapod status`: rows per node from peers/, liveness from moving beats, metrics tails."""

from __future__ import annotations

import errno
import json
import time

import pytest

import sapod.peers
from sapod import paths
from sapod.cli import main
from sapod.status import collect_status, format_status, read_tail

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


# -- a shared folder that misbehaves --------------------------------------------------

def _break_listing(monkeypatch, fails):
    """Listing peers/ raises EIO, as on a throttled Drive/FUSE mount, on the calls where
    ``fails(n)`` (n counts from 1) is true. Returns the calls made."""
    real, calls = sapod.peers.list_node_entries, []

    def listing(directory):
        calls.append(directory)
        if fails(len(calls)):
            raise OSError(errno.EIO, "Input/output error", str(directory))
        return real(directory)

    monkeypatch.setattr(sapod.peers, "list_node_entries", listing)
    return calls


def test_one_shot_status_exits_1_on_a_listing_error(tmp_path, capsys, monkeypatch):
    """peers/ that cannot be listed for the whole window: one line on stderr naming it, exit 1, no traceback."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w1", 3)
    calls = _break_listing(monkeypatch, lambda n: True)
    capsys.readouterr()
    assert main(["status", "--shared", str(tmp_path), "--experiment", "e", "--heartbeat-interval", "0.2"]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sapod status: ")
    assert "peers/: cannot list: Input/output error" in err[0]
    assert len(calls) > 1  # retried within the heartbeat window before giving up


def test_one_shot_status_retries_a_passing_listing_error(tmp_path, capsys, monkeypatch):
    """One EIO on peers/ is retried within the window: the table comes out and the exit is 0."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w1", 3)
    _break_listing(monkeypatch, lambda n: n == 1)
    capsys.readouterr()
    assert main(["status", "--shared", str(tmp_path), "--experiment", "e", "--heartbeat-interval", "0.2",
                 "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert [n["node"] for n in doc["nodes"]] == ["w1"] and doc["error"] is None


def test_watch_shows_a_listing_error_and_keeps_watching(tmp_path, capsys, monkeypatch):
    """`--watch` draws the listing error on a line and goes on; the next draw, once peers/ lists again,
    has the node and no error line."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w1", 3)
    broken = [True]
    _break_listing(monkeypatch, lambda n: broken[0])
    waits = []

    def between_draws(seconds):
        waits.append(seconds)
        if len(waits) == 1:
            broken[0] = False  # the mount recovers
        else:
            raise KeyboardInterrupt

    monkeypatch.setattr(time, "sleep", between_draws)
    capsys.readouterr()
    assert main(["status", "--shared", str(tmp_path), "--experiment", "e", "--watch", "1",
                 "--heartbeat-interval", "0.2"]) == 0
    out = capsys.readouterr().out
    first, second = out.split("experiment e ")[1:]
    assert "peers/: cannot list: Input/output error, retrying" in first
    assert "cannot list" not in second
    assert any(line.startswith("w1 ") for line in second.splitlines())


ODD_TAILS = [  # (name, odd row as JSONL text, whether it is still a usable row)
    ("reward_mean null", '{"round": 1, "reward_mean": null}', False),
    ("reward_mean huge int", '{"round": 1, "reward_mean": 1%s}' % ("0" * 400), False),
    ("round null", '{"round": null, "reward_mean": 0.5}', False),
    ("round string", '{"round": "x", "reward_mean": 0.5}', False),
    ("round huge int", '{"round": 1%s, "reward_mean": 0.5, "ts": 200.0}' % ("0" * 400), False),
    ("round negative", '{"round": -3, "reward_mean": 0.5}', False),
    ("ts huge int", '{"round": 1, "reward_mean": 0.5, "ts": 1%s}' % ("0" * 400), True),
    ("cumulative huge int", '{"round": 1, "reward_mean": 0.5, "ts": 200.0, "cumulative_reward": 1%s}' % ("0" * 400),
     True),
    ("cumulative dict", '{"round": 1, "reward_mean": 0.5, "ts": 200.0, "cumulative_reward": {}}', True),
]


@pytest.mark.parametrize("odd,kept", [c[1:] for c in ODD_TAILS], ids=[c[0] for c in ODD_TAILS])
def test_status_skips_odd_metrics_rows(tmp_path, odd, kept):
    """A metrics row that is not well-formed (integer round, finite reward_mean) is skipped; an odd
    number elsewhere in a good row reads as no value. Nothing raises."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w1", 3)
    path = paths.metrics_file(root, "w1")
    path.parent.mkdir(parents=True)
    path.write_text('{"round": 0, "reward_mean": 0.25, "ts": 100.0, "cumulative_reward": 0.25}\n' + odd + "\n")
    node = collect_status(root, window=0.0)["nodes"][0]
    assert node["rounds_done"] == (2 if kept else 1)
    assert node["last_reward"] == (0.5 if kept else 0.25)
    assert node["cumulative_reward"] == (None if kept else 0.25)
    assert node["rounds_per_hour"] is None or node["rounds_per_hour"] == pytest.approx(36.0)


def test_eta_only_for_nodes_that_are_alive(demo, tmp_path):
    """A node that is stopped, or whose heartbeat stands still (dead), gets no ETA even with rounds
    left and a rate in its metrics: it is not training, so nothing will finish. A live node with
    the same metrics gets one; the table shows '-' for none."""
    _, finished = demo
    root = paths.experiment_root(tmp_path, "e")
    root.mkdir(parents=True)
    paths.experiment_file(root).write_bytes(paths.experiment_file(finished).read_bytes())  # max_rounds 6
    rows = "".join(json.dumps({"round": r, "reward_mean": 0.5, "ts": 100.0 + 60 * r}) + "\n" for r in range(3))
    for node in ("w-alive", "w-dead", "w-stopped"):
        path = paths.metrics_file(root, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(rows)
    write_peer(root, "w-dead", 4)
    write_peer(root, "w-stopped", 4, status="stopped")
    with beating(root, "w-alive"):
        status = collect_status(root, window=1.0, heartbeat_interval=0.3, peer_timeout=5.0)
    nodes = {n["node"]: n for n in status["nodes"]}
    assert {n: v["liveness"] for n, v in nodes.items()} == {"w-alive": "alive", "w-dead": "dead",
                                                            "w-stopped": "stopped"}
    for node in nodes.values():
        assert node["rounds_done"] == 3 and node["rounds_per_hour"] == pytest.approx(60.0)
    assert nodes["w-alive"]["eta_s"] == pytest.approx(3 * 60.0)  # 3 rounds left at a round a minute
    assert nodes["w-dead"]["eta_s"] is None and nodes["w-stopped"]["eta_s"] is None
    table = {line.split()[0]: line.split()[-1] for line in format_status(status).splitlines()
             if line.startswith("w-")}
    assert table == {"w-alive": "3m00s", "w-dead": "-", "w-stopped": "-"}
