"""Choosing which peers' rollouts to train on, and deriving per-round seeds. Torch-free."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from sapod.advantages import has_signal
from sapod.types import Group


T = TypeVar("T")
AHEAD = 8  # draws shown to select_external's ``ahead`` at a time


def _identity(g: Any) -> Any:
    return g


def _group_key(g: Group) -> tuple:
    # Everything that distinguishes two groups, so the sort (and hence the sample) does not depend
    # on the order the shared folder happened to list files in.
    it = g.item
    return (
        str(g.source),
        str(it.task),
        int(it.seed),
        int(it.index),
        str(it.question),
        tuple(str(c) for c in g.completions),
        tuple(float(r) for r in g.rewards),
    )


def select_external(candidates: Sequence[T], j: int, rng: random.Random, *,
                    key: Callable[[T], Any] | None = _group_key,
                    score: Callable[[T], Group | None] = _identity,
                    ahead: Callable[[list[T]], None] | None = None) -> tuple[list[Group], int]:
    """Up to ``j`` distinct groups with signal, uniformly at random without replacement.

    Candidates are put in a canonical order (by ``key``, so the listing order of the
    shared folder does not matter; ``key=None`` when the caller passes them distinct
    and in a canonical order already) and drawn one at a time in a random order (a
    Fisher-Yates shuffle that stops early, kept as a map of the positions it moved, so
    a draw costs the same however many candidates there are): each is scored
    (``score`` checks and scores a peer's item lazily; None means invalid) and kept
    if its rewards are not all equal, until ``j`` are kept. Taking the first ``j`` of a
    uniform shuffle that pass the filter is a uniform sample of the groups that pass
    it, and only the groups drawn are ever scored or cost a random draw, which keeps
    a node's cost at O(J) verifier calls however large the swarm.

    ``ahead``, if given, is shown the next few draws before they are scored (to read
    their files together); the draws, and so the result, are the same without it.

    Returns ``(chosen, dropped)``: ``dropped`` counts the examined groups discarded for
    zero advantage. Exact duplicates are collapsed first and not counted.
    """
    if key is None:
        order: Sequence[T] = candidates
    else:
        unique = {key(c): c for c in candidates}
        order = [unique[k] for k in sorted(unique)]
    chosen: list[Group] = []
    dropped = 0
    n = len(order)
    moved: dict[int, int] = {}  # position -> index of the candidate the shuffle put there
    batch = AHEAD if ahead is not None else 1
    done = 0  # positions drawn so far
    while done < n and len(chosen) < j:
        drawn = []
        for i in range(done, min(done + batch, n)):
            pick = rng.randrange(i, n)
            drawn.append(moved.get(pick, pick))
            moved[pick] = moved.pop(i, i)
        done += len(drawn)
        if ahead is not None:
            ahead([order[k] for k in drawn])
        for k in drawn:
            if len(chosen) >= j:
                break
            group = score(order[k])
            if group is None:
                continue
            if has_signal(group.rewards):
                chosen.append(group)
            else:
                dropped += 1
    return chosen, dropped


def round_seed(base_seed: int, node_id: str, round_: int, purpose: str) -> int:
    """A stable 63-bit seed for (base seed, node, round, purpose), the same on every machine."""
    # JSON framing keeps ("a|b", "c") and ("a", "b|c") apart; blake2b, unlike hash(), is not
    # salted per process.
    payload = json.dumps([int(base_seed), str(node_id), int(round_), str(purpose)]).encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=b"sapod-seed").digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
