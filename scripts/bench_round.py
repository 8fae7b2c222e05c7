#!/usr/bin/env python3
"""Seconds per round of a real swarm: a coordinator and W workers as processes on a
tmp folder, with the model given (default sapod:tiny), I=2 J=2 G=4, 256 new tokens.

Reports the median round time from the coordinator's round_complete events, the
per-phase breakdown from the workers' metrics.jsonl (generate, gather wait, train,
checkpoint, other), and the coordinator's peak resident memory (VmHWM). Round 0
(model loading, registration) is left out. Prints a table, then one JSON line.

    python scripts/bench_round.py --model /path/to/model --rounds 10
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sapod import paths
from sapod.progress import read_jsonl

PHASES = ("t_generate", "t_gather", "t_train", "t_checkpoint")


def peak_rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def run(args: argparse.Namespace, shared: Path) -> dict:
    env = {**os.environ, "GDRIVE_PATH": str(shared), "EXPERIMENT_NAME": "bench", "MODEL_NAME": args.model,
           "MAX_ROUNDS": str(args.rounds + 1), "NUM_TRAIN_SAMPLES": "2", "NUM_TRANSPLANT_TREES": "2",
           "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": str(args.max_new_tokens), "CHECKPOINT_INTERVAL": "5",
           "LOG_FORMAT": "json", "LOG_LEVEL": "warning", "LOG_TO_SHARED": "false", "HEARTBEAT_INTERVAL": "5",
           "GATHER_TIMEOUT": "300", "ROUND_TIMEOUT": "900"}
    if args.cache_dir:
        env["SAPOD_CACHE"] = args.cache_dir
    cmd = [sys.executable, "-m", "sapod"]
    coord = subprocess.Popen(cmd + ["--role", "coordinator", "--node-id", "coord"], env=env)
    workers = [subprocess.Popen(cmd + ["--role", "worker", "--node-id", f"w{i}"], env=env)
               for i in range(args.workers)]
    peak = 0.0
    while coord.poll() is None:
        peak = max(peak, peak_rss_mb(coord.pid))
        time.sleep(0.2)
    codes = [coord.returncode] + [w.wait() for w in workers]
    if any(codes):
        raise SystemExit(f"a node failed: exit codes {codes}")
    root = paths.experiment_root(shared, "bench")
    events = [e for e in read_jsonl(paths.progress_file(root, "coord")) if e.get("event") == "round_complete"][1:]
    rows = [r for i in range(args.workers) for r in read_jsonl(paths.metrics_file(root, f"w{i}")) if r["round"] > 0]
    breakdown = {k: statistics.mean(r[k] for r in rows) for k in PHASES}
    breakdown["other"] = statistics.mean(r["t_round"] for r in rows) - sum(breakdown.values())
    return {"model": args.model, "workers": args.workers, "rounds": len(events),
            "max_new_tokens": args.max_new_tokens, "round_s_median": statistics.median(e["seconds"] for e in events),
            "worker_round_s_mean": statistics.mean(r["t_round"] for r in rows), "breakdown_s": breakdown,
            "tokens_generated_mean": statistics.mean(r["tokens_generated"] for r in rows),
            "coordinator_peak_rss_mb": peak}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="sapod:tiny", help="MODEL_NAME: sapod:tiny, a local folder, a hub id")
    ap.add_argument("--workers", type=int, default=2, help="worker processes [2]")
    ap.add_argument("--rounds", type=int, default=10, help="timed rounds (one more runs first) [10]")
    ap.add_argument("--max-new-tokens", type=int, default=256, help="[256]")
    ap.add_argument("--cache-dir", help="SAPOD_CACHE for sapod:tiny")
    ap.add_argument("--json", type=Path, help="also write the result here")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="sapod-round-") as tmp:
        r = run(args, Path(tmp))
    print(f"model {r['model']}, {r['workers']} workers, {r['rounds']} rounds, {r['max_new_tokens']} new tokens")
    print(f"round (coordinator, open to advance): median {r['round_s_median']:.2f} s")
    print(f"worker round: mean {r['worker_round_s_mean']:.2f} s = " + ", ".join(
        f"{k.removeprefix('t_')} {v:.2f}" for k, v in r["breakdown_s"].items()))
    print(f"coordinator peak RSS: {r['coordinator_peak_rss_mb']:.0f} MB")
    if args.json:
        args.json.write_text(json.dumps(r, indent=2))
    print(json.dumps(r))
    return 0


if __name__ == "__main__":
    sys.exit(main())
