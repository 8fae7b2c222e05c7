#!/usr/bin/env python3
"""A lagging, lossy replicator between folders: Google Drive between machines, on one box.

Each node of a test swarm sees the shared folder through its own *replica* folder;
files travel between replicas the way Drive carries them between machines
(RELIABILITY.md), so a one-box swarm meets the faults of a real one:

- a write reaches the other replicas **late** (a random delay per delivery),
- **out of order** (deliveries are independent), yet a newer version of a path is
  never overwritten by an older one: every local change takes a version from one
  counter and each replica keeps the highest it holds (last writer wins),
- an update of a file the destination already has is sometimes **missing from
  listings** for a moment (deleted, then the new file after a short gap),
- a delivery sometimes leaves a **conflict copy** beside the real file
  (``w1.json`` -> ``w1 (1).json``); it stays local to that replica,
- **deletions** travel late too.

Deliveries are atomic at the destination (hidden temp file, then ``os.replace``),
so the faults are the ones above and never torn files. Hidden names (temp files of
nodes and of the replicator, ``.nfs*``) never travel, nor do excluded subtrees.
Replicas are watched by polling (stat only; content is read when a change is
seen); what the replicator wrote itself is remembered per replica by
(size, mtime_ns, inode), so a delivered file is not mistaken for that replica's
own new write and echoed back. Empty folders and folder deletions do not travel:
files do, and folders are created at the destination as deliveries need them.

    python scripts/chaos_lag.py --replica a=/tmp/ra --replica b=/tmp/rb --seed 1 --duration 60
"""

from __future__ import annotations

import argparse
import fnmatch
import heapq
import itertools
import json
import os
import random
import signal
import stat
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Key = tuple[int, int, int]  # (size, mtime_ns, inode): enough to tell one version of a file from another
_GONE: Key = (-1, -1, -1)  # "the replicator deleted this path here"
_MAX_ATTEMPTS = 20
_COUNTERS = ("local_writes", "local_deletes", "deliveries", "deletions", "stale_dropped", "missing_gaps",
             "conflict_copies", "scans", "errors")


def _key(st: os.stat_result) -> Key:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def conflict_name(name: str, taken: Iterable[str]) -> str:
    """Drive's conflict-copy name: ``w1.json`` -> ``w1 (1).json``, the first number not taken."""
    taken = set(taken)
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    for n in itertools.count(1):
        candidate = f"{stem} ({n}){dot}{ext}"
        if candidate not in taken:
            return candidate
    raise AssertionError("unreachable")


@dataclass
class _Delivery:
    """One version of one path on its way to one replica. ``data`` None is a deletion."""

    dest: str
    rel: str
    version: int
    data: bytes | None
    detected: float
    missing: bool  # drawn when scheduled so that a seed fixes every random choice
    gap: float
    conflict: bool
    gap_done: bool = False
    attempts: int = 0


