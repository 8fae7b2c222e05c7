"""Real `sapod` processes on a tmp shared folder with the embedded sapod:tiny model."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import read_rows
from sapod import paths, schema
from sapod.checkpoint import latest_checkpoint
from sapod.store import read_json

pytestmark = pytest.mark.slow

EASY_TASKS = "basic_arithmetic,base_conversion,calendar_arithmetic,fraction_simplification"


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """One sapod:tiny build for the whole session (SAPOD_CACHE if set, as in CI)."""
    from sapod.policy.tiny import ensure_tiny

    cache = Path(os.environ.get("SAPOD_CACHE") or tmp_path_factory.mktemp("cache"))
    ensure_tiny(cache)
    return cache


def node_env(shared: Path, cache: Path, **over) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NODE_", "NUM_", "MAX_", "WATCH_"))}
    env.update(GDRIVE_PATH=str(shared), EXPERIMENT_NAME="it", SAPOD_CACHE=str(cache), MODEL_NAME="sapod:tiny",
               MAX_ROUNDS="3", MAX_NEW_TOKENS="24", NUM_TRAIN_SAMPLES="2", NUM_TRANSPLANT_TREES="2",
               NUM_GENERATIONS="4", LEARNING_RATE="1e-3", TASKS=EASY_TASKS, HEARTBEAT_INTERVAL="0.5",
               PEER_TIMEOUT="20", POLL_INTERVAL="0.3", GATHER_TIMEOUT="60", ROUND_TIMEOUT="120",
               LOG_LEVEL="info", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.update({k: str(v) for k, v in over.items()})
    return env


def start(role: str, node_id: str, env: dict[str, str], logdir: Path) -> subprocess.Popen:
    out = open(logdir / f"{node_id}.out", "wb")
    err = open(logdir / f"{node_id}.err", "wb")
    return subprocess.Popen([sys.executable, "-m", "sapod", "--role", role, "--node-id", node_id],
                            env=env, stdout=out, stderr=err)


def wait_all(procs: dict[str, subprocess.Popen], logdir: Path, timeout: float = 240) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    codes = {}
    for name, p in procs.items():
        try:
            codes[name] = p.wait(max(1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs.values():
                q.kill()
            pytest.fail(f"{name} did not finish; stderr: {(logdir / f'{name}.err').read_text()[-2000:]}")
    return codes


def stdout_events(logdir: Path, node: str) -> list[dict]:
    lines = (logdir / f"{node}.out").read_text().splitlines()
    return [json.loads(line) for line in lines]  # every line must be JSON


def tiny_weights(cache: Path) -> bytes:
    return next(cache.glob("tiny-v*/model.safetensors")).read_bytes()


def run_swarm(tmp_path: Path, cache: Path, **over) -> tuple[Path, Path]:
    shared, logdir = tmp_path / "shared", tmp_path / "logs"
    shared.mkdir()
    logdir.mkdir()
    env = node_env(shared, cache, **over)
    procs = {"coord": start("coordinator", "coord", env, logdir)}
    procs.update({w: start("worker", w, env, logdir) for w in ("w1", "w2")})
    codes = wait_all(procs, logdir)
    assert codes == {"coord": 0, "w1": 0, "w2": 0}, {n: (logdir / f"{n}.err").read_text()[-1500:] for n in codes}
    return shared / "experiments" / "it", logdir


def check_finished_swarm(root: Path, logdir: Path, cache: Path) -> None:
    state = schema.parse_state(read_json(paths.state_file(root)))
    assert state.status == "finished" and state.round == 2
    for w in ("w1", "w2"):
        for r in range(3):
            schema.parse_rollouts(read_json(paths.rollout_file(root, r, 0, w), 1 << 24), w, r, 0)
            schema.parse_submission(read_json(paths.reward_file(root, r, 0, w)), w, r, 0)
        rows = read_rows(paths.metrics_file(root, w))
        assert [r["round"] for r in rows] == [0, 1, 2]
        assert all(r["tokens_generated"] > 0 and r["t_round"] > 0 for r in rows)
        events = stdout_events(logdir, w)
        assert all(e.get("node") == w for e in events)
        assert any(e["event"] == "round_done" and e.get("round") == 2 for e in events)
        _, ckpt = latest_checkpoint(root, w)
        from transformers import AutoModelForCausalLM

        AutoModelForCausalLM.from_pretrained(ckpt)  # save_pretrained form
        assert (ckpt / "model.safetensors").read_bytes() != tiny_weights(cache), "weights did not change"
    stdout_events(logdir, "coord")


def test_tiny_swarm_with_inotify(tmp_path, tiny_cache):
    """Coordinator + two workers as processes train sapod:tiny for 3 rounds; contract files and logs check out."""
    root, logdir = run_swarm(tmp_path, tiny_cache, WATCH_MODE="inotify")
    check_finished_swarm(root, logdir, tiny_cache)


def test_tiny_swarm_polling(tmp_path, tiny_cache):
    """The same swarm with WATCH_MODE=poll (no file events at all) finishes the same way."""
    root, logdir = run_swarm(tmp_path, tiny_cache, WATCH_MODE="poll")
    check_finished_swarm(root, logdir, tiny_cache)
    assert any(e.get("watch") == "poll" for e in stdout_events(logdir, "w1"))


def adam_step(ckpt: Path) -> float:
    import torch

    state = torch.load(ckpt / "optimizer.pt", weights_only=True)["state"]
    return max(float(s["step"]) for s in state.values())


def test_sigterm_checkpoints_and_restart_resumes(tmp_path, tiny_cache):
    """SIGTERM mid-run: exit 0 with a complete checkpoint; the restarted worker continues round and optimizer."""
    shared, logdir = tmp_path / "shared", tmp_path / "logs"
    shared.mkdir()
    logdir.mkdir()
    # enough rounds that the worker is still mid-run when the signal lands (a round takes a fraction of a second)
    env = node_env(shared, tiny_cache, MAX_ROUNDS="30", CHECKPOINT_INTERVAL="100", NUM_TRANSPLANT_TREES="0")
    root = shared / "experiments" / "it"
    coord = start("coordinator", "coord", env, logdir)
    worker = start("worker", "w1", env, logdir)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        rows = read_rows(paths.metrics_file(root, "w1")) if paths.metrics_file(root, "w1").exists() else []
        if len(rows) >= 2:
            break
        time.sleep(0.2)
    else:
        pytest.fail("worker made no progress")
    worker.send_signal(signal.SIGTERM)
    assert worker.wait(60) == 0
    found = latest_checkpoint(root, "w1")
    assert found is not None, "no checkpoint after SIGTERM"
    stopped_round, ckpt = found
    counters = json.loads((ckpt / "counters.json").read_text())
    step_before = adam_step(ckpt)
    assert counters["rounds_done"] == stopped_round + 1
    peer = schema.parse_peer(read_json(paths.peer_file(root, "w1")), "w1")
    assert peer.status == "stopped"

    worker = start("worker", "w1", env, logdir)
    assert worker.wait(180) == 0 and coord.wait(60) == 0
    rows = read_rows(paths.metrics_file(root, "w1"))
    rounds = [r["round"] for r in rows]
    assert rounds == sorted(set(rounds)) and rounds[-1] == 29, rounds
    assert rows[-1]["cumulative_reward"] == pytest.approx(sum(r["reward_mean"] for r in rows))
    _, final = latest_checkpoint(root, "w1")
    assert json.loads((final / "counters.json").read_text())["rounds_done"] == len(rows)
    assert adam_step(final) >= step_before
    resumed = [e for e in stdout_events(logdir, "w1") if e["event"] == "resumed"]
    assert resumed and resumed[0]["round"] == stopped_round


def test_local_gpt2_directory_trains(tmp_path, tiny_cache):
    """MODEL_NAME pointing at a local GPT-2 folder saved by transformers (not the embedded name) trains."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = tmp_path / "gpt2-local"
    source = next(tiny_cache.glob("tiny-v*"))
    AutoModelForCausalLM.from_pretrained(source).save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(source).save_pretrained(model_dir)
    before = (model_dir / "model.safetensors").read_bytes()
    shared, logdir = tmp_path / "shared", tmp_path / "logs"
    shared.mkdir()
    logdir.mkdir()
    env = node_env(shared, tiny_cache, MODEL_NAME=str(model_dir), MAX_ROUNDS="2", NUM_TRANSPLANT_TREES="0",
                   NUM_GENERATIONS="8")
    procs = {"coord": start("coordinator", "coord", env, logdir), "w1": start("worker", "w1", env, logdir)}
    assert wait_all(procs, logdir) == {"coord": 0, "w1": 0}
    root = shared / "experiments" / "it"
    rows = read_rows(paths.metrics_file(root, "w1"))
    assert len(rows) == 2 and sum(r["tokens_trained"] for r in rows) > 0
    _, ckpt = latest_checkpoint(root, "w1")
    assert json.loads((ckpt / "config.json").read_text())["model_type"] == "gpt2"
    assert (ckpt / "model.safetensors").read_bytes() != before, "weights did not change"
    assert (model_dir / "model.safetensors").read_bytes() == before  # the source folder is never written
