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
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.errors import Rejected, Unreadable
from sapod.logs import get_logger
from sapod.sampling import select_external
from sapod.schema import ROLLOUTS, Rollouts, envelope, parse_rollouts
from sapod.store import (IO, ROLLOUT_FILE_MAX, WriteOnceCache, list_node_entries, read_each, read_json,
                         read_json_sized)
from sapod.taskbase import TaskSource
from sapod.types import Generation, Group, TaskItem
from sapod.watch import folder_version


@dataclass
class GatherResult:
    """A round's peer rollouts as one node sees them. Files are listed while the node
    waits for its peers and read only when the sampler reaches one of their groups:
    a node reads about J files a round, not one per peer (each read is an API call
    on Drive)."""

    files: dict[str, tuple[str, int]] = field(default_factory=dict)  # peer -> (path, inode), as listed
    rollouts: dict[str, Rollouts] = field(default_factory=dict)  # files read and well-formed
    rejected: dict[str, str] = field(default_factory=dict)  # files read and refused: peer -> reason
    gone: set[str] = field(default_factory=set)  # listed, but not there when read
    listed: Listing | None = None  # the listing last taken in (peer_files' result)
    invalid_items: int = 0


_ROLLOUTS_CACHE = WriteOnceCache()

# Listings of rollouts folders, shared by the nodes of a process while inotify vouches for
# them: folder -> (folder_version before listing, when, entries). Trusted for at most
# LISTING_MAX_AGE seconds, in case events were lost.
_LISTINGS: dict[str, tuple[tuple[int, int], float, Listing]] = {}
LISTING_MAX_AGE = 0.25
_LISTINGS_LOCK = threading.Lock()


class Listing(dict[str, tuple[str, int]]):
    """A folder's entries (node id -> (path, inode)), and which of them differ from the
    listing of the same folder taken just before it (``previous``; one step kept).

    N nodes waiting in one process each take in every new listing of the round's
    folder; with the difference computed once here, each takes in only what changed
    instead of comparing all N entries (N x N work a round, for each burst of files)."""

    previous: Listing | None = None
    changed: frozenset[str] = frozenset()
    version: tuple[int, int] | None = None  # the folder_version taken before the listing, if watched

    def changes_since(self, older: Listing | None) -> frozenset[str] | None:
        """The ids whose entries differ from ``older``'s, if ``older`` is the listing just
        before this one (or this one); None when that is not known."""
        if older is self:
            return frozenset()
        if older is not None and self.previous is older:
            return self.changed
        return None


def peer_files(directory: Path) -> Listing:
    """``list_node_entries(directory)``, taken once for all the nodes of a process while
    no file event has come for the folder since (see ``watch.folder_version``): with N
    nodes in a process, N listings of N files per round become a few. Do not modify."""
    key = str(directory)
    version = folder_version(key)
    now = time.monotonic()
    hit = _LISTINGS.get(key) if version is not None else None
    if hit is not None and hit[0] == version and now - hit[1] < LISTING_MAX_AGE:
        IO["listings_shared"] += 1  # a listing a node running alone would have made
        return hit[2]
    entries = Listing(list_node_entries(directory))
    if version is not None:
        entries.version = version
        if hit is not None:
            before = hit[2]
            before.previous = None  # one step kept: older listings can go
            entries.previous = before
            entries.changed = frozenset(k for k, e in entries.items() if before.get(k) != e)
        with _LISTINGS_LOCK:  # file work may run on I/O threads
            if key not in _LISTINGS and len(_LISTINGS) >= 8:  # earlier rounds' folders
                del _LISTINGS[next(iter(_LISTINGS))]
            _LISTINGS[key] = (version, now, entries)
    return entries


def list_peer_rollouts(root: Path, round_: int, stage: int, me: str, result: GatherResult) -> None:
    """Note every peer file now in the round's rollouts folder (one listing, no reads).

    A file listed again under a new inode (replaced, or a FUSE mount's copy finished
    syncing) is read afresh if the sampler reaches it."""
    entries = peer_files(paths.rollouts_dir(root, round_, stage))
    changed = entries.changes_since(result.listed)  # usually what a burst of files added
    result.listed = entries
    if not result.files:  # nothing taken in yet (read or not, a peer's file stays in files)
        result.files = dict(entries)  # so everything listed is new
        result.files.pop(me, None)
        return
    for node_id in entries if changed is None else changed:
        entry = entries.get(node_id)
        if entry is None or node_id == me or result.files.get(node_id) == entry:
            continue
        result.files[node_id] = entry
        result.rollouts.pop(node_id, None)
        result.rejected.pop(node_id, None)
        result.gone.discard(node_id)


def load_peer_rollouts(result: GatherResult, peers: Sequence[str], round_: int, stage: int,
                       concurrent: bool = False) -> None:
    """Read the listed files of ``peers`` not read yet: each lands in ``result.rollouts``,
    ``result.rejected`` (with its reason, logged) or ``result.gone``. Parsed files are
    shared by the nodes of a process. ``concurrent``: several at a time (a network mount)."""
    todo = [p for p in dict.fromkeys(peers)
            if p in result.files and p not in result.rollouts and p not in result.rejected and p not in result.gone]

    def fetch(node_id: str) -> Rollouts | None:
        path, inode = result.files[node_id]

        def load(p: str) -> tuple[Any, int]:
            try:
                doc, size = read_json_sized(p, ROLLOUT_FILE_MAX)
                return (None if doc is None else parse_rollouts(doc, node_id, round_, stage)), size
            except Rejected as exc:
                return exc, 256

        return _ROLLOUTS_CACHE.get(path, inode, load)

    for node_id, got in zip(todo, read_each(fetch, todo, concurrent)):
        if got is None:
            result.gone.add(node_id)
        elif isinstance(got, Rejected):
            get_logger().warning("rollouts_rejected", peer=node_id, reason=got.reason)
            result.rejected[node_id] = got.reason
        else:
            result.rollouts[node_id] = got


