"""Named task mixes: reasoning-gym tasks with difficulty overrides, selected as ``TASKS=<name>``.

A mix is part of the provenance of its items: a receiver regenerates a peer's item from
``(task, seed, index)`` under the same overrides, so every node of a swarm must run the same
mix. Overrides are stored frozen (sorted ``(key, value)`` pairs, sequences as tuples) because
they are part of the dataset cache key in ``sapod.tasks``.

Torch- and reasoning-gym-free, like ``sapod.tasks``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

Overrides = tuple[tuple[str, Any], ...]


def freeze(overrides: Mapping[str, Any]) -> Overrides:
    """Hashable, order-independent overrides: sorted pairs, lists and tuples as tuples."""

    def frozen(value: Any) -> Any:
        if isinstance(value, (list, tuple)):
            return tuple(frozen(v) for v in value)
        hash(value)  # a mutable value would make the cache key (and provenance) unstable
        return value

    return tuple(sorted((str(k), frozen(v)) for k, v in overrides.items()))


def thaw(overrides: Overrides) -> dict[str, Any]:
    """Keyword arguments for ``reasoning_gym.create_dataset``."""
    return dict(overrides)


# Small enough that a 0.75 M-parameter model answers some items right after its warm-up,
# hard enough that it misses most: GRPO learns only from groups whose rewards differ.
# Each task appears once: items name the reasoning-gym task, so one task, one config.
# Some tasks have a frequent answer (letter_counting "1" for 57% of items, count_bits "2"
# 38%, gcd "2" 31%): always giving each task's most frequent answer scores about 0.24 on
# this mix, so reward up to there can be gained without the skill. fraction_simplification
# and spell_backward give partial credit. sapod:tiny warms up on this table: changing it
# needs a new TINY_VERSION.
EASY: tuple[tuple[str, Overrides], ...] = (
    ("basic_arithmetic", freeze(dict(min_terms=2, max_terms=2, min_digits=1, max_digits=1,
                                     operators=("+", "-"), allow_parentheses=False,
                                     allow_negation=False))),
    ("base_conversion", freeze(dict(min_base=2, max_base=10, min_value=1, max_value=16))),
    ("fraction_simplification", freeze(dict(min_value=1, max_value=9, min_factor=2, max_factor=5,
                                            styles=("plain",)))),
    ("letter_counting", freeze(dict(min_words=3, max_words=5))),
    ("count_bits", freeze(dict(min_n=1, max_n=15))),
    ("gcd", freeze(dict(min_numbers=2, max_numbers=2, min_value=1, max_value=20))),
    ("spell_backward", freeze(dict(min_word_len=3, max_word_len=4))),
)  # fmt: skip

MIXES: dict[str, tuple[tuple[str, Overrides], ...]] = {"easy": EASY}
