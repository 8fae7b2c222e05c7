"""Rollout files: writing this node's, reading, checking and scoring its peers'.

Everything here is peer data: a file that is bad is rejected with a reason and
counted, never allowed to raise out. Items are regenerated from their provenance
with this node's own task source, so a forged question or gold answer is caught,
and every completion is scored with this node's own verifier.
"""

from __future__ import annotations

import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from sapod import paths
from sapod.errors import Rejected
from sapod.logs import get_logger
from sapod.sampling import select_external
from sapod.schema import ROLLOUTS, ClaimedItem, Rollouts, envelope, parse_rollouts
from sapod.store import (IO, ROLLOUT_FILE_MAX, WriteOnceCache, list_node_entries, read_each, read_json,
                         read_json_sized)
from sapod.taskbase import TaskSource
from sapod.types import Group, TaskItem
from sapod.watch import folder_version


@dataclass
class GatherResult:
    rollouts: dict[str, Rollouts] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # node -> reason (whole file)
    invalid_items: int = 0


_ROLLOUTS_CACHE = WriteOnceCache()

# Listings of rollouts folders, shared by the nodes of a process while inotify vouches for
# them: folder -> (folder_version before listing, when, entries). Trusted for at most
# LISTING_MAX_AGE seconds, in case events were lost.
_LISTINGS: dict[str, tuple[tuple[int, int], float, dict[str, tuple[str, int]]]] = {}
LISTING_MAX_AGE = 0.25
_LISTINGS_LOCK = threading.Lock()


def peer_files(directory: Path) -> dict[str, tuple[str, int]]:
    """``list_node_entries(directory)``, taken once for all the nodes of a process while
    no file event has come for the folder since (see ``watch.folder_version``): with N
    nodes in a process, N listings of N files per round become a few. Do not modify."""
    key = str(directory)
    version = folder_version(key)
    now = time.monotonic()
    if version is not None:
        hit = _LISTINGS.get(key)
        if hit is not None and hit[0] == version and now - hit[1] < LISTING_MAX_AGE:
            IO["listings_shared"] += 1  # a listing a node running alone would have made
            return hit[2]
    entries = list_node_entries(directory)
    if version is not None:
        with _LISTINGS_LOCK:  # file work may run on I/O threads
            if key not in _LISTINGS and len(_LISTINGS) >= 8:  # earlier rounds' folders
                del _LISTINGS[next(iter(_LISTINGS))]
            _LISTINGS[key] = (version, now, entries)
    return entries


def read_peer_rollouts(root: Path, round_: int, stage: int, me: str, result: GatherResult,
                       concurrent: bool = False) -> None:
    """Add every newly visible, well-formed peer file to ``result`` (files are write-once).
    ``concurrent``: read the new files several at a time (a network mount)."""
    entries = peer_files(paths.rollouts_dir(root, round_, stage))
    log = get_logger()
    # Set arithmetic, not a loop over the listing: a node wakes several times a round.
    new = sorted(entries.keys() - result.rollouts.keys() - {me})

    def fetch(node_id: str) -> Rollouts | None:
        path, inode = entries[node_id]

        def load(p: str) -> tuple[Any, int]:
            try:
                doc, size = read_json_sized(p, ROLLOUT_FILE_MAX)
                return (None if doc is None else parse_rollouts(doc, node_id, round_, stage)), size
            except Rejected as exc:
                return exc, 256

        return _ROLLOUTS_CACHE.get(path, inode, load)

    for node_id, got in zip(new, read_each(fetch, new, concurrent)):
        if got is None:
            continue
        if isinstance(got, Rejected):
            # Kept as "not there yet": a file that is still syncing may parse later.
            if result.rejected.get(node_id) != got.reason:
                log.warning("rollouts_rejected", peer=node_id, reason=got.reason)
            result.rejected[node_id] = got.reason
            continue
        result.rollouts[node_id] = got
        result.rejected.pop(node_id, None)


def choose_external(result: GatherResult, tasks: TaskSource, j: int, rng: random.Random,
                    max_completions: int) -> tuple[list[Group], int, int]:
    """``(chosen, available, dropped)``: J peer groups sampled uniformly among those with signal.

    Each candidate's provenance is checked and its completions scored with our own
    verifier only when the sampler reaches it (see ``select_external``).
    """
    log = get_logger()
    # Canonical order without looking inside the groups: peers by id, each peer's distinct
    # items in file order (a file's exact duplicates are one candidate).
    candidates = [(node_id, i, claimed) for node_id in sorted(result.rollouts)
                  for i, claimed in result.rollouts[node_id].distinct]

    def score(c: tuple[str, int, ClaimedItem]) -> Group | None:
        node_id, _, claimed = c
        try:
            if len(claimed.completions) < 2 or len(claimed.completions) > max_completions:
                raise Rejected(f"{len(claimed.completions)} completions (allowed 2..{max_completions})")
            item = tasks.check(claimed.task, claimed.seed, claimed.index, claimed.question, claimed.answer)
        except Rejected as exc:
            result.invalid_items += 1
            log.warning("item_rejected", peer=node_id, task=claimed.task[:64], index=claimed.index,
                        reason=exc.reason)
            return None
        completions = list(claimed.completions)
        return Group(item=item, completions=completions, rewards=[tasks.score(item, c) for c in completions],
                     source=node_id)

    chosen, dropped = select_external(candidates, j, rng, key=None, score=score)
    return chosen, len(candidates), dropped


def rollouts_doc(node_id: str, instance: str, round_: int, stage: int, epoch: int, model: str,
                 items: list[TaskItem], completions: list[list[str]]) -> dict:
    doc = envelope(ROLLOUTS, node_id, instance, round_, stage, epoch)
    doc["model"] = model
    doc["items"] = [{"task": it.task, "seed": it.seed, "index": it.index, "question": it.question,
                     "answer": it.answer, "metadata": it.metadata, "completions": list(comps)}
                    for it, comps in zip(items, completions)]
    return doc


def own_rollouts(root: Path, round_: int, stage: int, node_id: str,
                 tasks: TaskSource) -> tuple[list[TaskItem], list[list[str]]] | None:
    """What an earlier instance of this node published for the round, if it did.

    A node that restarts mid-round republishes nothing: peers may already have read
    the file, and write-once means the round keeps the content they saw.
    """
    try:
        doc = read_json(paths.rollout_file(root, round_, stage, node_id), ROLLOUT_FILE_MAX)
        if doc is None:
            return None
        rollouts = parse_rollouts(doc, node_id, round_, stage)
        items = [tasks.check(c.task, c.seed, c.index, c.question, c.answer) for c in rollouts.items]
    except Rejected as exc:
        get_logger().warning("own_rollouts_unusable", reason=exc.reason)
        return None
    return items, [list(c.completions) for c in rollouts.items]
