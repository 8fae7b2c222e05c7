"""``sapod doctor --shared PATH``: check a folder before a swarm uses it.

Each check is a function returning a :class:`Check` (name, result, detail) and works
in a scratch folder ``PATH/.sapod-doctor-{pid}`` that is removed afterwards, so the
doctor can run beside a live swarm. It checks what the shared-folder contract
(DESIGN.md section 3) leans on: atomic replace, fsync, file events, latency, space.
Exit 0 when no check failed, 1 when one did, 2 for bad usage.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from sapod import watch
from sapod.config import add_arguments, build_config
from sapod.errors import ConfigError, Rejected
from sapod.store import atomic_write_json, read_json
from sapod.watch import mount_fstype, pick_watch_mode

LOW_SPACE = 5 * 1024**3
LATENCY_TRIES = 10
INOTIFY_WAIT = 2.0


@dataclass(frozen=True)
class Check:
    name: str
    result: str  # ok, warn or fail
    detail: str


def _err(exc: BaseException) -> str:
    return (exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)) or type(exc).__name__


def check_folder(path: Path, scratch: Path) -> Check:
    name = "folder writable"
    if not path.exists():
        return Check(name, "fail", f"{path} does not exist")
    if not path.is_dir():
        return Check(name, "fail", f"{path} is not a folder")
    try:
        scratch.mkdir(exist_ok=True)
        (scratch / "probe").write_bytes(b"sapod")
    except OSError as exc:
        return Check(name, "fail", f"cannot write in {path}: {_err(exc)}")
    return Check(name, "ok", str(path))


def check_replace(scratch: Path) -> Check:
    name = "atomic replace"
    target, tmp = scratch / "replace.json", scratch / ".replace.json.tmp"
    try:
        target.write_bytes(b'{"v":"old"}')
        tmp.write_bytes(b'{"v":"new"}')
        os.replace(tmp, target)
        got = target.read_bytes()
        left = tmp.exists()
    except OSError as exc:
        return Check(name, "fail", f"os.replace over an existing file failed: {_err(exc)}")
    if got != b'{"v":"new"}':
        return Check(name, "fail", f"after os.replace the file reads {got[:40]!r}, not the new content")
    if left:
        return Check(name, "fail", "the temp file is still there after os.replace")
    return Check(name, "ok", "new content, no temp file left")


def check_fsync_file(scratch: Path) -> Check:
    try:
        with open(scratch / "fsync.bin", "wb") as fh:
            fh.write(b"sapod")
            fh.flush()
            os.fsync(fh.fileno())
    except OSError as exc:
        return Check("fsync file", "fail", _err(exc))
    return Check("fsync file", "ok", "works")


def check_fsync_folder(scratch: Path) -> Check:
    try:
        fd = os.open(scratch, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        return Check("fsync folder", "warn", f"not supported ({_err(exc)}); new names may be lost in a crash")
    return Check("fsync folder", "ok", "works")


def check_inotify(scratch: Path) -> Check:
    """A local write seen through the watcher the nodes use (inotify read on an event loop)."""
    name = "inotify"
    if watch.IN is None:  # no inotify on this platform
        return Check(name, "warn", "unavailable; nodes will poll")
    folder = scratch / "watched"

    async def look() -> tuple[bool, float, str | None]:
        w = watch.Watcher("inotify", asyncio.get_running_loop())
        try:
            folder.mkdir(exist_ok=True)  # there even if the watcher cannot watch (it says why)
            w.watch([folder])
            t0 = time.monotonic()
            (folder / "event.json").write_bytes(b"{}")
            got = await w.wait(INOTIFY_WAIT)
            return got, (time.monotonic() - t0) * 1000, w.error
        finally:
            w.close()

    try:
        got, ms, error = asyncio.run(look())
    except OSError as exc:
        return Check(name, "warn", f"cannot watch: {_err(exc)}; nodes will poll")
    if error is not None:
        return Check(name, "warn", f"cannot watch: {error}; nodes will rescan every POLL_INTERVAL")
    if not got:
        return Check(name, "warn", f"no event for a local write within {INOTIFY_WAIT:g} s; use WATCH_MODE=poll")
    # Even when it works, inotify never sees writes made by other machines on a shared mount.
    return Check(name, "ok", f"local write seen in {ms:.0f} ms (other machines' writes are never seen)")


def check_mount(path: Path) -> Check:
    fstype = mount_fstype(path)
    mode, why = pick_watch_mode("auto", path)
    return Check("mount type", "ok", f"{fstype}; WATCH_MODE=auto picks {mode} ({why})")


def check_latency(scratch: Path, poll_interval: float) -> Check:
    name = "write-read latency"
    times = []
    try:
        for i in range(LATENCY_TRIES):
            path = scratch / f"latency_{i}.json"
            t0 = time.perf_counter()
            atomic_write_json(path, {"i": i, "pad": "x" * 200})
            doc = read_json(path)
            times.append((time.perf_counter() - t0) * 1000)
            if doc is None or doc.get("i") != i:
                return Check(name, "fail", f"a file just written read back as {doc!r}")
    except (OSError, Rejected) as exc:
        return Check(name, "fail", f"write then read failed: {_err(exc)}")
    median = statistics.median(times)
    detail = f"median {median:.1f} ms, max {max(times):.1f} ms over {LATENCY_TRIES} tries"
    if median > poll_interval * 1000:
        return Check(name, "warn", f"{detail}: slower than POLL_INTERVAL={poll_interval:g} s")
    return Check(name, "ok", detail)


def check_space(path: Path) -> Check:
    try:
        free = shutil.disk_usage(path).free
    except OSError as exc:
        return Check("free space", "warn", f"unknown: {_err(exc)}")
    detail = f"{free / 1024**3:.1f} GB free"
    return Check("free space", "warn" if free < LOW_SPACE else "ok",
                 detail + (" (under 5 GB: checkpoints may not fit)" if free < LOW_SPACE else ""))


def check_conflict_names(scratch: Path) -> Check:
    name = "conflict copy names"
    try:
        (scratch / "x.json").write_bytes(b"{}")
        (scratch / "x (1).json").write_bytes(b"{}")
        both = (scratch / "x.json").is_file() and (scratch / "x (1).json").is_file()
    except OSError as exc:
        return Check(name, "ok", f"'x (1).json' cannot be created ({_err(exc)})")
    if both:
        return Check(name, "ok", "'x (1).json' can sit beside 'x.json' (sapod ignores such copies)")
    return Check(name, "ok", "'x (1).json' did not appear beside 'x.json'")


def run_checks(path: Path, poll_interval: float = 2.0) -> list[Check]:
    """Every check, in order; the scratch folder is removed before returning."""
    path = Path(path)
    scratch = path / f".sapod-doctor-{os.getpid()}"
    first = check_folder(path, scratch)
    if first.result == "fail":
        shutil.rmtree(scratch, ignore_errors=True)  # made before a write failed, perhaps
        return [first]
    steps: list[tuple[str, Callable[[], Check]]] = [
        ("atomic replace", lambda: check_replace(scratch)),
        ("fsync file", lambda: check_fsync_file(scratch)),
        ("fsync folder", lambda: check_fsync_folder(scratch)),
        ("inotify", lambda: check_inotify(scratch)),
        ("mount type", lambda: check_mount(path)),
        ("write-read latency", lambda: check_latency(scratch, poll_interval)),
        ("free space", lambda: check_space(path)),
        ("conflict copy names", lambda: check_conflict_names(scratch))]
    checks = [first]
    try:
        for name, step in steps:
            try:
                checks.append(step())
            except Exception as exc:  # a check that breaks is a failed check, not a crashed doctor
                checks.append(Check(name, "fail", f"{type(exc).__name__}: {exc}"))
    finally:
        try:
            shutil.rmtree(scratch)
        except OSError as exc:
            checks.append(Check("cleanup", "warn", f"could not remove {scratch}: {_err(exc)}"))
    return checks


def print_table(checks: Sequence[Check], out: TextIO | None = None) -> None:
    out = out or sys.stdout
    rows = [("check", "result", "detail")] + [(c.name, c.result, c.detail) for c in checks]
    w0 = max(len(r[0]) for r in rows)
    w1 = max(len(r[1]) for r in rows)
    for i, (a, b, c) in enumerate(rows):
        print(f"{a:<{w0}}  {b:<{w1}}  {c}", file=out)
        if i == 0:
            print(f"{'-' * w0}  {'-' * w1}  {'-' * 6}", file=out)


def doctor_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="sapod doctor",
                                     description="Check a shared folder before a swarm uses it.")
    add_arguments(parser, only=("shared", "poll_interval"))
    try:
        args = parser.parse_args(list(argv))
        cfg = build_config(vars(args))
    except SystemExit as exc:  # argparse: --help is 0, bad usage 2
        return exc.code if isinstance(exc.code, int) else 2
    except ConfigError as exc:
        print(f"sapod doctor: error: {exc}", file=sys.stderr)
        return 2
    checks = run_checks(cfg.shared, cfg.poll_interval)
    print_table(checks)
    failed = [c.name for c in checks if c.result == "fail"]
    warned = [c.name for c in checks if c.result == "warn"]
    verdict = "FAIL: " + ", ".join(failed) if failed else ("ok with warnings: " + ", ".join(warned) if warned else "ok")
    print(f"\nverdict: {verdict}")
    return 1 if failed else 0
