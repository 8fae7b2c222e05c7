"""A torch-free stand-in policy whose only parameter is the chance of answering correctly.

It lets protocol tests and swarm benchmarks run hundreds of nodes in one process while keeping the
shape of the real loop: rewarded groups raise the skill, so the swarm's accuracy visibly climbs.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
from collections.abc import Sequence
from pathlib import Path

from sapod.advantages import group_advantages, has_signal
from sapod.types import Generation, Group, TaskItem

MAX_SKILL = 0.98
STATE_FILE = "scripted.json"
# Items without a gold answer (propositional_logic) still need a well-formed attempt.
NO_GOLD_TEXT = "<answer>P</answer>"


def _finite_in(value: object, lo: float, hi: float, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{what} must be a number, got {type(value).__name__}")
    x = float(value)
    if not math.isfinite(x) or not lo <= x <= hi:
        raise ValueError(f"{what} must be a finite number in [{lo}, {hi}], got {value!r}")
    return x


def _words(texts: Sequence[str]) -> int:
    return sum(len(t.split()) for t in texts)


class ScriptedPolicy:
    """Answers correctly with probability ``skill``; training nudges ``skill`` up by reward."""

    def __init__(self, *, skill: float = 0.2, learning_rate: float = 0.05, name: str = "sapod:scripted"):
        self.skill = _finite_in(skill, 0.0, 1.0, "skill")
        self.learning_rate = _finite_in(learning_rate, 0.0, math.inf, "learning_rate")
        self.name = name
        self.steps = 0

    def generate(self, items: Sequence[TaskItem], num_generations: int, seed: int) -> Generation:
        rng = random.Random(seed)
        completions: list[list[str]] = []
        for item in items:
            row = []
            for _ in range(num_generations):
                if rng.random() < self.skill:
                    text = NO_GOLD_TEXT if item.answer is None else f"<answer>{item.answer}</answer>"
                elif rng.random() < 0.5:
                    # Letters only: a digit could contain a numeric gold answer and earn partial credit.
                    junk = "".join(rng.choice("xyzqj") for _ in range(6))
                    text = f"<answer>wrong-{junk}</answer>"
                else:
                    text = "I am not sure how to answer this."
                row.append(text)
            completions.append(row)
        return Generation(completions=completions, tokens=sum(_words(r) for r in completions))

    def train_step(self, groups: Sequence[Group]) -> dict[str, float]:
        useful = [g for g in groups if has_signal(g.rewards)]
        tokens = sum(_words(g.completions) for g in useful)
        before = self.skill
        loss = 0.0
        if useful:
            mean_reward = sum(sum(g.rewards) / len(g.rewards) for g in useful) / len(useful)
            self.skill = min(MAX_SKILL, max(0.0, self.skill + self.learning_rate * mean_reward))
            # Same sign convention as the GRPO loss: minimising it raises advantage-weighted reward.
            weighted = [
                sum(a * r for a, r in zip(group_advantages(g.rewards), g.rewards)) / len(g.rewards)
                for g in useful
            ]
            loss = -sum(weighted) / len(weighted)
        self.steps += 1
        if not math.isfinite(loss):
            loss = 0.0
        return {"loss": float(loss), "grad_norm": abs(self.skill - before), "tokens": float(tokens)}

    def weights_fingerprint(self) -> str:
        return hashlib.blake2b(repr(self.skill).encode(), digest_size=8).hexdigest()

    def save(self, directory: Path) -> None:
        directory = Path(directory)
        tmp = directory / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"skill": self.skill, "steps": self.steps}))
        os.replace(tmp, directory / STATE_FILE)

    def load(self, directory: Path) -> None:
        path = Path(directory) / STATE_FILE
        try:
            state = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot read {path}: {e}") from None
        if not isinstance(state, dict):
            raise ValueError(f"{path} does not hold an object")
        skill = _finite_in(state.get("skill"), 0.0, 1.0, "skill")
        steps = state.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be a non-negative integer, got {steps!r}")
        self.skill, self.steps = skill, steps
