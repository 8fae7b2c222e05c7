#!/usr/bin/env python3
"""A long run: is a sapod swarm as fast, and its process as small, at round 3000 as at round 30?

A coordinator and N workers with the zero-compute scripted policy in this process (as
in bench_coordination.py: inotify, a generated file of sums as tasks, checkpoints every
CHECKPOINT_INTERVAL rounds as a node makes them by default) run R rounds while a thread
samples the process's resident memory, open file descriptors and threads every half
second. Prints, for each tenth of the run, its rounds' p50 and p95 (open to advance on
the coordinator's clock) and the memory, descriptors and threads at its end; then the
shared folder's file count and size, and one JSON line.

Growth from one tenth to the next that does not level off is a leak; round times that
climb mean work that grows with the rounds run. ``--cleanup`` turns on the
coordinator's housekeeping of old rounds (ROLLOUT_CLEANUP_ENABLED) to show the folder
staying bounded too.

    python scripts/bench_long_run.py --nodes 8 --rounds 3000
    python scripts/bench_long_run.py --nodes 8 --rounds 3000 --cleanup
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

from bench_coordination import Run, emit, percentile, run_swarm, sums_file
from sapod import paths
from sapod.logs import configure_logging
from sapod.progress import read_jsonl


def rss_mb() -> float:
    """This process's resident memory in MiB (Linux /proc)."""
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Sampler(threading.Thread):
    """(wall-clock time, RSS MiB, open descriptors, threads) every ``every`` seconds."""

    def __init__(self, every: float = 0.5):
        super().__init__(name="bench-sampler", daemon=True)
        self.every = every
        self.samples: list[tuple[float, float, int, int]] = []
        self.done = threading.Event()

    def run(self) -> None:
        while True:
            self.samples.append((time.time(), rss_mb(), len(os.listdir("/proc/self/fd")), threading.active_count()))
            if self.done.wait(self.every):
                return

    def at(self, ts: float) -> tuple[float, float, int, int]:
        """The last sample taken at or before ``ts`` (the first one if none was)."""
        before = [s for s in self.samples if s[0] <= ts]
        return before[-1] if before else self.samples[0]


def folder_size(folder: Path) -> tuple[int, int]:
    files = size = 0
    for base, _, names in os.walk(folder):
        for name in names:
            try:
                size += os.stat(os.path.join(base, name)).st_size
                files += 1
            except OSError:
                pass
    return files, size


def long_run(n: int, rounds: int, cleanup: bool, where: str | None, tenths: int = 10) -> dict:
    options = {"checkpoint_interval": "10"}
    if cleanup:
        options.update(rollout_cleanup_enabled="true", rollout_keep_last_n_rounds="10")
    run = Run(rounds, "inotify", 0.5, sums_file(), options=tuple(options.items()))
    sampler = Sampler()
    sampler.start()
    with tempfile.TemporaryDirectory(prefix="sapod-long-", dir=where) as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir()
        wall, _ = run_swarm(shared, n, run)
        sampler.done.set()
        sampler.join()
        root = paths.experiment_root(shared, "bench")
        events = [e for e in read_jsonl(paths.progress_file(root, "coord")) if e.get("event") == "round_complete"]
        files, size = folder_size(shared)
    done = events[1:]  # round 0 includes start-up
    bounds = [len(done) * k // tenths for k in range(tenths + 1)]
    rows = []
    for lo, hi in zip(bounds, bounds[1:]):
        part = done[lo:hi]
        secs = [float(e["seconds"]) for e in part]
        _, rss, fds, threads = sampler.at(float(part[-1]["ts"]))
        rows.append({"rounds": [int(part[0]["round"]), int(part[-1]["round"])],
                     "p50_ms": 1000 * statistics.median(secs), "p95_ms": 1000 * percentile(secs, 0.95),
                     "rss_mb": rss, "fds": fds, "threads": threads})
    return {"nodes": n, "rounds": rounds, "cleanup": cleanup, "wall_s": wall, "tenths": rows,
            "peak_rss_mb": max(s[1] for s in sampler.samples), "folder_files": files, "folder_bytes": size}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=8, help="workers (a coordinator runs beside them) [8]")
    ap.add_argument("--rounds", type=int, default=2000, help="rounds to run [2000]")
    ap.add_argument("--cleanup", action="store_true", help="ROLLOUT_CLEANUP_ENABLED=true, keeping 10 rounds")
    ap.add_argument("--dir", help="where the shared folder is made [the system temp folder]")
    ap.add_argument("--json", type=Path, help="also write the result to this file")
    args = ap.parse_args()
    if args.rounds < 11:
        ap.error("--rounds must be at least 11 (a tenth of the run needs a round)")
    configure_logging("json", "warning", stream=sys.stderr)
    r = long_run(args.nodes, args.rounds, args.cleanup, args.dir)
    print(f"{args.nodes} workers, {args.rounds} rounds, cleanup {'on' if args.cleanup else 'off'}: "
          f"{r['wall_s']:.0f} s")
    print(f"{'rounds':>13}{'p50 ms':>9}{'p95 ms':>9}{'RSS MiB':>9}{'fds':>6}{'threads':>9}")
    for t in r["tenths"]:
        print(f"{t['rounds'][0]:>6}-{t['rounds'][1]:<6}{t['p50_ms']:>9.1f}{t['p95_ms']:>9.1f}{t['rss_mb']:>9.1f}"
              f"{t['fds']:>6}{t['threads']:>9}")
    print(f"peak RSS {r['peak_rss_mb']:.1f} MiB; shared folder at the end: {r['folder_files']} files, "
          f"{r['folder_bytes'] / 2**20:.1f} MiB")
    emit({"benchmark": "long_run", "result": r}, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
