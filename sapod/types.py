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
    """One question, its G completions and their rewards under this node's verifier."""

    item: TaskItem
    completions: list[str]
    rewards: list[float]
    source: str  # node id that generated the completions


@dataclass
class Generation:
    """What one batched generate call produced."""

    completions: list[list[str]]  # [item][g]
    tokens: int  # completion tokens generated, padding excluded
