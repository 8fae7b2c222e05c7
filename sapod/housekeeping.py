"""Housekeeping of old rounds: remove (and optionally archive) rollouts and rewards.

The coordinator calls :func:`tidy_rounds` after each round advance. It keeps the
open round and the ``keep_last - 1`` rounds before it; ``keep_last`` is at least 2
so the previous round, which a slow worker may still be reading, always stays.
Checkpoints are not handled here (sapod.checkpoint keeps the last CHECKPOINT_KEEP).
:func:`remove_stale_temps` clears what a killed writer left beside a file it rewrites.

Blocking file work: call it off the event loop (``await node.io(tidy_for, ...)``).
Nothing here raises for a filesystem error: each failure is logged with a reason
and counted, and the next call simply tries again, because every call considers
every old round it can see, not just the one that just became old.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.logs import get_logger
from sapod.store import fsync_dir

TREES = ("rollouts", "rewards")  # the per-round folders of DESIGN.md section 3 that we own


STALE_TEMP_AGE = 120.0  # seconds: no write of a small file is in flight for this long


def remove_stale_temps(path: Path, min_age: float = STALE_TEMP_AGE) -> int:
    """Remove the temp files that writes of ``path`` left behind (a kill between the
    create and the rename) once older than ``min_age``: a younger one may be a write
    in flight. Returns how many."""
    prefix, cutoff, n = f".{path.name}.tmp-", time.time() - min_age, 0
    try:
        with os.scandir(path.parent) as it:
            for entry in it:
                if not entry.name.startswith(prefix):
                    continue
                try:
                    if entry.stat(follow_symlinks=False).st_mtime < cutoff:
                        os.unlink(entry.path)
                        n += 1
                except FileNotFoundError:
                    continue
    except FileNotFoundError:
        return 0
    return n


def _archive_file(archives: Path, experiment: str, round_: int) -> Path:
    # Not in sapod.paths on purpose: only housekeeping writes (or reads) archives.
    return Path(archives) / experiment / f"round_{round_}.tar.gz"


def set_aside_archives(archives: Path, experiment: str, stamp: str) -> Path | None:
    """A new run under a reused EXPERIMENT_NAME: move an earlier run's archives out of its
    way, to ``archives/{experiment}.before-{stamp}``, and return where. Otherwise the new
    run's rounds would be found "archived already" and removed unarchived. None when there
    is nothing of an earlier run there; an error is logged, not raised (archives of both
    runs then share the folder, and a round the old run archived is not archived again)."""
    folder = _archive_file(archives, experiment, 0).parent
    try:
        if not any(paths.round_number(n.split(".", 1)[0]) is not None for n in os.listdir(folder)):
            return None
        aside = folder.with_name(f"{folder.name}.before-{stamp}")
        os.rename(folder, aside)
    except FileNotFoundError:
        return None
    except OSError as exc:
        get_logger().warning("earlier_archives_not_moved", folder=str(folder), reason=_why(exc))
        return None
    get_logger().warning("earlier_archives_moved", experiment=experiment, to=str(aside))
    return aside


def should_tidy(open_round: int, keep_last: int) -> bool:
    """Whether any round can be old enough to go (cheap; no file access)."""
    return open_round - keep_last + 1 > 0


def tidy_rounds(root: Path, archives: Path, open_round: int, keep_last: int, archive: bool) -> dict[str, int]:
    """Remove ``rollouts/round_{r}`` and ``rewards/round_{r}`` for r < open_round - keep_last + 1.

    ``root`` is the experiment folder, ``archives`` is ``paths.archives_dir(shared)``;
    with ``archive`` each old round is first packed into
    ``archives/{experiment}/round_{r}.tar.gz`` (written atomically, never rewritten)
    and removed only once that file is complete. Returns the counts
    ``rounds_removed``, ``rounds_archived``, ``bytes_archived``, ``errors``.
    """
    if keep_last < 2:
        raise ValueError(f"keep_last={keep_last} is not allowed: must be >= 2 (a slow worker reads the previous round)")
    counts = {"rounds_removed": 0, "rounds_archived": 0, "bytes_archived": 0, "errors": 0}
    cutoff = open_round - keep_last + 1
    if cutoff <= 0:
        return counts
    log = get_logger()
    root = Path(root)
    found: dict[int, dict[str, Path]] = {}
    for tree in TREES:
        try:
            for round_, folder in round_folders(root / tree):
                if round_ < cutoff:
                    found.setdefault(round_, {})[tree] = folder
        except OSError as exc:
            # With one listing missing we could archive a round without half of it: do nothing now.
            log.warning("tidy_skipped", folder=str(root / tree), reason=f"cannot list: {_why(exc)}")
            counts["errors"] += 1
            return counts
    for round_ in sorted(found):
        folders = found[round_]
        try:
            if archive:
                target = _archive_file(archives, root.name, round_)
                if not os.path.lexists(target):
                    counts["bytes_archived"] += _pack(target, root, round_, folders)
                    counts["rounds_archived"] += 1
            for folder in folders.values():
                _remove_tree(folder)
            counts["rounds_removed"] += 1
        except (OSError, tarfile.TarError) as exc:
            counts["errors"] += 1
            log.warning("tidy_round_failed", round=round_, archive=archive, reason=_why(exc))
    if counts["rounds_removed"] or counts["errors"]:
        log.info("rounds_tidied", open_round=open_round, keep_last=keep_last, **counts)
    return counts


def tidy_for(cfg: Any, open_round: int) -> dict[str, int] | None:
    """:func:`tidy_rounds` as the config asks (ROLLOUT_CLEANUP_ENABLED etc.); None when cleanup is off."""
    if not cfg.rollout_cleanup_enabled or not should_tidy(open_round, cfg.rollout_keep_last_n_rounds):
        return None
    return tidy_rounds(cfg.root, paths.archives_dir(cfg.shared), open_round, cfg.rollout_keep_last_n_rounds,
                       cfg.rollout_archive_old)


def round_folders(tree: Path) -> list[tuple[int, Path]]:
    """Real folders named exactly ``round_N`` in one listing; links and everything else ignored."""
    try:
        if not stat.S_ISDIR(os.lstat(tree).st_mode):
            return []  # a link or a file where the tree should be: never ours to touch
    except FileNotFoundError:
        return []
    out = []
    with os.scandir(tree) as it:
        for entry in it:
            r = paths.round_number(entry.name)
            if r is None:
                continue
            try:
                if entry.is_dir(follow_symlinks=False):
                    out.append((r, Path(entry.path)))
            except OSError:
                continue
    return out


def _pack(target: Path, root: Path, round_: int, folders: dict[str, Path]) -> int:
    """Write one round's trees into ``target`` atomically; the archive's size in bytes."""
    # Temp files in a folder of their own, there only while one is: what a killed packer
    # left of this round is found without listing the archives (one per round), and removed.
    partial = target.parent / ".partial"
    partial.mkdir(parents=True, exist_ok=True)
    with os.scandir(partial) as it:
        for entry in it:
            if entry.name.startswith(f"{target.name}.tmp-"):
                _remove_file(entry.path)
    # The unique suffix keeps concurrent writers from ever colliding.
    tmp = partial / f"{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        with open(tmp, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:gz") as tar:
                for tree in TREES:
                    if tree in folders:
                        _add_tree(tar, folders[tree], f"{tree}/round_{round_}")
            fh.flush()
            os.fsync(fh.fileno())
            size = fh.tell()
        os.replace(tmp, target)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    finally:
        try:
            os.rmdir(partial)  # gone unless a temp file is still there (another packer's)
        except OSError:
            pass
    fsync_dir(target.parent)
    return size


def _add_tree(tar: tarfile.TarFile, top: Path, arc_top: str) -> None:
    """Folders and regular files only; links and devices are skipped, never followed."""
    for dirpath, dirnames, filenames in os.walk(top, followlinks=False, onerror=_raise):
        rel = os.path.relpath(dirpath, top)
        arc_dir = arc_top if rel == "." else f"{arc_top}/{rel}"
        tar.addfile(tar.gettarinfo(dirpath, arc_dir))
        dirnames.sort()
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            info = tar.gettarinfo(path, f"{arc_dir}/{name}")  # lstat: a link stays a link
            if not info.isreg():
                continue
            fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
            with os.fdopen(fd, "rb") as fh:
                tar.addfile(info, fh)


def _remove_file(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _raise(exc: OSError) -> None:
    # os.walk swallows listing errors by default; an unreadable subfolder must fail the archive.
    raise exc


def _remove_tree(folder: Path) -> None:
    """rmtree that never follows links; something already gone (a racing tidy) is fine."""

    def ignore_gone(func: Any, path: str, exc: Any) -> None:
        exc = exc[1] if isinstance(exc, tuple) else exc
        if not isinstance(exc, FileNotFoundError):
            raise exc

    if sys.version_info >= (3, 12):
        shutil.rmtree(folder, onexc=ignore_gone)
    else:
        shutil.rmtree(folder, onerror=ignore_gone)


def _why(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        where = f" ({exc.filename})" if exc.filename else ""
        return f"{type(exc).__name__}: {exc.strerror}{where}"
    return f"{type(exc).__name__}: {exc}"[:300]
