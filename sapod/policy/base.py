"""The interface every policy implements; the node talks to nothing else."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from sapod.types import Generation, Group, TaskItem


class Policy(Protocol):
    name: str

    def generate(self, items: Sequence[TaskItem], num_generations: int, seed: int) -> Generation:
        """G completions per item, all in one batched call, reproducible for a seed.

        ``Generation.finished`` says which ended with an end-of-sequence token; a policy
        that cannot tell leaves it empty (none finished)."""

    def train_step(self, groups: Sequence[Group]) -> dict[str, float]:
        """One policy-gradient update on scored groups (``Group.finished``: which completions
        ended with an end-of-sequence token, whose stop a token-level policy trains on).

        Returns at least ``loss``, ``grad_norm`` and ``tokens`` (completion tokens trained on).
        """

    def save(self, directory: Path) -> None:
        """Write weights (and tokenizer) plus optimizer state into an existing empty directory."""

    def load(self, directory: Path) -> None:
        """Restore weights and optimizer state written by ``save``."""

    def weights_fingerprint(self) -> str:
        """A digest of the trainable state; changes when an update changed anything."""
