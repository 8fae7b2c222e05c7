"""The command line around a node: check, demo, logging context across the GPU thread."""

from __future__ import annotations

import asyncio
import io
import json
import threading

import pytest
import structlog

from conftest import beating, write_peer
from sapod import paths
from sapod.cli import main
from sapod.executor import run_on_gpu
from sapod.logs import configure_logging, get_logger


def check_args(tmp_path, node="w1"):
    return ["check", "--shared", str(tmp_path), "--experiment", "e", "--node-id", node, "--heartbeat-interval", "0.3"]


def test_check_healthy_when_beat_moves(tmp_path, capsys):
    """`sapod check` exits 0 when the node's beat counter changes within two heartbeats."""
    with beating(paths.experiment_root(tmp_path, "e"), "w1"):
        assert main(check_args(tmp_path)) == 0
    assert capsys.readouterr().out.startswith("healthy: w1: alive")


def test_check_unhealthy_when_beat_stands_still(tmp_path, capsys):
    """`sapod check` exits 1 for a frozen heartbeat, a stopped node and a missing node."""
    root = paths.experiment_root(tmp_path, "e")
    write_peer(root, "w1", 5)
    assert main(check_args(tmp_path)) == 1
    assert "has not moved" in capsys.readouterr().out
    write_peer(root, "w2", 5, status="stopped")
    assert main(check_args(tmp_path, "w2")) == 1
    assert "stopped" in capsys.readouterr().out
    assert main(check_args(tmp_path, "w3")) == 1
    assert "no heartbeat file" in capsys.readouterr().out


def test_check_looks_again_when_the_first_read_is_torn(tmp_path, capsys):
    """A heartbeat file caught mid-replace (torn, as some network mounts show it) at the
    first look is read again; a live node is not reported unreadable or missing."""
    import time

    root = paths.experiment_root(tmp_path, "e")
    path = paths.peer_file(root, "w1")
    path.parent.mkdir(parents=True)
    path.write_text('{"schema": ')
    done = threading.Event()

    def node_that_beats_soon():
        time.sleep(0.1)
        with beating(root, "w1"):
            done.wait(10)

    t = threading.Thread(target=node_that_beats_soon)
    t.start()
    try:
        assert main(check_args(tmp_path)) == 0
    finally:
        done.set()
        t.join()
    assert capsys.readouterr().out.startswith("healthy: w1: alive")


def test_gpu_thread_lines_carry_the_node_context():
    """A line logged on the GPU thread carries node, round and stage bound on the loop."""
    out = io.StringIO()
    out.isatty = lambda: False
    configure_logging("json", "info", stream=out)

    def on_gpu():
        get_logger().info("from_gpu", thread=threading.current_thread().name)

    async def go():
        structlog.contextvars.bind_contextvars(node="w9", role="worker", round=4, stage=0)
        await run_on_gpu(on_gpu)

    try:
        asyncio.run(go())
    finally:
        configure_logging("json", "warning")
    line = json.loads(out.getvalue().splitlines()[-1])
    assert line["event"] == "from_gpu" and line["thread"].startswith("sapod-gpu")
    assert (line["node"], line["role"], line["round"], line["stage"]) == ("w9", "worker", 4, 0)


