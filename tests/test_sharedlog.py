"""Node output copied into the shared folder: buffered, capped, never in the node's way."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from sapod.sharedlog import SharedLogFile


def test_buffered_until_flushed(tmp_path):
    """Writes reach the file at a flush, not one by one."""
    f = SharedLogFile(tmp_path / "logs" / "stdout.log", max_bytes=1000, flush_interval=3600)
    f.write("a\n")
    f.write("b\n")
    assert not (tmp_path / "logs" / "stdout.log").exists()
    f.close()
    assert (tmp_path / "logs" / "stdout.log").read_text() == "a\nb\n"


def test_capped_with_one_older_copy(tmp_path):
    """At the cap the file moves to .1 and a new one starts; never more than two files."""
    path = tmp_path / "stdout.log"
    f = SharedLogFile(path, max_bytes=100, flush_interval=3600)
    for i in range(10):
        f.write(f"line {i:02d} " + "x" * 30 + "\n")
        f.flush()
    f.close()
    assert sorted(os.listdir(tmp_path)) == ["stdout.log", "stdout.log.1"]
    assert path.stat().st_size <= 100 and (tmp_path / "stdout.log.1").stat().st_size <= 100
    assert "line 09" in path.read_text()


def test_unwritable_folder_is_not_fatal(tmp_path):
    """A shared folder that fails (here: a file where the folder should be) only counts an error."""
    (tmp_path / "logs").write_text("not a folder")
    f = SharedLogFile(tmp_path / "logs" / "stdout.log", max_bytes=100, flush_interval=3600)
    f.write("x\n")
    f.close()
    assert f.errors == 1


def test_node_process_logs_land_in_the_shared_folder(tmp_path):
    """A real node's stdout (its JSON log) is also in logs/{node}/stdout.log; LOG_TO_SHARED=false turns it off."""
    env = {**os.environ, "GDRIVE_PATH": str(tmp_path), "MODEL_NAME": "sapod:scripted", "LOG_FORMAT": "json"}
    code = ("import os, signal, threading; from sapod.cli import main; "
            "threading.Timer(1.0, lambda: os.kill(os.getpid(), signal.SIGTERM)).start(); "
            "raise SystemExit(main(['--role', 'coordinator', '--node-id', 'c1']))")
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    copy = tmp_path / "experiments" / "sapod" / "logs" / "c1" / "stdout.log"
    lines = copy.read_text().splitlines()
    assert lines == res.stdout.splitlines()
    assert json.loads(lines[-1])["event"] == "node_stopped"
    assert (copy.parent / "stderr.log").exists() or res.stderr == ""
    res = subprocess.run([sys.executable, "-c", code.replace("'c1'", "'c2'")], env={**env, "LOG_TO_SHARED": "false"},
                         capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and not (copy.parent.parent / "c2" / "stdout.log").exists()


def test_output_written_while_the_folder_fails_is_kept_for_the_next_flush(tmp_path):
    """A failed flush keeps its lines (up to MAX_BUFFER) and writes them once the folder is back."""
    logs = tmp_path / "logs"
    logs.write_text("the mount is down")
    f = SharedLogFile(logs / "stdout.log", max_bytes=1000, flush_interval=3600)
    f.write("during 1\n")
    f.flush()
    f.write("during 2\n")
    f.flush()
    logs.unlink()
    f.write("after\n")
    f.close()
    assert f.errors == 2
    assert (logs / "stdout.log").read_text() == "during 1\nduring 2\nafter\n"
