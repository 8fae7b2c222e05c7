"""The helper scripts users run: a tmux swarm on one box; the coordination benchmark."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


@pytest.mark.skipif(shutil.which("tmux") is None, reason="tmux not installed")
def test_tmux_swarm_runs_to_the_end(tmp_path):
    """tmux-swarm.sh starts a coordinator and N workers in windows; they finish and log to files."""
    shared = tmp_path / "shared"
    shared.mkdir()
    session = f"sapod-test-{os.getpid()}"
    env = {**os.environ, "GDRIVE_PATH": str(shared), "MODEL_NAME": "sapod:scripted", "MAX_ROUNDS": "3",
           "HEARTBEAT_INTERVAL": "0.3", "POLL_INTERVAL": "0.2", "EXPERIMENT_NAME": "tm",
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    subprocess.run([str(SCRIPTS / "tmux-swarm.sh"), "-n", "2", "-s", session, "-l", str(tmp_path / "logs")],
                   env=env, check=True, capture_output=True)
    state = shared / "experiments" / "tm" / "state" / "current_state.json"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if state.exists() and json.loads(state.read_text())["status"] == "finished":
                break
            time.sleep(0.3)
        else:
            pytest.fail("the tmux swarm did not finish")
        windows = subprocess.run(["tmux", "list-windows", "-t", session, "-F", "#{window_name}"],
                                 capture_output=True, text=True, check=True).stdout.split()
        assert windows == ["coordinator", "w1", "w2"]
        logs = [tmp_path / "logs" / f"{node}.log" for node in ("coordinator", "w1", "w2")]
        deadline = time.monotonic() + 20  # each node logs its last line as it exits, in no set order
        while time.monotonic() < deadline and not all("node_stopped" in f.read_text() for f in logs):
            time.sleep(0.2)
        for node in ("coordinator", "w1", "w2"):
            lines = (tmp_path / "logs" / f"{node}.log").read_text().splitlines()
            assert json.loads(lines[-1])["event"] == "node_stopped"
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)


def test_tmux_swarm_refuses_bad_input(tmp_path):
    """Without GDRIVE_PATH, or with a bad -n, the script stops with a message."""
    env = {k: v for k, v in os.environ.items() if k != "GDRIVE_PATH"}
    res = subprocess.run([str(SCRIPTS / "tmux-swarm.sh")], env=env, capture_output=True, text=True)
    assert res.returncode != 0 and "GDRIVE_PATH" in res.stderr
    res = subprocess.run([str(SCRIPTS / "tmux-swarm.sh"), "-n", "x"], env={**env, "GDRIVE_PATH": str(tmp_path)},
                         capture_output=True, text=True)
    assert res.returncode == 2 and "-n must be" in res.stderr


def test_tmux_swarm_passes_variables_when_no_python_sits_beside_sapod(tmp_path):
    """With `sapod` installed where no `python` sits beside it (pip --user, /usr/local/bin), the
    nodes still get GDRIVE_PATH and the other sapod variables (a running tmux server lacks them)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sapod").write_text(f"#!{sys.executable}\nfrom sapod.cli import entry\nentry()\n")
    # tmux: no session yet, and creating one succeeds
    (bin_dir / "tmux").write_text("#!/bin/sh\n[ \"$1\" = has-session ] && exit 1\nexit 0\n")
    for name in ("sapod", "tmux"):
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path), "GDRIVE_PATH": str(tmp_path / "shared"),
           "MODEL_NAME": "sapod:scripted"}
    res = subprocess.run([str(SCRIPTS / "tmux-swarm.sh"), "-l", str(tmp_path / "logs")], env=env, cwd=tmp_path,
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
    exported = (tmp_path / "logs" / ".env.sh").read_text()
    assert f"export GDRIVE_PATH={tmp_path / 'shared'}" in exported and "export MODEL_NAME=sapod:scripted" in exported


def test_bench_coordination_in_one_and_in_several_processes(tmp_path):
    """The coordination benchmark runs a real swarm both ways and reports its figures
    (counts of shared-folder operations, per-round overhead); no timing assertions."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_coordination.py"), "--nodes", "2", "--rounds", "4",
                           "--modes", "inotify", "--processes", "1,2", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["processes"], r["nodes"], r["rounds"]) for r in results] == [(1, 2, 4), (2, 2, 4)]
    for r in results:
        ops = r["per_node_round"]
        # every node-round publishes its rollouts and its submission; each worker reads its peer's rollouts
        assert ops["files_written"] >= 2 and ops["reads"] >= 1 and ops["appends"] >= 3
        assert 0 < r["overhead_p50_ms"] <= r["overhead_p95_ms"]
        assert 0 < r["cpu_ms_per_round"] < math.inf  # a round costs CPU, also with workers in children
    assert json.loads(proc.stdout.strip().splitlines()[-1])["results"] == results


def test_bench_coordination_compares_task_sets(tmp_path):
    """--tasks default --tasks file runs the same swarm on each task set, side by side, and the
    generated file of sums is a task file sapod loads."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_coordination.py"), "--nodes", "2", "--rounds", "3",
                           "--modes", "inotify", "--tasks", "default", "--tasks", "file", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [r["tasks"] for r in results][0] == "default" and results[1]["tasks"].endswith(".jsonl")
    from sapod.tasks import FileSource, make_task_source

    source = make_task_source(results[1]["tasks"])
    assert isinstance(source, FileSource) and len(source) == 2000
    item = source.sample(1, seed=0)[0]
    a, b = map(int, re.fullmatch(r"What is (\d+) \+ (\d+)\?", item.question).groups())
    assert item.answer == str(a + b)
    assert all(r["per_node_round"]["files_written"] >= 2 for r in results)
    table = proc.stdout.splitlines()
    assert any(line.startswith("default ") for line in table) and any(line.startswith("file ") for line in table)