class Replicator:
    """Carries files between replica folders with Drive-like lag, reordering and glitches.

    Everything runs on one background thread (``start``/``stop``) under one lock;
    ``flush`` takes the same lock and delivers everything pending at once, so a test
    can settle the replicas before it checks its invariants.
    """

    def __init__(self, replicas: Mapping[str, Path], *, seed: int = 0, min_delay: float = 0.05,
                 max_delay: float = 1.5, p_missing: float = 0.1, p_conflict: float = 0.05,
                 scan_interval: float = 0.05, exclude: Iterable[str] = ()) -> None:
        if not (0 <= min_delay <= max_delay and 0 <= p_missing <= 1 and 0 <= p_conflict <= 1 and scan_interval > 0):
            raise ValueError("need 0 <= min_delay <= max_delay, probabilities in [0, 1], scan_interval > 0")
        self.replicas = {name: Path(path) for name, path in sorted(replicas.items())}
        for root in self.replicas.values():
            root.mkdir(parents=True, exist_ok=True)
        self.min_delay, self.max_delay, self.scan_interval = min_delay, max_delay, scan_interval
        self.p_missing, self.p_conflict, self.exclude = p_missing, p_conflict, tuple(exclude)
        self._rng = random.Random(seed)
        names = list(self.replicas)
        self._seen: dict[str, dict[str, Key]] = {n: {} for n in names}  # stat at the last scan
        self._delivered: dict[str, dict[str, Key]] = {n: {} for n in names}  # what we put there
        self._applied: dict[str, dict[str, int]] = {n: {} for n in names}  # version held (or tombstone)
        self._conflicts: dict[str, set[str]] = {n: set() for n in names}  # our conflict copies
        self._queue: list[tuple[float, int, _Delivery]] = []
        self._seq = itertools.count()
        self._inflight: Counter[str] = Counter()
        self._version = 0
        self._files: set[str] = set()
        self._counts: Counter[str] = Counter()
        self._delay_sum = self._delay_max = 0.0
        self._last_error = ""
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- public API -------------------------------------------------------------------

    def start(self) -> None:
        """Scan and deliver on a daemon thread until ``stop``."""
        if self._thread is not None:
            raise RuntimeError("already started")
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="chaos-lag", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread; pending deliveries stay pending (``flush`` delivers them)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def flush(self, timeout: float = 10.0) -> bool:
        """Deliver everything pending now, ignoring delays; True once a scan finds nothing new.

        Missing-gap deliveries still delete and then write (back to back), and conflict
        copies are still made: only the waiting is skipped. False when nodes kept
        writing until the timeout.
        """
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                self._scan_all()
                if not self._queue:
                    return True
                if time.monotonic() >= deadline:
                    return False
                while self._queue and time.monotonic() < deadline:
                    self._run(heapq.heappop(self._queue)[2])

    def stats(self) -> dict[str, Any]:
        """Counters since creation: what was seen, delivered, dropped, injected, and failed."""
        with self._lock:
            c = self._counts
            done = c["deliveries"] + c["deletions"]
            return {"files_seen": len(self._files), **{k: c[k] for k in _COUNTERS},
                    "mean_delay_s": round(self._delay_sum / done, 4) if done else 0.0,
                    "max_delay_s": round(self._delay_max, 4), "pending": len(self._queue),
                    "last_error": self._last_error}

    # -- the loop ---------------------------------------------------------------------

    def _loop(self) -> None:
        """Scan every ``scan_interval`` and deliver what is due; never dies on an error."""
        next_scan = next_purge = 0.0
        while not self._stop.is_set():
            try:
                with self._lock:
                    now = time.monotonic()
                    if now >= next_scan:
                        self._scan_all()
                        next_scan = time.monotonic() + self.scan_interval
                    while self._queue and self._queue[0][0] <= time.monotonic():
                        self._run(heapq.heappop(self._queue)[2])
                    if now >= next_purge:
                        self._purge()
                        next_purge = now + 5.0
                    wake = min(next_scan, self._queue[0][0]) if self._queue else next_scan
            except Exception as exc:  # a test tool that must outlive anything the swarm does
                self._error(exc)
                wake = time.monotonic() + 0.1
            self._stop.wait(max(0.0, wake - time.monotonic()))

    def _error(self, exc: BaseException) -> None:
        self._counts["errors"] += 1
        self._last_error = f"{type(exc).__name__}: {exc}"[:300]

    # -- scanning ---------------------------------------------------------------------

    def _excluded(self, rel: str) -> bool:
        return any(fnmatch.fnmatchcase(rel, pat) for pat in self.exclude)

    def _scan_all(self) -> None:
        self._counts["scans"] += 1
        for name in self.replicas:
            self._scan(name)

    def _scan(self, name: str) -> None:
        found: dict[str, Key] = {}
        complete = self._walk(name, str(self.replicas[name]), "", found)
        seen = self._seen[name]
        for rel, key in found.items():
            if seen.get(rel) != key:
                self._observe(name, rel, key)
        if complete:  # after a failed listing, absence proves nothing
            delivered = self._delivered[name]  # a delivery deleted before any scan saw it counts too
            gone = [r for r in seen if r not in found]
            gone += [r for r, k in delivered.items() if k != _GONE and r not in found and r not in seen]
            for rel in gone:
                self._observe(name, rel, None)

    def _walk(self, name: str, directory: str, prefix: str, found: dict[str, Key]) -> bool:
        """Stat every regular, visible, included file below ``directory``; False if a listing failed."""
        try:
            with os.scandir(directory) as it:
                entries = list(it)
        except (FileNotFoundError, NotADirectoryError):
            return True  # removed while we walked: its files are gone
        except OSError as exc:
            self._error(exc)
            return False
        complete = True
        conflicts = self._conflicts[name]
        for entry in entries:
            if entry.name.startswith("."):
                continue  # temp files (ours and the nodes'), .nfs leftovers, hidden folders
            rel = prefix + entry.name
            try:
                if entry.is_dir(follow_symlinks=False):
                    if not self._excluded(rel + "/"):
                        complete &= self._walk(name, entry.path, rel + "/", found)
                elif entry.is_file(follow_symlinks=False) and rel not in conflicts and not self._excluded(rel):
                    found[rel] = _key(entry.stat(follow_symlinks=False))
            except FileNotFoundError:
                continue
            except OSError as exc:
                self._error(exc)
                complete = False
        return complete

    def _observe(self, name: str, rel: str, key: Key | None) -> None:
        """``rel`` at ``name`` is not what the last scan saw: our own delivery, or a local change."""
        seen, delivered = self._seen[name], self._delivered[name]
        mine = delivered.get(rel)
        if key is None:
            seen.pop(rel, None)
            delivered.pop(rel, None)
            if mine != _GONE:
                self._counts["local_deletes"] += 1
                self._publish(name, rel, None)
            return
        if key == mine:
            seen[rel] = key
            return
        read = self._read(self.replicas[name] / rel)
        if read is None:
            return  # vanished or changed while read: the next scan tries again
        seen[rel], data = read
        delivered.pop(rel, None)
        self._counts["local_writes"] += 1
        self._files.add(rel)
        self._publish(name, rel, data)

    @staticmethod
    def _read(path: Path) -> tuple[Key, bytes] | None:
        """Content and stat of a file that held still while read, else None."""
        try:
            with open(path, "rb", opener=lambda p, f: os.open(p, f | getattr(os, "O_NOFOLLOW", 0))) as fh:
                before = _key(os.fstat(fh.fileno()))
                data = fh.read()
            if _key(os.stat(path, follow_symlinks=False)) != before:
                return None
        except OSError:
            return None
        return before, data

    def _publish(self, origin: str, rel: str, data: bytes | None) -> None:
        """Give a local change the next version and schedule it to every other replica."""
        self._version += 1
        self._applied[origin][rel] = self._version
        now = time.monotonic()
        for dest in self.replicas:
            if dest == origin:
                continue
            rng = self._rng
            delay = rng.uniform(self.min_delay, self.max_delay)
            d = _Delivery(dest, rel, self._version, data, now, missing=rng.random() < self.p_missing,
                          gap=rng.uniform(0.05, 0.5), conflict=rng.random() < self.p_conflict)
            self._inflight[rel] += 1
            self._push(now + delay, d)

    def _push(self, due: float, d: _Delivery) -> None:
        heapq.heappush(self._queue, (due, next(self._seq), d))

    # -- delivering -------------------------------------------------------------------

    def _run(self, d: _Delivery) -> None:
        """Deliver ``d``; an I/O failure is retried a little later, a few times."""
        try:
            again = self._deliver(d)
        except OSError as exc:
            if not isinstance(exc, FileNotFoundError):
                self._error(exc)
            d.attempts += 1
            again = d.attempts < _MAX_ATTEMPTS
            if again:
                self._push(time.monotonic() + 0.1, d)
        if not again:
            self._inflight[d.rel] -= 1
            if self._inflight[d.rel] <= 0:
                del self._inflight[d.rel]

    def _deliver(self, d: _Delivery) -> bool:
        """Apply ``d`` at its destination; True when it was requeued (the second half of a gap)."""
        path = self.replicas[d.dest] / d.rel
        present = self._reconcile(d.dest, d.rel, path)
        applied = self._applied[d.dest]
        if d.version < applied.get(d.rel, 0):
            self._counts["stale_dropped"] += 1  # a newer version is already there: last writer wins
            return False
        if d.data is None:
            path.unlink(missing_ok=True)
            self._landed(d, _GONE, "deletions")
            return False
        if d.missing and present and not d.gap_done:
            path.unlink(missing_ok=True)  # gone from listings for a moment, then the new file
            self._delivered[d.dest][d.rel] = _GONE
            applied[d.rel] = d.version
            d.gap_done = True
            self._counts["missing_gaps"] += 1
            self._push(time.monotonic() + d.gap, d)
            return True
        self._landed(d, self._write(path, d.data), "deliveries")
        if d.conflict:
            try:
                taken = os.listdir(path.parent)
                copy = path.parent / conflict_name(path.name, taken)
                self._write(copy, d.data)
                self._conflicts[d.dest].add(str(copy.relative_to(self.replicas[d.dest]).as_posix()))
                self._counts["conflict_copies"] += 1
            except OSError as exc:  # the real file is there; a lost conflict copy is no loss
                if not isinstance(exc, FileNotFoundError):
                    self._error(exc)
        return False

    def _landed(self, d: _Delivery, key: Key, counter: str) -> None:
        self._delivered[d.dest][d.rel] = key
        self._applied[d.dest][d.rel] = d.version
        self._counts[counter] += 1
        delay = time.monotonic() - d.detected
        self._delay_sum += delay
        self._delay_max = max(self._delay_max, delay)

    def _reconcile(self, name: str, rel: str, path: Path) -> bool:
        """Catch a local change the scanner has not seen yet (it then wins); True if the file exists."""
        try:
            st = os.stat(path, follow_symlinks=False)
        except (FileNotFoundError, NotADirectoryError):
            if rel in self._seen[name] or self._delivered[name].get(rel, _GONE) != _GONE:
                self._observe(name, rel, None)
            return False
        if stat.S_ISREG(st.st_mode) and _key(st) != self._seen[name].get(rel):
            self._observe(name, rel, _key(st))
        return True

    @staticmethod
    def _write(path: Path, data: bytes) -> Key:
        """Hidden temp file in the destination folder, then ``os.replace``: never a torn file."""
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.parent / f".{path.name}.lag-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as fh:
                fh.write(data)
            key = _key(os.stat(tmp))
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return key

    def _purge(self) -> None:
        """Forget tombstones of paths with nothing in flight, so a long run stays small."""
        for name in self.replicas:
            seen, delivered, applied = self._seen[name], self._delivered[name], self._applied[name]
            for rel in [r for r in applied if r not in seen and r not in self._inflight]:
                if delivered.get(rel, _GONE) == _GONE:
                    applied.pop(rel)
                    delivered.pop(rel, None)
            for rel in [r for r, k in delivered.items() if k == _GONE and r not in seen and r not in applied]:
                delivered.pop(rel)
            self._conflicts[name] = {r for r in self._conflicts[name] if (self.replicas[name] / r).exists()}


