"""Plain data passed between the task source, the policy and the node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class TaskItem:
    """One question with its provenance: (task, seed, index) regenerates it."""

    task: str
    seed: int
    index: int
    question: str
    answer: str | None
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass
class Group:
    """One question, its G completions and their rewards under this node's verifier.

    ``finished[g]``: completion g ended with an end-of-sequence token (rather than running
    into MAX_NEW_TOKENS), so training also trains its stop. Left out (or empty): no
    completion is known to have finished."""

    item: TaskItem
    completions: list[str]
    rewards: list[float]
    source: str  # node id that generated the completions
    finished: list[bool] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.finished = _flags(self.finished, len(self.completions))


@dataclass
class Generation:
    """What one batched generate call produced."""

    completions: list[list[str]]  # [item][g]
    tokens: int  # completion tokens generated, padding excluded
    finished: list[list[bool]] = field(default_factory=list)  # [item][g], as Group.finished; empty: none

    def __post_init__(self) -> None:
        if not self.finished:
            self.finished = [[] for _ in self.completions]
        if len(self.finished) != len(self.completions):
            raise ValueError(f"{len(self.finished)} rows of finished flags for {len(self.completions)} items")
        self.finished = [_flags(f, len(c)) for f, c in zip(self.finished, self.completions)]


def _flags(finished: list[bool], n: int) -> list[bool]:
    """``finished`` as n booleans; empty means all False."""
    if not finished:
        return [False] * n
    if len(finished) != n:
        raise ValueError(f"{len(finished)} finished flags for {n} completions")
    return [bool(f) for f in finished]
