"""A node's own checkpoints: ``checkpoints/round_{r}/{node_id}/``, COMPLETE written last.

Runs on the GPU thread (it reads the model). A folder without COMPLETE does not
exist for readers. A node only ever loads its own checkpoints.
"""

from __future__ import annotations

import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from sapod import failpoints, paths, schema
from sapod.errors import Rejected
from sapod.logs import get_logger
from sapod.policy.base import Policy
from sapod.progress import count, finite, metrics_since
from sapod.store import atomic_write_json, fsync_dir, read_json

COUNTERS = "counters.json"


def save_checkpoint(root: Path, node_id: str, round_: int, policy: Policy, counters: dict[str, Any],
                    keep: int) -> Path:
    final = paths.checkpoint_dir(root, round_, node_id)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".{node_id}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        policy.save(tmp)
        failpoints.hit("checkpoint")
        _fsync_tree(tmp)  # the policy's files are durable before COMPLETE can be
        atomic_write_json(tmp / COUNTERS, {"schema": schema.CHECKPOINT, "node_id": node_id, "round": round_,
                                           **counters})
        atomic_write_json(paths.complete_marker(tmp), {"node_id": node_id, "round": round_})
        if final.exists():  # a retry of the same round: ours to replace
            _remove_checkpoint(final)  # anything left of it makes the rename fail (OSError)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(final.parent)
    prune_checkpoints(root, node_id, keep)
    return final


def _fsync_tree(directory: Path) -> None:
    """fsync every regular file under ``directory`` (subfolders included), then each folder.
    A file's fsync error propagates as OSError; a folder's is ignored as in ``fsync_dir``."""
    with os.scandir(directory) as it:
        entries = list(it)
    for entry in entries:
        if entry.is_dir(follow_symlinks=False):
            _fsync_tree(Path(entry.path))
        elif entry.is_file(follow_symlinks=False):
            fd = os.open(entry.path, os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    fsync_dir(directory)


def _remove_checkpoint(directory: Path) -> None:
    """The marker goes first (made durable), so a half-deleted folder is never taken for complete."""
    paths.complete_marker(directory).unlink(missing_ok=True)
    fsync_dir(directory)
    shutil.rmtree(directory, ignore_errors=True)


def free_bytes(root: Path) -> int:
    """Free space where checkpoints go (the nearest folder that exists)."""
    where = paths.checkpoints_dir(root)
    while not where.exists() and where != where.parent:
        where = where.parent
    return shutil.disk_usage(where).free


def dir_bytes(directory: Path) -> int:
    return sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())


def clear_stale_tmp(root: Path, node_id: str) -> int:
    """Remove this node's half-written checkpoint folders (a kill during a save); call
    only at startup, when no save of ours can be running. Returns how many."""
    n = 0
    for d in paths.checkpoints_dir(root).glob(f"round_*/.{node_id}.tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
        n += 1
    return n


def list_checkpoints(root: Path, node_id: str) -> list[tuple[int, Path]]:
    """This node's complete checkpoints, oldest first."""
    found = []
    try:
        entries = os.listdir(paths.checkpoints_dir(root))
    except FileNotFoundError:
        return []
    for name in entries:
        r = paths.round_number(name)
        if r is None:
            continue
        d = paths.checkpoint_dir(root, r, node_id)
        if paths.complete_marker(d).is_file():
            found.append((r, d))
    return sorted(found)


def latest_checkpoint(root: Path, node_id: str) -> tuple[int, Path] | None:
    found = list_checkpoints(root, node_id)
    return found[-1] if found else None


def prune_checkpoints(root: Path, node_id: str, keep: int) -> None:
    for _, d in list_checkpoints(root, node_id)[:-keep]:
        _remove_checkpoint(d)
        try:
            d.parent.rmdir()  # only succeeds once no node has a checkpoint for that round
        except OSError:
            pass


def read_counters(directory: Path, node_id: str) -> dict[str, Any]:
    doc = read_json(directory / COUNTERS)
    if doc is None:
        raise Rejected("counters.json missing")
    if doc.get("schema") != schema.CHECKPOINT or doc.get("node_id") != node_id:
        raise Rejected("counters.json belongs to another schema or node")
    for key in ("round", "rounds_done"):
        if not isinstance(doc.get(key), int) or isinstance(doc.get(key), bool):
            raise Rejected(f"counters.json field {key!r} missing or not an integer")
    if "external_used" in doc and type(doc["external_used"]) is not int:
        raise Rejected("counters.json field 'external_used' not an integer")
    try:
        finite = type(doc.get("cumulative_reward")) in (int, float) and math.isfinite(doc["cumulative_reward"])
    except OverflowError:  # an integer beyond float range
        finite = False
    if not finite:
        raise Rejected("counters.json field 'cumulative_reward' missing or not finite")
    return doc


def owed_submission(counters: dict[str, Any], node_id: str) -> tuple[int, int, dict[str, Any]] | None:
    """(round, stage, document) of the submission a checkpoint says is still owed (a stop
    came while it was being published), or None; one that does not check out is dropped."""
    owed = counters.get("unsubmitted")
    if owed is None:
        return None
    try:
        if not isinstance(owed, dict) or type(owed.get("round")) is not int or type(owed.get("stage")) is not int:
            raise Rejected("not a round, stage and document")
        doc = owed.get("doc")
        schema.parse_submission(doc if isinstance(doc, dict) else {}, node_id, owed["round"], owed["stage"])
    except Rejected as exc:
        get_logger().warning("owed_submission_dropped", reason=exc.reason)
        return None
    return owed["round"], owed["stage"], doc


def carried_forward(root: Path, node_id: str, counters: dict[str, Any]) -> dict[str, Any]:
    """``counters`` with the rounds the node played after the checkpoint was saved (a crash
    between checkpoints), from its metrics rows: the model goes back to the checkpoint,
    the reward it earned since does not (``cumulative_reward`` never goes down). Rows are
    read from the file's tail, which holds dozens of rounds; the last one carries the
    cumulative reward, so that stays exact even if the count of rounds falls short."""
    since = metrics_since(root, node_id, counters["round"])
    if not since:
        return counters
    cumulative = since[-1].get("cumulative_reward")
    return {**counters, "rounds_done": counters["rounds_done"] + len({r["round"] for r in since}),
            "cumulative_reward": float(cumulative) if finite(cumulative) else counters["cumulative_reward"],
            "external_used": int(counters.get("external_used", 0)) + sum(count(r.get("n_external")) for r in since)}