def test_bench_coordination_models_a_network_mount(tmp_path):
    """--read-latency makes every file read wait first and the nodes treat the folder as remote;
    --read-concurrency 1,4 runs the same swarm reading one file at a time and four at once."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_coordination.py"), "--nodes", "3", "--rounds", "3",
                           "--modes", "poll", "--poll-interval", "0.2", "--tasks", "file", "--read-latency", "20",
                           "--read-concurrency", "1,4", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(out.read_text())["results"]
    assert [(r["read_latency_ms"], r["read_concurrency"]) for r in results] == [(20.0, 1), (20.0, 4)]
    # a round cannot close before the coordinator has read a submission, which now waits 20 ms
    assert all(r["overhead_p50_ms"] >= 20 for r in results)
    assert all(line.split()[3] in ("1x", "4x") for line in proc.stdout.splitlines()[1:3])


def test_bench_coordination_models_slow_appends(tmp_path):
    """--append-latency alone makes every JSONL append wait first, on a folder treated as
    remote; the round does not wait for the appends, so records still all land."""
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_coordination.py"), "--nodes", "2", "--rounds", "3",
                           "--modes", "inotify", "--tasks", "file", "--append-latency", "200", "--json", str(out)],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    (r,) = json.loads(out.read_text())["results"]
    assert (r["append_latency_ms"], r["read_latency_ms"]) == (200.0, 0.0)
    assert proc.stdout.splitlines()[1].split()[3] == "8x"  # remote: reads several at a time
    assert r["rounds"] == 3 and r["per_node_round"]["appends"] > 0
    assert r["overhead_p50_ms"] < 200  # a round waits for no append


def test_bench_long_run_reports_each_tenth_and_cleanup_bounds_the_folder(tmp_path):
    """bench_long_run.py reports every tenth of the run (rounds in order, none twice) with the
    process's memory, descriptors and threads; --cleanup leaves fewer files in the folder."""
    folders = {}
    for cleanup in (False, True):
        out = tmp_path / f"long-{cleanup}.json"
        proc = subprocess.run([sys.executable, str(SCRIPTS / "bench_long_run.py"), "--nodes", "2", "--rounds", "31",
                               "--dir", str(tmp_path), "--json", str(out)] + (["--cleanup"] if cleanup else []),
                              capture_output=True, text=True, timeout=300, cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr[-2000:]
        r = json.loads(out.read_text())["result"]
        assert r["cleanup"] is cleanup and len(r["tenths"]) == 10
        spans = [t["rounds"] for t in r["tenths"]]
        assert spans[0][0] == 1 and spans[-1][1] == 30
        assert all(a[1] + 1 == b[0] for a, b in zip(spans, spans[1:]))
        assert all(t["rss_mb"] > 10 and t["fds"] >= 3 and t["threads"] >= 2 and t["p50_ms"] > 0 for t in r["tenths"])
        assert r["peak_rss_mb"] >= max(t["rss_mb"] for t in r["tenths"])
        folders[cleanup] = r["folder_files"]
        assert "peak RSS" in proc.stdout
    assert 0 < folders[True] < folders[False]
    bad = subprocess.run([sys.executable, str(SCRIPTS / "bench_long_run.py"), "--rounds", "5"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert bad.returncode == 2 and "at least 11" in bad.stderr
