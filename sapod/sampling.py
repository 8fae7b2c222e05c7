"""Choosing which peers' rollouts to train on, and deriving per-round seeds. Torch-free."""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence

from sapod.advantages import has_signal
from sapod.types import Group


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


def select_external(groups: Sequence[Group], j: int, rng: random.Random) -> tuple[list[Group], int]:
    """Up to ``j`` distinct groups with signal, uniformly without replacement.

    Returns ``(chosen, dropped)`` where ``dropped`` counts groups discarded because every reward
    in them is equal under this node's verifier (zero advantage, nothing to learn). Exact
    duplicates in the input are collapsed first and are not counted as dropped.
    """
    unique: dict[tuple, Group] = {}
    dropped = 0
    for g in groups:
        key = _group_key(g)
        if key in unique:
            continue
        if not has_signal(g.rewards):
            dropped += 1
            unique[key] = None  # type: ignore[assignment]  # remembered so a repeat is not recounted
            continue
        unique[key] = g
    candidates = [unique[k] for k in sorted(unique) if unique[k] is not None]
    k = min(max(j, 0), len(candidates))
    return rng.sample(candidates, k), dropped


def round_seed(base_seed: int, node_id: str, round_: int, purpose: str) -> int:
    """A stable 63-bit seed for (base seed, node, round, purpose), the same on every machine."""
    # JSON framing keeps ("a|b", "c") and ("a", "b|c") apart; blake2b, unlike hash(), is not
    # salted per process.
    payload = json.dumps([int(base_seed), str(node_id), int(round_), str(purpose)]).encode()
    digest = hashlib.blake2b(payload, digest_size=8, person=b"sapod-seed").digest()
    return int.from_bytes(digest, "big") & (2**63 - 1)
