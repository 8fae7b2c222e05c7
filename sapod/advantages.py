"""Group-relative advantages and the zero-advantage test, torch-free."""

from __future__ import annotations

import math
from collections.abc import Sequence

ADV_EPS = 1e-4


def group_advantages(rewards: Sequence[float], eps: float = ADV_EPS) -> list[float]:
    """(r - mean) / (std + eps) over one group, with the population std.

    Exactly 0.0 for every completion where ``has_signal`` is False (all rewards equal):
    the float mean of e.g. [0.1, 0.1, 0.1] is an ulp off, which gave each a tiny advantage
    of the same sign instead of none.
    """
    n = len(rewards)
    if not has_signal(rewards):
        return [0.0] * n
    mean = sum(rewards) / n
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / n)
    return [(r - mean) / (std + eps) for r in rewards]


def has_signal(rewards: Sequence[float], tol: float = 1e-9) -> bool:
    """False when every reward in the group is equal: all advantages are zero."""
    return len(rewards) > 1 and (max(rewards) - min(rewards)) > tol
