#!/usr/bin/env python3
"""Coordination overhead of a sapod swarm: N nodes with the zero-compute scripted
policy in one process, on a local folder, with inotify and with polling.

For each (mode, N) it runs a coordinator and N workers for R rounds and reports
the per-round overhead (open to advance, on the coordinator's clock; round 0,
which includes start-up, is left out) p50 / p95, rounds per second, the CPU time
the swarm's processes spend per round (all their threads), and the
shared-folder operations per node-round (files written, JSONL appends, reads,
listings: each costs an API call on Drive). Prints a table, then one JSON line.

All nodes share one event loop, one GPU thread, four publish threads and the
machine's cores, so a round's time here is roughly N times one node's cost; on a real swarm each node has
its own. Reads and listings are counted as each node would make them alone: nodes
in one process share parsed peer files and, with inotify, folder listings
("reads_in_process" and "listings_in_process" in the JSON).
``--processes P`` deals the workers out to P child processes and leaves the
coordinator alone in this one, for machines with cores to spare.

``--read-latency MS`` models a network mount (Drive, NFS): every file read waits MS
milliseconds first, and the nodes treat the folder as remote (file work in threads,
several reads in flight, ``--read-concurrency`` of them; 1 reads one file at a time).
``--append-latency MS`` makes every JSONL record append wait MS milliseconds first (on
a Drive mount an append can mean uploading the file again).

    python scripts/bench_coordination.py --nodes 2,8,32,128 --rounds 30
    python scripts/bench_coordination.py --nodes 8,128 --modes inotify --processes 1,2
    python scripts/bench_coordination.py --nodes 8,32 --modes poll --read-latency 100 --read-concurrency 1,8
    python scripts/bench_coordination.py --nodes 8 --modes poll,inotify --read-latency 100 --append-latency 300
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import multiprocessing
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from bisect import bisect_left
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from sapod import logs, node, paths, store
from sapod.config import Config, build_config
from sapod.coordinator import Coordinator
from sapod.daemon import run_loop
from sapod.logs import configure_logging
from sapod.progress import read_jsonl
from sapod.store import IO, READ_CONCURRENCY
from sapod.worker import Worker


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


@dataclass(frozen=True)
class Run:
    """What one (mode, N) measurement runs: the same for every node of it."""

    rounds: int
    mode: str
    poll: float
    tasks: str = ""  # TASKS: "" for the nine default reasoning-gym tasks, a mix, or a task file
    read_latency: float = 0.0  # seconds each file read waits first (a network mount's round trip)
    read_concurrency: int = READ_CONCURRENCY
    options: tuple[tuple[str, str], ...] = ()  # further settings for every node, (option, value)
    append_latency: float = 0.0  # seconds each JSONL append waits first (on Drive: the file uploaded again)


@contextlib.contextmanager
def mount_model(run: Run):
    """With a read or append latency: every file read (JSONL append) waits it out first,
    and nodes see a remote folder (file work in threads, reads several at a time).
    Otherwise nothing changes."""
    if run.read_latency <= 0 and run.append_latency <= 0:
        yield
        return
    real_read, real_append, real_remote = store._read_at_most, logs.append_jsonl, node.is_remote

    def slow_read(fd: int, limit: int, size_hint: int) -> bytes:
        time.sleep(run.read_latency)
        return real_read(fd, limit, size_hint)

    def slow_append(path: Path, records: list) -> bool:
        time.sleep(run.append_latency)
        return real_append(path, records)

    store._read_at_most, logs.append_jsonl, node.is_remote = slow_read, slow_append, lambda fstype: True
    store.set_read_concurrency(run.read_concurrency)
    try:
        yield
    finally:
        store._read_at_most, logs.append_jsonl, node.is_remote = real_read, real_append, real_remote
        store.set_read_concurrency(READ_CONCURRENCY)


CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


class CpuClock:
    """CPU seconds used by this process and its worker processes, sampled every ``period``
    seconds on a thread, to tell what the swarm's rounds cost in CPU between two wall-clock
    times (the machine's other load moves the wall-clock figures far more than this)."""

    def __init__(self, period: float = 0.01):
        self.period = period
        self.pids: list[int] = []
        self.samples: list[tuple[float, float]] = []  # (time.time(), CPU seconds so far)
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="bench-cpu", daemon=True)

    def __enter__(self) -> CpuClock:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()
        self._sample()  # after the last round, however short the run

    def _sample(self) -> None:
        self.samples.append((time.time(), time.process_time() + self._children()))

    def _children(self) -> float:
        total = 0.0
        for pid in self.pids:
            try:
                fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS  # utime, stime
            except (OSError, ValueError, IndexError):
                pass  # exited, or no /proc
        return total

    def _run(self) -> None:
        while not self._done.wait(self.period):
            self._sample()

    def between(self, t0: float, t1: float) -> float:
        """CPU seconds used from wall-clock time t0 to t1 (the nearest samples at or after each)."""
        times = [t for t, _ in self.samples]
        i, j = bisect_left(times, t0), bisect_left(times, t1)
        if not self.samples or j >= len(self.samples) or i >= j:
            return float("nan")
        return self.samples[j][1] - self.samples[i][1]


