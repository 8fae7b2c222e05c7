"""Group-relative advantages and the zero-advantage test, torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence

ADV_EPS = 1e-4


def group_advantages(rewards: Sequence[float], eps: float = ADV_EPS) -> list[float]:
    """(r - mean) / (std + eps) over one group, with the population std."""
    n = len(rewards)
    if n == 0:
        return []
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / (std + eps) for r in rewards]


def has_signal(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """False when every reward in the group is equal: all advantages are zero."""
    return len(rewards) > 1 and (max(rewards) - min(rewards)) > tol
