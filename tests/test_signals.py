"""Stopping real `sapod` processes (torch-free scripted policy): the signals a user sends,
and a log reader that goes away first (`sapod ... | tee` in tmux, a restarted shipper)."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sapod import paths
from sapod.logs import append_jsonl
from sapod.store import read_json


def _env(shared: Path, **over) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_", "NUM_", "MAX_", "WATCH_"))}
    env.update(GDRIVE_PATH=str(shared), EXPERIMENT_NAME="sig", MODEL_NAME="sapod:scripted", MAX_ROUNDS="100000",
               HEARTBEAT_INTERVAL="0.3", PEER_TIMEOUT="20", POLL_INTERVAL="0.2", CHECKPOINT_INTERVAL="100000",
               LOG_LEVEL="info", LOG_FORMAT="json", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in over.items()})
    return env


def _start(role: str, node_id: str, env: dict[str, str], stdout) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "sapod", "--role", role, "--node-id", node_id],
                            env=env, stdout=stdout, stderr=subprocess.STDOUT)


def _until_training(root: Path, node_id: str, rounds: int = 3, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    metrics = paths.metrics_file(root, node_id)
    while time.monotonic() < deadline:
        if metrics.exists() and len(metrics.read_bytes().splitlines()) >= rounds:
            return
        time.sleep(0.1)
    pytest.fail(f"{node_id} did not train {rounds} rounds")


def _stopped_cleanly(proc: subprocess.Popen, root: Path, node_id: str) -> None:
    assert proc.wait(30) == 0
    peer = read_json(paths.peer_file(root, node_id))
    assert peer["status"] == "stopped"
    assert paths.checkpoints_dir(root).is_dir() and any(paths.checkpoints_dir(root).glob(f"round_*/{node_id}"))


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_stop_lands_after_the_log_reader_is_gone(tmp_path, sig):
    """The reader of the worker's stdout dies first (Ctrl-C in a tmux pane reaches tee
    too): the stop must still be taken, checkpointed and exit 0, not lost to a write
    error in the signal handler or end the node without its checkpoint."""
    shared = tmp_path / "shared"
    shared.mkdir()
    env, root = _env(shared), shared / "experiments" / "sig"
    with open(tmp_path / "coord.out", "wb") as out:
        coord = _start("coordinator", "coord", env, out)
    reader = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    worker = _start("worker", "w1", env, reader.stdin)
    reader.stdin.close()  # the worker holds the pipe's only write end now
    try:
        _until_training(root, "w1")
        reader.kill()
        reader.wait(10)
        time.sleep(0.5)  # the worker logs on (a phase line a round) into the broken pipe
        assert worker.poll() is None, "the worker ended when its log reader went away"
        worker.send_signal(sig)
        _stopped_cleanly(worker, root, "w1")
    finally:
        for p in (worker, coord, reader):
            if p.poll() is None:
                p.kill()
        coord.wait(30)


def test_sighup_stops_a_node_cleanly(tmp_path):
    """A closed terminal or `tmux kill-session` sends SIGHUP: a stop like SIGTERM's."""
    shared = tmp_path / "shared"
    shared.mkdir()
    env, root = _env(shared), shared / "experiments" / "sig"
    with open(tmp_path / "coord.out", "wb") as c_out, open(tmp_path / "w1.out", "wb") as w_out:
        coord = _start("coordinator", "coord", env, c_out)
        worker = _start("worker", "w1", env, w_out)
    try:
        _until_training(root, "w1")
        worker.send_signal(signal.SIGHUP)
        _stopped_cleanly(worker, root, "w1")
        lines = [json.loads(x) for x in (tmp_path / "w1.out").read_text().splitlines()]
        assert any(e.get("event") == "stop_requested" and e.get("signal") == "SIGHUP" for e in lines)
    finally:
        for p in (worker, coord):
            if p.poll() is None:
                p.kill()
        coord.wait(30)


def test_non_finite_numbers_cost_neither_the_record_nor_its_batch(tmp_path):
    """An overflowed gradient norm (inf, nan) in a metrics row: strict JSON has no such
    numbers, and the row went unwritten with every row after it in the batch."""
    path = tmp_path / "metrics.jsonl"
    rows = [{"round": 0, "grad_norm": 1.5}, {"round": 1, "grad_norm": math.inf, "x": [math.nan, 2.0]},
            {"round": 2, "loss": -math.inf}]
    assert append_jsonl(path, rows)
    got = [json.loads(line) for line in path.read_text().splitlines()]
    assert got == [{"round": 0, "grad_norm": 1.5}, {"round": 1, "grad_norm": None, "x": [None, 2.0]},
                   {"round": 2, "loss": None}]


def test_a_log_stream_whose_reader_is_gone_goes_quiet_and_other_errors_cost_one_line():
    from sapod.logs import _LogStream

    read_end, write_end = os.pipe()
    stream = os.fdopen(write_end, "w", buffering=1)
    log = _LogStream(stream)
    log.write("first\n")
    assert os.read(read_end, 100) == b"first\n"
    os.close(read_end)  # the reader dies
    log.write("into a broken pipe\n")  # EPIPE: not raised, and the descriptor now goes to /dev/null
    log.write("and on\n")
    log.flush()
    assert os.readlink(f"/proc/self/fd/{stream.fileno()}") == os.devnull
    stream.close()

    class Full:
        def write(self, text):
            raise OSError(28, "No space left on device")

        def fileno(self):
            raise AssertionError("a full disk is not a reader gone: the stream is kept")

    _LogStream(Full()).write("lost, and only this line\n")
