#!/usr/bin/env python3
"""Chaos harness: a real swarm (a coordinator and N worker processes) on a tmp folder
for R rounds while faults are injected on a schedule; then the invariants are checked
from the files and the processes. Prints a table of figures and one JSON line; exits 1
on any violation.

Faults (``--faults all`` or a comma list): kill-worker, kill-coordinator, stop-worker,
duplicate-id, second-coordinator, hostile (torn / huge / NaN / forged / conflict
copies / symlinks / ... files, see chaos_payloads.py), enospc (a full checkpoint disk:
a small tmpfs when run as root, plus failpoints), eio (EIO / ENOTCONN on listings and
writes, via SAPOD_FAILPOINTS), dead-worker (one worker killed for good near the end;
every later round must close within ROUND_TIMEOUT + 2 POLL_INTERVAL), lag (every node
sees the folder through its own replica, synced late, out of order, with gaps and
conflict copies by chaos_lag.py; nodes poll).

    python scripts/chaos.py --short                          # the CI configuration
    python scripts/chaos.py --workers 4 --rounds 200          # all faults but lag
    python scripts/chaos.py --workers 4 --rounds 100 --faults all,lag
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench_round import peak_rss_mb
from chaos_checks import check_run
from chaos_payloads import PayloadMaker

from sapod import paths
from sapod.errors import Rejected
from sapod.schema import parse_state
from sapod.store import read_json
from sapod.tasks import make_task_source

ROTATION = ("kill-worker", "kill-coordinator", "stop-worker", "duplicate-id", "second-coordinator", "enospc")
ALL = ROTATION + ("hostile", "eio", "dead-worker")
EXPERIMENT = "chaos"
TIMING = {"HEARTBEAT_INTERVAL": 0.3, "PEER_TIMEOUT": 2.0, "POLL_INTERVAL": 0.2, "GATHER_TIMEOUT": 2.0,
          "ROUND_TIMEOUT": 4.0, "STOP_TIMEOUT": 5.0}
TASKS = "basic_arithmetic,base_conversion,binary_matrix"


class Proc:
    def __init__(self, node_id: str, role: str, popen: subprocess.Popen, log: Path, tag: str):
        self.node_id, self.role, self.popen, self.log, self.tag = node_id, role, popen, log, tag
        self.planned: set[int] = {0}  # exit codes that are no violation
        self.stopped = False
        self.reported = False  # its unplanned exit is already among the violations
        self.peak_rss = 0.0
        self.spawned = time.monotonic()


class Harness:
    def __init__(self, args: argparse.Namespace, base: Path):
        self.args, self.base = args, base
        self.faults = set(args.faults)
        self.rng = random.Random(args.seed)
        self.procs: list[Proc] = []
        self.timers: list[tuple[float, Callable[[], None]]] = []
        self.counts: dict[str, int] = {}
        self.violations: list[str] = []
        self.coord: Proc | None = None
        self.coord_n = 0
        self.spawns = 0
        self.notes: dict[str, Any] = {"twin_exit_s": [], "dead_rounds": [], "state_backwards": 0}
        self.replicator = None
        self.views: dict[str, Path] = {}
        takeovers = args.rounds // max(1, args.every * len(ROTATION)) + 2  # second coordinators, at most
        ids = ["coord"] + [f"coord{i}" for i in range(2, takeovers + 2)] + [f"w{i + 1}" for i in range(args.workers)]
        if "lag" in self.faults:
            from chaos_lag import Replicator

            self.views = {n: base / "replicas" / n for n in ids}
            for v in self.views.values():
                v.mkdir(parents=True)
            self.replicator = Replicator(self.views, seed=args.seed, exclude=(
                "experiments/*/checkpoints/*", "experiments/*/logs/*", "experiments/*/progress_*"))
        else:
            shared = base / "shared"
            shared.mkdir()
            self.views = {n: shared for n in ids}
        self.mounted: Path | None = None
        self.ballast: Path | None = None
        self.last_order = (0, 0)
        self.clean_coordinator = False
        self.injected = 0  # rotation faults injected so far: the next one is ROTATION[injected % n]
        self.next_fault_round = 2
        self.next_hostile_round = 3
        self.dead_started = False
        self.busy: set[str] = set()  # node ids with a fault in progress

    # -- processes ------------------------------------------------------------------
    def root(self, node: str) -> Path:
        return paths.experiment_root(self.views[node], EXPERIMENT)

    def env(self, node: str, role: str) -> dict[str, str]:
        a = self.args
        env = {**os.environ, "GDRIVE_PATH": str(self.views[node]), "EXPERIMENT_NAME": EXPERIMENT, "NODE_ID": node,
               "NODE_ROLE": role, "MODEL_NAME": a.model, "MAX_ROUNDS": str(a.rounds), "NUM_TRAIN_SAMPLES": "2",
               "NUM_TRANSPLANT_TREES": "2", "NUM_GENERATIONS": "4", "MAX_NEW_TOKENS": "32", "TASKS": TASKS,
               "SEED": str(a.seed), "CHECKPOINT_INTERVAL": "3", "CHECKPOINT_KEEP": "2", "LOG_FORMAT": "json",
               "LOG_LEVEL": "info", "LOG_TO_SHARED": "false", "SAPOD_CACHE": str(a.cache_dir),
               "WATCH_MODE": "poll" if "lag" in self.faults else "inotify",
               **{k: str(v) for k, v in TIMING.items()}}
        if "lag" in self.faults:  # replicas arrive up to 1.5 s late, per hop
            env.update(PEER_TIMEOUT="6", GATHER_TIMEOUT="4", ROUND_TIMEOUT="10")
        fps = []
        if "eio" in self.faults and not (role == "coordinator" and self.clean_coordinator):
            fps += ["list=EIO:0.02", "list=ENOTCONN:0.01", "write=EIO:0.005"]
        if "enospc" in self.faults and role == "worker":
            fps += ["checkpoint=ENOSPC:0.1"]
        if fps:
            env["SAPOD_FAILPOINTS"] = ",".join(fps)
        return env

    def spawn(self, node: str, role: str, tag: str = "") -> Proc:
        self.spawns += 1
        log = self.base / "logs" / f"{self.spawns:04d}-{node}{tag}.log"
        log.parent.mkdir(exist_ok=True)
        with open(log, "wb") as out:
            popen = subprocess.Popen([sys.executable, "-m", "sapod"], env=self.env(node, role), stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        p = Proc(node, role, popen, log, tag)
        self.procs.append(p)
        return p

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        self.timers.append((time.monotonic() + delay, fn))

    def count(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1

    def running(self, role: str) -> list[Proc]:
        return [p for p in self.procs if p.role == role and p.popen.poll() is None and not p.stopped
                and p.tag == ""]

    def kill(self, p: Proc, sig: int = signal.SIGKILL) -> None:
        if p.popen.poll() is None:
            p.planned.add(-sig)
            p.popen.send_signal(sig)

    # -- faults -----------------------------------------------------------------------
    def inject(self, fault: str) -> bool:
        """Injects one fault now (or on a short timer); False when it cannot be (no node free).

        A node with a fault still in progress (a kill or restart pending, stopped, a twin
        deciding) is not picked again until that fault is over: a twin whose original the
        harness kills or stops meanwhile would rightly carry on, which is not the fault meant."""
        workers = [w for w in self.running("worker")
                   if w.node_id != self.notes.get("dead") and w.node_id not in self.busy]
        if fault == "kill-worker" and workers:
            w = self.rng.choice(workers)
            self.busy.add(w.node_id)
            self.later(self.rng.uniform(0, 0.6), lambda: (self.kill(w), self.later(
                self.rng.uniform(0.5, 2.0), lambda: self._restart_worker(w))))
        elif fault == "kill-coordinator" and self.coord is not None and self.coord.node_id not in self.busy:
            c = self.coord
            self.busy.add(c.node_id)
            self.later(self.rng.uniform(0, 0.4), lambda: (self.kill(c), self.later(
                self.rng.uniform(0.3, 1.5), lambda: self._restart_coordinator(c))))
        elif fault == "stop-worker" and workers:
            w = self.rng.choice(workers)
            w.stopped = True
            self.busy.add(w.node_id)
            w.popen.send_signal(signal.SIGSTOP)
            self.later(TIMING["PEER_TIMEOUT"] + self.rng.uniform(0.5, 2.0), lambda: self._resume(w))
        elif fault == "duplicate-id" and workers:
            w = self.rng.choice(workers)
            twin = self.spawn(w.node_id, "worker", tag="-twin")
            twin.planned = {4}
            w.planned.add(4)  # either of the two may be the one that steps down
            self.busy.add(w.node_id)  # until one of them has surely stepped down
            self.later(10 * TIMING["HEARTBEAT_INTERVAL"], lambda: self.busy.discard(w.node_id))
        elif fault == "second-coordinator" and self.coord is not None and self.coord.node_id not in self.busy:
            self.coord.planned.add(4)
            self.coord_n += 1
            self._new_coordinator(f"coord{self.coord_n + 1}")
        elif fault == "enospc":
            self._toggle_ballast()
        else:
            return False
        self.count(fault)
        return True

    def _new_coordinator(self, node: str) -> None:
        self.coord = self.spawn(node, "coordinator")

    def _restart_worker(self, w: Proc) -> None:
        """The restart after a kill, unless the dead phase has meanwhile made it the dead worker."""
        if w.node_id != self.notes.get("dead"):
            self.spawn(w.node_id, "worker")
        self.busy.discard(w.node_id)

    def _restart_coordinator(self, c: Proc) -> None:
        """The restart after a kill, unless another coordinator replaced the killed one meanwhile
        (the dead phase does): two daemons with one NODE_ID would be the harness's doing."""
        if self.coord is c:
            self._new_coordinator(c.node_id)
        self.busy.discard(c.node_id)

    def _resume(self, w: Proc) -> None:
        if w.popen.poll() is None:
            w.popen.send_signal(signal.SIGCONT)
        w.stopped = False
        self.busy.discard(w.node_id)

    def _toggle_ballast(self) -> None:
        """Fill the checkpoint disk (a tmpfs) to leave less than a checkpoint's headroom, or empty it."""
        if self.mounted is None:
            return
        if self.ballast is not None:
            self.ballast.unlink(missing_ok=True)
            self.ballast = None
            return
        self.ballast = self.mounted / ".ballast"
        free = os.statvfs(self.mounted).f_bavail * os.statvfs(self.mounted).f_frsize
        with open(self.ballast, "wb") as fh:
            try:
                fh.write(b"\0" * max(0, free - 256 * 1024))
            except OSError:
                pass

    def mount_checkpoint_disk(self) -> str:
        if "enospc" not in self.faults or "lag" in self.faults:
            return "failpoints only"
        target = paths.checkpoints_dir(self.root("coord"))
        target.mkdir(parents=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(target)], capture_output=True)
        if r.returncode != 0:
            return "failpoints only (no privileges to mount a small disk)"
        self.mounted = target
        return "16 MiB tmpfs + failpoints"

    def hostile(self, maker: PayloadMaker, r: int, payloads: list, until: int) -> None:
        """Batches of hostile files, one per round, written a few rounds ahead of the open one:
        every reader must still be before its gather when they land (in lag mode they also
        need time to reach the other replicas)."""
        real = [f"w{i + 1}" for i in range(self.args.workers)]
        # Into a running worker's view (links and folders do not replicate, and workers read
        # rollouts), one with no fault in progress where there is one.
        running = [w.node_id for w in self.running("worker") if w.node_id != self.notes.get("dead")]
        readers = [n for n in running if n not in self.busy] or running
        if not readers:
            return
        # The round is read again here: a fault injected just before may have taken a while.
        fresh = self.state()
        now = max(r, fresh.round if fresh is not None else r)
        # Every round from the third on that has no batch yet and lies 3 to 5 ahead gets one:
        # the harness may not see every round open, but rarely misses three in a row.
        targets = range(max(self.next_hostile_round, now + 3), min(now + 6, until, self.args.rounds))
        if not targets:
            return
        self.next_hostile_round = targets[-1] + 1
        node = self.rng.choice(readers)
        batch = [(t, p) for t in targets for p in maker.batch(self.root(node), t, real, self.args.payloads_per_round)]
        # Rounds of a few milliseconds can still outrun the harness. A worker starts a round only
        # after the coordinator's state names it, so if that state is still before a target
        # now, every reader lists the folder after its files are in place; otherwise they may
        # have landed after the readers were done, and no rejection can be demanded of them.
        after = self.state() or self.state()  # one more look if a takeover was mid-write
        for t, p in batch:
            p.landed_late = after is None or after.round >= t
            payloads.append(p)

    # -- the run --------------------------------------------------------------------
    def state(self) -> Any:
        try:
            doc = read_json(paths.state_file(self.root(self.coord.node_id if self.coord else "coord")))
            return None if doc is None else parse_state(doc)
        except Rejected:
            return None

    def run(self) -> dict[str, Any]:
        a = self.args
        ckpt_disk = self.mount_checkpoint_disk()
        if self.replicator:
            self.replicator.start()
        maker = PayloadMaker(a.seed, make_task_source(TASKS))
        payloads: list = []
        self._new_coordinator("coord")
        for i in range(a.workers):
            self.spawn(f"w{i + 1}", "worker")
        rotation = [f for f in ROTATION if f in self.faults]
        dead_from = a.rounds - max(6, a.rounds // 10) if "dead-worker" in self.faults else a.rounds + 1
        seen_round, t0 = -1, time.monotonic()
        last_progress = time.monotonic()
        while True:
            now = time.monotonic()
            for due, fn in [t for t in self.timers if t[0] <= now]:
                self.timers.remove((due, fn))
                fn()
            st = self.state()
            if st is not None:
                if st.order < self.last_order:
                    self.notes["state_backwards_on_disk"] = self.notes.get("state_backwards_on_disk", 0) + 1
                self.last_order = max(self.last_order, st.order)
                if st.status == "finished":
                    break
                if st.round > seen_round:
                    seen_round, last_progress = st.round, now
                    self.on_round(st.round, maker, payloads, rotation, dead_from)
            for p in list(self.procs):
                if p.popen.poll() is None:
                    p.peak_rss = max(p.peak_rss, peak_rss_mb(p.popen.pid))
                elif self.unplanned(p) and p.role == "worker" and p.tag == "":
                    self.spawn(p.node_id, "worker")  # keep the swarm going
            if now - last_progress > a.stall_s:
                self.violations.append(f"no round advanced for {a.stall_s:.0f} s (stuck at round {seen_round})")
                break
            time.sleep(0.05)
        wall = time.monotonic() - t0
        for _, fn in sorted(self.timers, key=lambda t: t[0]):  # pending restarts / SIGCONTs
            fn()
        self.finish()
        if self.replicator:
            self.replicator.flush(30)
            self.replicator.stop()
        result = check_run(self, payloads, wall, ckpt_disk)
        if self.mounted is not None:
            subprocess.run(["umount", "-l", str(self.mounted)], capture_output=True)
        return result

    def on_round(self, r: int, maker: PayloadMaker, payloads: list, rotation: list[str], dead_from: int) -> None:
        """Called once per newly observed round. The harness may miss rounds (a busy machine,
        a state file caught mid-takeover), so faults are paced by thresholds, not by exact
        round numbers: every fault of the rotation comes in turn, one every `every` rounds."""
        if r >= dead_from and not self.dead_started:
            self.dead_started = True
            self.start_dead_phase()  # first: hostile files go only to workers that will read them
        elif r < dead_from - 2 and rotation and r >= self.next_fault_round:
            if self.inject(rotation[self.injected % len(rotation)]):
                self.injected += 1
                self.next_fault_round = r + self.args.every
        if "hostile" in self.faults:
            # Nothing for the dead phase's rounds before its victim is known: files that only
            # the victim's view holds (links, folders) would never be read.
            self.hostile(maker, r, payloads, self.args.rounds if self.dead_started else dead_from)

    def start_dead_phase(self) -> None:
        """One worker dies for good; the coordinator restarts without injected errors, so
        the rounds that follow measure the dead-worker bound alone."""
        if self.ballast is not None:
            self._toggle_ballast()
        for p in self.procs:  # a twin still deciding would carry on once its original is dead
            if p.tag == "-twin":
                self.kill(p)
        workers = self.running("worker")
        if not workers or self.coord is None:
            return
        # a worker with a kill and restart pending would be restarted after dying "for good"
        victim = self.rng.choice([w for w in workers if w.node_id not in self.busy] or workers)
        self.notes["dead"] = victim.node_id
        self.kill(victim)
        self.clean_coordinator = True  # its rounds measure the bound, not injected errors
        old = self.coord
        self.kill(old, signal.SIGTERM)
        old.popen.wait(timeout=30)
        self._new_coordinator(old.node_id)
        self.notes["dead_phase_start"] = time.time()
        self.count("dead-worker")

    def finish(self) -> None:
        """Every node should now finish by itself; stragglers get SIGTERM, then SIGKILL."""
        deadline = time.monotonic() + 60
        for p in self.procs:
            if p.stopped:
                self._resume(p)
        for p in self.procs:
            try:
                p.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.violations.append(f"{p.node_id}{p.tag} did not finish; terminated")
                self.kill(p, signal.SIGTERM)
                try:
                    p.popen.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.kill(p)
                    p.popen.wait()
            self.unplanned(p)

    def unplanned(self, p: Proc) -> bool:
        """Record an exited process's unplanned exit code once; True the first time."""
        if p.popen.returncode in p.planned or p.reported:
            return False
        p.reported = True
        self.violations.append(f"unplanned exit {p.popen.returncode} of {p.node_id}{p.tag} (log {p.log}; "
                               f"last error: {last_error(p.log)})")
        return True


def last_error(log: Path) -> str:
    """The last error or warning line a process logged, to say why it exited."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    for line in reversed(lines):
        if '"error"' in line or '"warning"' in line or "Traceback" in line:
            return line[:400]
    return lines[-1][:400] if lines else "empty log"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--faults", default="all", help=f"all, or a comma list of {', '.join(ALL + ('lag',))}")
    ap.add_argument("--every", type=int, default=3, help="rounds between rotated faults [3]")
    ap.add_argument("--payloads-per-round", type=int, default=6)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--model", default="sapod:scripted")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "sapod")
    ap.add_argument("--stall-s", type=float, default=60.0, help="fail when no round advances this long")
    ap.add_argument("--keep", type=Path,
                    help="run in this folder and keep it (default: a tmp folder, kept only when a check fails)")
    ap.add_argument("--short", action="store_true", help="the CI configuration: 4 workers, 30 rounds, every 2")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args(argv)
    names = set()
    for f in filter(None, (x.strip() for x in args.faults.split(","))):
        if f == "all":
            names |= set(ALL)
        elif f in ALL or f == "lag":
            names.add(f)
        else:
            ap.error(f"unknown fault {f!r}; choose from all, {', '.join(ALL + ('lag',))}")
    args.faults = sorted(names)
    if args.short:
        args.rounds, args.every = min(args.rounds, 30), 2
    if args.workers < 2 or args.rounds < 10:
        ap.error("--workers >= 2 and --rounds >= 10")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=False)
        base = args.keep
    else:
        base = Path(tempfile.mkdtemp(prefix="sapod-chaos-"))
    result = Harness(args, base).run()
    width = max(len(k) for k in result["figures"])
    print(f"chaos: {args.workers} workers, {args.rounds} rounds, faults {', '.join(args.faults)}")
    for key, value in result["figures"].items():
        print(f"  {key:<{width}}  {value}")
    for v in result["violations"]:
        print(f"VIOLATION: {v}")
    print("ok: every invariant held" if not result["violations"] else f"{len(result['violations'])} violation(s)")
    if not args.keep:
        if result["violations"]:
            print(f"the folder and logs are kept for inspection: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result))
    return 1 if result["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
