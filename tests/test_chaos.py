"""The chaos harness in its short configuration: real processes, every fault but lag,
then the lag mode alone. The long configuration is a documented command (README)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"


def _run(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "figures.json"
    env = {**os.environ, "PYTHONPATH": str(SCRIPTS.parent)}
    proc = subprocess.run([sys.executable, str(SCRIPTS / "chaos.py"), "--json", str(out),
                           "--cache-dir", str(tmp_path / "cache"), *args],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    assert result["violations"] == []
    return result["figures"]


@pytest.mark.slow
def test_short_chaos_run_keeps_every_invariant(tmp_path):
    f = _run(tmp_path, "--short", "--workers", "4")
    assert f["rounds"] == 30 and f["unplanned_exits"] == 0
    assert f["submissions_lost"] == 0 and f["counted_twice"] == 0 and f["state_went_backwards"] == 0
    injected = f["faults_injected"]
    for fault in ("kill-worker", "kill-coordinator", "stop-worker", "duplicate-id", "second-coordinator",
                  "dead-worker"):
        assert injected.get(fault, 0) >= 1, fault
    assert f["hostile_payloads"] >= 100
    assert (f["hostile_rejected_with_reason"] + f["hostile_never_sampled"] + f["hostile_landed_late"]
            == f["hostile_payloads"])
    assert f["hostile_rejected_when_read"] >= 10  # rollouts files are read when drawn from, and refused then
    assert f["hostile_landed_late"] <= f["hostile_payloads"] // 10  # nearly all land before their round
    assert f["io_errors_logged"] > 0 and f["checkpoints_loadable"] == "4/4"
    assert f["dead_worker_max_round_s"] <= f["dead_worker_bound_s"]


@pytest.mark.slow
def test_lag_mode_keeps_advancing_and_sharing(tmp_path):
    f = _run(tmp_path, "--faults", "lag,hostile", "--workers", "3", "--rounds", "12", "--payloads-per-round", "3")
    assert f["rounds"] == 12 and f["replication"]["deliveries"] > 0
    assert all(share > 0 for share in f["rounds_with_external_groups"].values())


def test_unknown_fault_is_a_usage_error(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPTS / "chaos.py"), "--faults", "meteor"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "unknown fault 'meteor'" in proc.stderr
