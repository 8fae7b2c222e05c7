"""Failpoints: named places where a test harness can make file operations fail.

``SAPOD_FAILPOINTS="list=EIO:0.05,list=ENOTCONN:0.02,checkpoint=ENOSPC:0.3"`` makes
each named point raise that ``OSError`` with that probability. Unset (the normal
case), a failpoint costs one dict lookup. Used by ``scripts/chaos.py`` to exercise
the same recovery paths a flaky network mount does; never set in production.

Points: ``list`` (listing a shared folder), ``write`` (publishing a file),
``checkpoint`` (saving a checkpoint).
"""

from __future__ import annotations

import errno
import os
import random

POINTS = ("list", "write", "checkpoint")

_active: dict[str, list[tuple[int, float]]] = {}
_rng = random.Random()


def parse(spec: str) -> dict[str, list[tuple[int, float]]]:
    """``name=ERRNO:probability`` entries, comma-separated; ValueError when malformed."""
    table: dict[str, list[tuple[int, float]]] = {}
    for entry in filter(None, (e.strip() for e in spec.split(","))):
        try:
            name, rest = entry.split("=", 1)
            code_name, prob_text = rest.split(":", 1)
            code, prob = getattr(errno, code_name.strip().upper()), float(prob_text)
        except (ValueError, AttributeError):
            raise ValueError(f"bad failpoint {entry!r}: expected name=ERRNO:probability") from None
        if name not in POINTS or not 0.0 <= prob <= 1.0:
            raise ValueError(f"bad failpoint {entry!r}: name one of {', '.join(POINTS)}, probability 0..1")
        table.setdefault(name, []).append((code, prob))
    return table


def configure(spec: str, seed: int | None = None) -> None:
    global _active
    _active = parse(spec)
    _rng.seed(seed)


def hit(name: str) -> None:
    """Raise the configured error at this point, with its probability."""
    for code, prob in _active.get(name, ()):
        if _rng.random() < prob:
            raise OSError(code, f"{os.strerror(code)} (failpoint {name})")