def main(argv: list[str] | None = None) -> int:
    """Run a replicator until SIGTERM/SIGINT or ``--duration``; print its stats as JSON."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--replica", action="append", required=True, metavar="NAME=PATH")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--duration", type=float, default=None, help="seconds (default: until a signal)")
    for flag, default in (("min-delay", 0.05), ("max-delay", 1.5), ("p-missing", 0.1), ("p-conflict", 0.05),
                          ("scan-interval", 0.05)):
        ap.add_argument(f"--{flag}", type=float, default=default)
    ap.add_argument("--exclude", action="append", default=[], metavar="GLOB")
    args = ap.parse_args(argv)
    replicas: dict[str, Path] = {}
    for spec in args.replica:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path or name in replicas:
            ap.error(f"--replica wants a unique NAME=PATH, got {spec!r}")
        replicas[name] = Path(path)
    try:
        rep = Replicator(replicas, seed=args.seed, min_delay=args.min_delay, max_delay=args.max_delay,
                         p_missing=args.p_missing, p_conflict=args.p_conflict,
                         scan_interval=args.scan_interval, exclude=args.exclude)
    except ValueError as exc:
        ap.error(str(exc))
    done = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: done.set())
    rep.start()
    try:
        done.wait(args.duration)
    finally:
        rep.stop()
    print(json.dumps(rep.stats()), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
