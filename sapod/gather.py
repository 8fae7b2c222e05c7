"""Rollout files: writing this node's, reading, checking and scoring its peers'.

Everything here is peer data: a file that is bad is rejected with a reason and
counted, never allowed to raise out. Items are regenerated from their provenance
with this node's own task source, so a forged question or gold answer is caught,
and every completion is scored with this node's own verifier.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any
from pathlib import Path

from sapod import paths
from sapod.errors import Rejected
from sapod.logs import get_logger
from sapod.sampling import select_external
from sapod.schema import ROLLOUTS, ClaimedItem, Rollouts, envelope, parse_rollouts
from sapod.store import ROLLOUT_FILE_MAX, WriteOnceCache, list_node_entries, read_json, read_json_sized
from sapod.tasks import TaskSource
from sapod.types import Group, TaskItem


@dataclass
class GatherResult:
    rollouts: dict[str, Rollouts] = field(default_factory=dict)
    rejected: dict[str, str] = field(default_factory=dict)  # node -> reason (whole file)
    invalid_items: int = 0


_ROLLOUTS_CACHE = WriteOnceCache()


def read_peer_rollouts(root: Path, round_: int, stage: int, me: str, result: GatherResult) -> None:
    """Add every newly visible, well-formed peer file to ``result`` (files are write-once)."""
    log = get_logger()
    for node_id, (path, inode) in list_node_entries(paths.rollouts_dir(root, round_, stage)).items():
        if node_id == me or node_id in result.rollouts:
            continue

        def load(p: str, node_id: str = node_id) -> tuple[Any, int]:
            try:
                doc, size = read_json_sized(p, ROLLOUT_FILE_MAX)
                return (None if doc is None else parse_rollouts(doc, node_id, round_, stage)), size
            except Rejected as exc:
                return exc, 256

        try:
            rollouts = _ROLLOUTS_CACHE.get(path, inode, load)
            if rollouts is None:
                continue
            result.rollouts[node_id] = rollouts
            result.rejected.pop(node_id, None)
        except Rejected as exc:
            # Kept as "not there yet": a file that is still syncing may parse later.
            if result.rejected.get(node_id) != exc.reason:
                log.warning("rollouts_rejected", peer=node_id, reason=exc.reason)
            result.rejected[node_id] = exc.reason


def choose_external(result: GatherResult, tasks: TaskSource, j: int, rng: random.Random,
                    max_completions: int) -> tuple[list[Group], int, int]:
    """``(chosen, available, dropped)``: J peer groups sampled uniformly among those with signal.

    Each candidate's provenance is checked and its completions scored with our own
    verifier only when the sampler reaches it (see ``select_external``).
    """
    log = get_logger()
    candidates = [(node_id, i, claimed) for node_id, rollouts in result.rollouts.items()
                  for i, claimed in enumerate(rollouts.items)]

    def key(c: tuple[str, int, ClaimedItem]) -> tuple:
        node_id, _, claimed = c
        return (node_id, claimed.task, claimed.seed, claimed.index, claimed.question, claimed.completions)

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

    chosen, dropped = select_external(candidates, j, rng, key=key, score=score)
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