def node_config(shared: Path, role: str, node_id: str, run: Run) -> Config:
    return build_config({
        "shared": str(shared), "experiment": "bench", "model": "sapod:scripted", "max_rounds": str(run.rounds),
        "watch_mode": run.mode, "poll_interval": str(run.poll), "heartbeat_interval": "5", "peer_timeout": "120",
        "gather_timeout": "60", "round_timeout": "300", "checkpoint_interval": str(run.rounds), "tasks": run.tasks,
        "log_level": "warning", "log_to_shared": "false", "role": role, "node_id": node_id, **dict(run.options)}, {})


async def run_nodes(nodes: list) -> float:
    t0 = time.monotonic()
    results = await asyncio.gather(*(node.run() for node in nodes), return_exceptions=True)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} nodes failed: {failed[0]!r}")
    return time.monotonic() - t0


def worker_ids(n: int) -> list[str]:
    return [f"w{i:03d}" for i in range(n)]


def run_workers(shared: str, ids: list[str], run: Run, counts: str) -> None:
    """A child process's share of the workers; its operation counts go to ``counts``."""
    configure_logging("json", "warning", stream=sys.stderr)
    IO.clear()
    with mount_model(run):
        run_loop(run_nodes([Worker(node_config(Path(shared), "worker", i, run)) for i in ids]))
    Path(counts).write_text(json.dumps(dict(IO)))


def run_swarm(shared: Path, n: int, run: Run, processes: int = 1, cpu: CpuClock | None = None) -> tuple[float, dict]:
    """(wall seconds, operation counts). With ``processes`` > 1 the workers are dealt
    out to that many child processes and the coordinator runs here, alone; ``cpu`` is
    told their pids."""
    IO.clear()
    coord = Coordinator(node_config(shared, "coordinator", "coord", run))
    if processes <= 1:
        with mount_model(run):
            wall = run_loop(run_nodes([coord] + [Worker(node_config(shared, "worker", i, run)) for i in worker_ids(n)]))
        return wall, dict(IO)
    ctx = multiprocessing.get_context("spawn")
    shares = [worker_ids(n)[k::processes] for k in range(processes)]
    files = [shared.parent / f"counts-{k}.json" for k in range(processes)]
    children = [ctx.Process(target=run_workers, args=(str(shared), ids, run, str(f)))
                for ids, f in zip(shares, files) if ids]
    for c in children:
        c.start()
        if cpu is not None and c.pid is not None:
            cpu.pids.append(c.pid)
    try:
        with mount_model(run):
            wall = run_loop(run_nodes([coord]))
    finally:
        for c in children:
            c.join()
    if any(c.exitcode != 0 for c in children):
        raise RuntimeError(f"worker processes exited with {[c.exitcode for c in children]}")
    ops = Counter(IO)
    for f in files:
        if f.exists():
            ops.update(json.loads(f.read_text()))
    return wall, dict(ops)


def bench(n: int, run: Run, where: str | None = None, processes: int = 1) -> dict:
    with tempfile.TemporaryDirectory(prefix="sapod-bench-", dir=where) as tmp:
        shared = Path(tmp) / "shared"
        shared.mkdir()
        with CpuClock() as cpu:
            wall, ops = run_swarm(shared, n, run, processes, cpu)
        root = paths.experiment_root(shared, "bench")
        events = [e for e in read_jsonl(paths.progress_file(root, "coord")) if e.get("event") == "round_complete"]
    per_round = [float(e["seconds"]) for e in events[1:]]
    span = float(events[-1]["ts"]) - float(events[0]["ts"]) if len(events) > 1 else wall
    cpu_per_round = (cpu.between(float(events[0]["ts"]), float(events[-1]["ts"])) / (len(events) - 1)
                     if len(events) > 1 else float("nan"))
    node_rounds = n * run.rounds
    return {
        "mode": run.mode, "nodes": n, "rounds": run.rounds, "poll_interval": run.poll, "tasks": run.tasks or "default",
        "folder": where or tempfile.gettempdir(), "processes": processes,
        "read_latency_ms": 1000 * run.read_latency, "read_concurrency": run.read_concurrency,
        "append_latency_ms": 1000 * run.append_latency,
        "overhead_p50_ms": 1000 * statistics.median(per_round), "overhead_p95_ms": 1000 * percentile(per_round, 0.95),
        "rounds_per_s": (len(events) - 1) / span if span > 0 else float("nan"), "wall_s": wall,
        # CPU of every thread of the swarm's processes, per round after the first.
        "cpu_ms_per_round": 1000 * cpu_per_round,
        # Nodes sharing this process read each peer file once between them (a process-wide
        # cache) and share listings that inotify vouches for; "reads" and "listings" count
        # what each node would do running alone, as on a real swarm.
        "per_node_round": {"files_written": ops.get("files_written", 0) / node_rounds,
                           "appends": ops.get("appends", 0) / node_rounds,
                           "reads": (ops.get("reads", 0) + ops.get("cache_hits", 0)) / node_rounds,
                           "reads_in_process": ops.get("reads", 0) / node_rounds,
                           "listings": (ops.get("listings", 0) + ops.get("listings_shared", 0)) / node_rounds,
                           "listings_in_process": ops.get("listings", 0) / node_rounds},
    }