def test_demo_with_scripted_policy(tmp_path, capsys):
    """`sapod demo` runs a coordinator and workers, prints each round and a summary table."""
    code = main(["demo", "--model", "sapod:scripted", "--workers", "3", "--rounds", "3", "--shared", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    assert [line.split()[1] for line in out.splitlines() if line.startswith("round ")] == ["1/3", "2/3", "3/3"]
    table = [line.split() for line in out.splitlines() if line.startswith("worker-")]
    assert [row[0] for row in table] == ["worker-1", "worker-2", "worker-3"]
    assert all(row[1] == "3" for row in table)
    assert "finished in" in out and "files under" in out
    assert (paths.experiment_root(tmp_path, "demo") / "experiment.json").is_file()


def test_demo_shared_that_is_a_file_exits_2_with_one_line(tmp_path, capsys):
    """`sapod demo --shared FILE` says why in one line (exit 2), and its help does not claim GDRIVE_PATH."""
    (tmp_path / "file").write_text("x")
    assert main(["demo", "--model", "sapod:scripted", "--shared", str(tmp_path / "file")]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and "--shared" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    shared_help = capsys.readouterr().out.split("\n  --shared DIR", 1)[1].split("\n  --", 1)[0]
    assert "temporary folder" in shared_help and "GDRIVE_PATH" not in shared_help


def test_unusable_shared_folder_exits_3(tmp_path, capsys):
    """A shared folder that does not exist (drive not mounted) is a failed start: exit 3."""
    code = main(["--role", "worker", "--shared", str(tmp_path / "not-mounted"), "--model", "sapod:scripted",
                 "--log-format", "json"])
    out = capsys.readouterr().out
    assert code == 3 and "not a folder" in out
    stopped = [json.loads(x) for x in out.splitlines() if '"node_stopped"' in x]
    assert [x["status"] for x in stopped] == ["never_started"]


def test_a_coordinator_refuses_tasks_the_workers_could_not_use(tmp_path, capsys):
    """TASKS is recorded for the whole swarm by a new run's coordinator: one the workers could not
    use (an unknown task, an empty task file) is exit 2 there, before experiment.json is written
    (it would have left every worker failing at start, and the swarm waiting for ever)."""
    (tmp_path / "empty.jsonl").write_text("")
    for tasks, says in (("basic_arithmetic,nope", "unknown reasoning-gym task(s): nope"),
                        (str(tmp_path / "empty.jsonl"), "is empty")):
        code = main(["--role", "coordinator", "--shared", str(tmp_path), "--tasks", tasks, "--log-format", "json",
                     "--experiment", "e"])
        lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
        bad = [x["reason"] for x in lines if x["event"] == "bad_setting"]
        assert code == 2 and len(bad) == 1 and bad[0].startswith(f"TASKS={tasks!r}: ") and says in bad[0]
        assert not (tmp_path / "experiments" / "e" / "experiment.json").exists()


def test_unknown_model_exits_3(tmp_path, capsys):
    """A model that cannot load is a failed start (exit 3) that names the model, before any waiting."""
    code = main(["--role", "worker", "--shared", str(tmp_path), "--model", "sapod:huge", "--log-format", "json"])
    assert code == 3
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    failed = [x for x in lines if x["event"] == "startup_failed"]
    assert failed and "sapod:huge" in failed[0]["reason"]


def test_second_signal_exits_at_once(make_cfg, monkeypatch):
    """The first SIGTERM asks for a graceful stop; a second one while stopping exits at once with 1."""
    import os
    import signal

    from sapod import daemon

    exits = []
    monkeypatch.setattr(daemon.os, "_exit", exits.append)
    cfg = make_cfg("coordinator", "c1", max_rounds=5)

    async def go():
        task = asyncio.ensure_future(daemon.serve(cfg))
        await asyncio.sleep(0.5)  # the coordinator is waiting for workers
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)
        return await asyncio.wait_for(task, 10)

    code = asyncio.run(go())
    assert exits == [daemon.EXIT_CRASH]
    assert code == 0  # with os._exit patched out, the graceful path completes


def test_prompt_uses_chat_template_when_the_tokenizer_has_one():
    """format_prompt applies a tokenizer's chat template, and a plain template otherwise."""
    from sapod.prompts import format_prompt

    class Plain:
        chat_template = None

    class Chat:
        chat_template = "x"

        def apply_chat_template(self, messages, tokenize, add_generation_prompt):
            assert not tokenize and add_generation_prompt
            return "|".join(f"{m['role']}:{m['content']}" for m in messages) + "|assistant:"

    assert format_prompt(Plain(), "2+2?", "SYS") == "SYS\n\nQuestion: 2+2?\nAnswer:"
    assert format_prompt(Chat(), "2+2?", "SYS") == "system:SYS|user:2+2?|assistant:"