def choose_external(result: GatherResult, tasks: TaskSource, j: int, rng: random.Random, max_completions: int,
                    per_peer: int, round_: int, stage: int, concurrent: bool = False) -> tuple[list[Group], int, int]:
    """``(chosen, offered, dropped)``: J peer groups sampled uniformly among those with signal.

    The groups on offer are the first ``per_peer`` (the swarm's I) distinct items of
    each listed peer file, ``offered`` = listed files x ``per_peer``; a file with more
    items cannot crowd out the others. The sampler draws (peer, slot) pairs at random
    and only then reads that peer's file, checks the item's provenance and scores its
    completions with our own verifier; a slot the file does not fill, or a file that
    does not parse, is passed over. A uniform draw over all slots that keeps the
    filled ones is a uniform draw over the groups, so reading lazily changes no
    probability. ``concurrent``: the files of the next few draws are read together.
    """
    log = get_logger()
    peers = sorted(result.files)  # canonical order, whatever order the folder listed them in
    per_peer = max(0, per_peer)
    offered = len(peers) * per_peer

    def score(k: int) -> Group | None:
        node_id, slot = peers[k // per_peer], k % per_peer
        rollouts = result.rollouts.get(node_id)
        if rollouts is None:
            load_peer_rollouts(result, (node_id,), round_, stage)
            rollouts = result.rollouts.get(node_id)
        if rollouts is None or slot >= len(rollouts.distinct):
            return None
        claimed = rollouts.distinct[slot][1]
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
                     source=node_id, finished=list(claimed.finished))

    def read_ahead(ks: list[int]) -> None:
        load_peer_rollouts(result, [peers[k // per_peer] for k in ks], round_, stage, concurrent=True)

    chosen, dropped = select_external(range(offered), j, rng, key=None, score=score,
                                      ahead=read_ahead if concurrent else None)
    return chosen, offered, dropped


def rollouts_doc(node_id: str, instance: str, round_: int, stage: int, epoch: int, model: str,
                 items: list[TaskItem], completions: list[list[str]],
                 finished: Sequence[Sequence[bool]] | None = None) -> dict:
    """A rollouts file; ``finished[i][g]`` (optional) says completion g of item i ended with an
    end-of-sequence token. An item none of whose completions finished carries no such field
    (as in files of older nodes, which means the same)."""
    doc = envelope(ROLLOUTS, node_id, instance, round_, stage, epoch)
    doc["model"] = model
    doc["items"] = [{"task": it.task, "seed": it.seed, "index": it.index, "question": it.question,
                     "answer": it.answer, "metadata": it.metadata, "completions": list(comps)}
                    for it, comps in zip(items, completions)]
    for entry, flags in zip(doc["items"], finished or ()):
        if any(flags):
            if len(flags) != len(entry["completions"]):
                raise ValueError(f"{len(flags)} finished flags for {len(entry['completions'])} completions")
            entry["finished"] = [bool(f) for f in flags]
    return doc


def own_rollouts(root: Path, round_: int, stage: int, node_id: str,
                 tasks: TaskSource) -> tuple[list[TaskItem], Generation] | None:
    """What an earlier instance of this node published for the round, if it did: its items
    and their completions (with ``tokens`` 0: none generated now).

    A node that restarts mid-round republishes nothing: peers may already have read
    the file, and write-once means the round keeps the content they saw. So a file
    that cannot be read now raises OSError (the round is tried again), never None.
    """
    path = paths.rollout_file(root, round_, stage, node_id)
    try:
        doc = read_json(path, ROLLOUT_FILE_MAX)
        if doc is None:
            return None
        rollouts = parse_rollouts(doc, node_id, round_, stage)
        items = [tasks.check(c.task, c.seed, c.index, c.question, c.answer) for c in rollouts.items]
    except Unreadable as exc:
        raise exc.as_oserror(path) from None
    except Rejected as exc:
        get_logger().warning("own_rollouts_unusable", reason=exc.reason)
        return None
    return items, Generation(completions=[list(c.completions) for c in rollouts.items], tokens=0,
                             finished=[list(c.finished) for c in rollouts.items])


def own_submission(root: Path, round_: int, stage: int, node_id: str) -> bool:
    """Whether an earlier instance of this node submitted the round (a restart after
    submitting). A file that cannot be read now raises OSError (the round is tried
    again); one that is not valid counts as not submitted, and is replaced."""
    path = paths.reward_file(root, round_, stage, node_id)
    try:
        return read_json(path) is not None
    except Unreadable as exc:
        raise exc.as_oserror(path) from None
    except Rejected as exc:
        get_logger().warning("own_submission_unusable", reason=exc.reason)
        return False
