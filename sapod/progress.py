"""Reading back what nodes recorded: per-node progress and metrics, as plain data.

``get_experiment_progress`` is the original project's monitoring entry point.
Records are read line by line; a torn or foreign line is skipped.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.state import StateReader
from sapod.errors import Rejected
from sapod.store import NODE_ID_PATTERN, parse_json_bytes, valid_node_id

PROGRESS_RE = re.compile(rf"^progress_({NODE_ID_PATTERN})\.jsonl\Z")
MAX_LINE = 1 << 20
TAIL_BYTES = 64 * 1024  # metrics rows are ~1 KB; this holds dozens of rounds
MAX_ROUND = 2**63  # as schema's integer fields: a round past this is not one a node wrote


def finite(value: Any) -> bool:
    """A JSON number a float can hold: not a bool, NaN, an infinity, or an integer past float range
    (JSON allows 4300 digits; math.isfinite raises OverflowError on those)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def metrics_row_ok(row: dict[str, Any]) -> bool:
    """A metrics row worth reading: an integer round in 0..MAX_ROUND and a finite reward_mean.
    Every reader of metrics.jsonl (status, report, progress) skips the others."""
    r = row.get("round")
    return (isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= MAX_ROUND
            and finite(row.get("reward_mean")))


def count(value: Any) -> int:
    """A non-negative integer count; anything else counts as 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def read_tail(path: Path, max_bytes: int = TAIL_BYTES) -> list[dict[str, Any]]:
    """The complete JSON rows in the last ``max_bytes`` of a JSONL file; [] when unreadable.

    Opens like store.read_json (no symlinks, non-blocking, regular files only) so a
    FIFO or a link planted in the folder cannot hang or redirect us.
    """
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            return []
        start = max(0, st.st_size - max_bytes)
        os.lseek(fd, start, os.SEEK_SET)
        data = os.read(fd, max_bytes)
    except OSError:
        return []
    finally:
        os.close(fd)
    lines = data.split(b"\n")
    if start > 0:
        lines = lines[1:]  # cut in the middle by the seek
    rows = []
    for line in lines:
        if not line.strip():
            continue
        try:
            rows.append(parse_json_bytes(line))
        except Rejected:
            continue  # the row still being appended, or damaged
    return rows


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The lines that are whole JSON objects; torn, damaged, over-long or absurdly nested ones are
    skipped. Opened without blocking (a FIFO in place of a log) and read at most MAX_LINE bytes at a
    time, so a peer's log can neither hang the reader nor make it hold a gigabyte line in memory."""
    rows: list[dict[str, Any]] = []
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except OSError:
        return rows
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return rows
        with os.fdopen(fd, "rb", closefd=False) as fh:
            while line := fh.readline(MAX_LINE + 1):
                if len(line) > MAX_LINE:
                    while line and not line.endswith(b"\n"):  # the rest of the over-long line
                        line = fh.readline(MAX_LINE + 1)
                    continue
                try:
                    row = json.loads(line)
                except (ValueError, RecursionError):
                    continue  # a line still being appended, or damaged
                if isinstance(row, dict):
                    rows.append(row)
    except OSError:
        pass
    finally:
        os.close(fd)
    return rows


def progress_nodes(root: Path, strict: bool = False) -> list[str]:
    """Nodes with a progress_{node}.jsonl in ``root``. A folder that cannot be listed is an empty
    listing, or with ``strict`` raises the OSError (a missing folder is empty either way)."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return []
    except OSError:
        if strict:
            raise
        return []
    return sorted(m.group(1) for n in names if (m := PROGRESS_RE.match(n)) and valid_node_id(m.group(1)))


def metrics_summary(root: Path, node_id: str) -> dict[str, Any]:
    """Rounds, mean reward, last cumulative reward and external rollouts used, over the node's
    well-formed metrics rows (``metrics_row_ok``); an odd number in one of them counts as 0."""
    rows = [r for r in read_jsonl(paths.metrics_file(root, node_id)) if metrics_row_ok(r)]
    means = [float(r["reward_mean"]) for r in rows]
    cumulative = rows[-1].get("cumulative_reward") if rows else None
    return {
        "rounds": len(rows),
        "mean_reward": sum(means) / len(means) if means else 0.0,
        "cumulative_reward": float(cumulative) if finite(cumulative) else 0.0,
        "external_used": sum(count(r.get("n_external")) for r in rows),
        "last_round": rows[-1]["round"] if rows else -1,
    }


def get_experiment_progress(shared_root: str | Path, experiment: str) -> dict[str, Any]:
    """``{"experiment", "state", "nodes": {node_id: {...}}}`` from the shared folder."""
    root = paths.experiment_root(Path(shared_root), experiment)
    state = StateReader(root).read()
    nodes: dict[str, Any] = {}
    for node_id in progress_nodes(root):
        events = read_jsonl(paths.progress_file(root, node_id))
        last = events[-1] if events else {}
        nodes[node_id] = {
            "role": last.get("role"),
            "last_event": last.get("event"),
            "last_event_ts": last.get("ts"),
            "round": last.get("round"),
            "rounds_completed": sum(1 for e in events if e.get("event") == "round_complete"),
            "checkpoints": sum(1 for e in events if e.get("event") == "checkpoint"),
            "errors": sum(1 for e in events if e.get("event") == "error"),
            "finished": any(e.get("event") == "finished" for e in events),
            "cumulative_reward": last.get("cumulative_reward"),
        }
        if last.get("role") == "worker":
            nodes[node_id]["metrics"] = metrics_summary(root, node_id)
    return {
        "experiment": experiment,
        "root": str(root),
        "state": None if state is None else {"round": state.round, "stage": state.stage, "status": state.status,
                                              "epoch": state.epoch, "seq": state.seq},
        "nodes": nodes,
    }


def metrics_since(root: Path, node_id: str, round_: int) -> list[dict[str, Any]]:
    """The node's well-formed metrics rows (``metrics_row_ok``) of rounds after ``round_``,
    from the tail of its metrics.jsonl (what a crash between checkpoints leaves behind)."""
    return [r for r in read_tail(paths.metrics_file(root, node_id)) if metrics_row_ok(r) and r["round"] > round_]