def sums_file(rows: int = 2000) -> str:
    """A task file of ``rows`` two-number sums in the temp folder (its path): trivial items to make and check."""
    rng = random.Random(0)
    path = Path(tempfile.gettempdir()) / f"sapod-bench-sums-{rows}.jsonl"
    lines = []
    for _ in range(rows):
        a, b = rng.randrange(100), rng.randrange(100)
        lines.append(json.dumps({"question": f"What is {a} + {b}?", "answer": str(a + b)}))
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", default="2,8,32,128", help="comma-separated swarm sizes [2,8,32,128]")
    ap.add_argument("--rounds", type=int, default=30, help="rounds per run [30]")
    ap.add_argument("--modes", default="inotify,poll", help="watch modes [inotify,poll]")
    ap.add_argument("--poll-interval", type=float, default=0.5, help="POLL_INTERVAL in seconds [0.5]")
    ap.add_argument("--dir", help="where the shared folder is made (a tmpfs such as /dev/shm separates the "
                                  "protocol's cost from the disk's) [the system temp folder]")
    ap.add_argument("--processes", default="1", help="comma-separated counts of worker processes: 1 runs every "
                                                     "node in this process; P > 1 deals the workers out to P child "
                                                     "processes and runs the coordinator here, alone [1]")
    ap.add_argument("--tasks", action="append", help="TASKS for the nodes; repeat to compare side by side: "
                                                     "'default' (the nine reasoning-gym tasks), a mix, a task "
                                                     "subset, a task file, or 'file': a generated file of sums, "
                                                     "whose items cost next to nothing to make and check, which "
                                                     "leaves the protocol's own cost [default]")
    ap.add_argument("--read-latency", type=float, default=0.0, help="milliseconds every file read waits first, "
                                                                      "on a folder the nodes treat as remote: a "
                                                                      "model of a network mount [0: off]")
    ap.add_argument("--append-latency", type=float, default=0.0,
                    help="milliseconds every JSONL append waits first (on Drive an append can mean uploading the "
                         "file again); the folder is then treated as remote too [0: off]")
    ap.add_argument("--read-concurrency", default=str(READ_CONCURRENCY),
                    help=f"comma-separated counts of reads in flight at once on a remote folder [{READ_CONCURRENCY}]")
    ap.add_argument("--json", type=Path, help="also write the results to this file")
    args = ap.parse_args()
    tasks = ["" if t.strip() == "default" else t for t in (args.tasks or ["default"])]
    if "file" in tasks:
        tasks = [sums_file() if t == "file" else t for t in tasks]
    configure_logging("json", "warning", stream=sys.stderr)
    results = []
    latency, append_latency = args.read_latency / 1000, args.append_latency / 1000
    remote = bool(latency or append_latency)  # the nodes treat the folder as a network mount
    print(f"{'tasks':<12}{'mode':<8}{'procs':>6}{'reads':>6}{'nodes':>6}{'p50 ms':>9}{'p95 ms':>9}{'rounds/s':>10}"
          f"{'cpu ms':>8}"
          f"{'writes':>8}{'appends':>9}{'reads':>8}{'lists':>8}   (per node-round)")
    for task, mode, procs, conc, n in ((t, m, int(k), int(c), int(x)) for t in tasks for m in args.modes.split(",")
                                       for k in args.processes.split(",")
                                       for c in (args.read_concurrency.split(",") if remote else ["1"])
                                       for x in args.nodes.split(",")):
        r = bench(n, Run(args.rounds, mode, args.poll_interval, task, latency, conc, append_latency=append_latency),
                  args.dir, procs)
        results.append(r)
        p = r["per_node_round"]
        label = "file" if r["tasks"].endswith(".jsonl") else r["tasks"][:11]
        at_once = f"{conc}x" if remote else "local"
        print(f"{label:<12}{mode:<8}{procs:>6}{at_once:>6}{n:>6}{r['overhead_p50_ms']:>9.1f}"
              f"{r['overhead_p95_ms']:>9.1f}{r['rounds_per_s']:>10.2f}{r['cpu_ms_per_round']:>8.0f}"
              f"{p['files_written']:>8.2f}{p['appends']:>9.2f}"
              f"{p['reads']:>8.1f}{p['listings']:>8.1f}", flush=True)
    emit({"benchmark": "coordination", "results": results}, args.json)
    return 0


def emit(out: dict, path: Path | None) -> None:
    """The results as one JSON line on stdout, and indented in ``path`` if given."""
    if path:
        path.write_text(json.dumps(out, indent=2))
    print(json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
