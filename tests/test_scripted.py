"""The torch-free scripted policy used for protocol tests and large swarm benchmarks."""

from __future__ import annotations

import json
import math

import pytest

from sapod.policy.scripted import MAX_SKILL, NO_GOLD_TEXT, STATE_FILE, ScriptedPolicy
from sapod.types import Group, TaskItem

ITEMS = [TaskItem("basic_arithmetic", 1, i, f"What is {i}+1?", str(i + 1)) for i in range(5)]


def correct(item: TaskItem, text: str) -> float:
    return 1.0 if text == f"<answer>{item.answer}</answer>" else 0.0


def scored_groups(policy: ScriptedPolicy, seed: int, g: int = 8) -> list[Group]:
    gen = policy.generate(ITEMS, g, seed)
    return [
        Group(item=it, completions=row, rewards=[correct(it, c) for c in row], source="me")
        for it, row in zip(ITEMS, gen.completions)
    ]


def test_implements_the_policy_interface():
    """ScriptedPolicy has the Policy protocol's attributes plus weights_fingerprint."""
    p = ScriptedPolicy()
    assert p.name == "sapod:scripted"
    for attr in ("generate", "train_step", "save", "load", "weights_fingerprint"):
        assert callable(getattr(p, attr))


def test_generate_shape_determinism_and_tokens():
    """generate returns [item][g] completions, repeats for a seed, and counts words as tokens."""
    p = ScriptedPolicy(skill=0.5)
    a, b = p.generate(ITEMS, 4, 9), p.generate(ITEMS, 4, 9)
    assert a == b
    assert len(a.completions) == len(ITEMS) and all(len(r) == 4 for r in a.completions)
    assert a.tokens == sum(len(c.split()) for r in a.completions for c in r)
    assert p.generate(ITEMS, 4, 10) != a
    assert p.generate([], 4, 1).completions == []


def test_skill_sets_the_share_of_correct_answers():
    """skill 1 always answers correctly, skill 0 never; None-answer items get the fixed text."""
    always, never = ScriptedPolicy(skill=1.0), ScriptedPolicy(skill=0.0)
    assert all(correct(it, c) == 1.0 for it, row in zip(ITEMS, always.generate(ITEMS, 6, 1).completions) for c in row)
    assert all(correct(it, c) == 0.0 for it, row in zip(ITEMS, never.generate(ITEMS, 6, 1).completions) for c in row)
    no_gold = TaskItem("propositional_logic", 0, 0, "q", None)
    assert always.generate([no_gold], 2, 0).completions == [[NO_GOLD_TEXT, NO_GOLD_TEXT]]
    half = ScriptedPolicy(skill=0.5).generate(ITEMS, 200, 3)
    share = sum(correct(it, c) for it, row in zip(ITEMS, half.completions) for c in row) / 1000
    assert 0.4 < share < 0.6


def test_skill_rises_after_rewarded_train_steps():
    """Rewarded groups raise skill; metrics are finite; skill is capped at MAX_SKILL."""
    p = ScriptedPolicy(skill=0.2, learning_rate=0.1)
    start, fp = p.skill, p.weights_fingerprint()
    for step in range(5):
        metrics = p.train_step(scored_groups(p, step))
        assert set(metrics) >= {"loss", "grad_norm", "tokens"}
        assert all(math.isfinite(v) for v in metrics.values())
    assert p.skill > start and p.steps == 5
    assert p.weights_fingerprint() != fp
    for step in range(200):
        p.train_step(scored_groups(p, 100 + step))
    assert p.skill <= MAX_SKILL


def test_groups_without_signal_change_nothing():
    """Zero-advantage groups (all rewards equal) leave skill and fingerprint unchanged."""
    p = ScriptedPolicy(skill=0.3)
    fp = p.weights_fingerprint()
    flat = [Group(ITEMS[0], ["<answer>1</answer>"] * 3, [1.0, 1.0, 1.0], "peer")]
    metrics = p.train_step(flat)
    assert p.skill == 0.3 and metrics["grad_norm"] == 0.0 and p.weights_fingerprint() == fp
    assert p.train_step([])["tokens"] == 0.0


def test_save_load_round_trip(tmp_path):
    """save writes scripted.json and load restores skill and step count exactly."""
    p = ScriptedPolicy(skill=0.2, learning_rate=0.1)
    p.train_step(scored_groups(p, 1))
    p.save(tmp_path)
    assert json.loads((tmp_path / STATE_FILE).read_text()) == {"skill": p.skill, "steps": 1}
    q = ScriptedPolicy()
    q.load(tmp_path)
    assert (q.skill, q.steps, q.weights_fingerprint()) == (p.skill, p.steps, p.weights_fingerprint())
    assert [f.name for f in tmp_path.iterdir()] == [STATE_FILE]


@pytest.mark.parametrize(
    "content",
    [
        '{"skill": NaN, "steps": 0}',
        '{"skill": 1.5, "steps": 0}',
        '{"skill": -0.1, "steps": 0}',
        '{"skill": "0.5", "steps": 0}',
        '{"skill": 0.5, "steps": -1}',
        '{"skill": 0.5, "steps": 1.5}',
        '{"skill": 0.5}',
        "[0.5, 1]",
        "not json",
    ],
)
def test_load_rejects_bad_state(tmp_path, content):
    """load raises ValueError for non-finite, out-of-range or malformed state and keeps the old skill."""
    (tmp_path / STATE_FILE).write_text(content)
    p = ScriptedPolicy(skill=0.4)
    with pytest.raises(ValueError):
        p.load(tmp_path)
    assert p.skill == 0.4


def test_load_missing_file_and_bad_constructor_args(tmp_path):
    """A missing state file and invalid skill/learning_rate raise ValueError."""
    with pytest.raises(ValueError):
        ScriptedPolicy().load(tmp_path)
    for kwargs in ({"skill": 1.1}, {"skill": math.nan}, {"learning_rate": -1.0}, {"learning_rate": math.inf}):
        with pytest.raises(ValueError):
            ScriptedPolicy(**kwargs)


def test_learns_on_real_reasoning_gym_tasks():
    """With reasoning-gym verifiers in the loop, a few steps raise skill and mean reward."""
    from sapod.tasks import make_task_source

    src = make_task_source("basic_arithmetic,base_conversion")
    p = ScriptedPolicy(skill=0.1, learning_rate=0.2)
    for rnd in range(8):
        items = src.sample(6, rnd)
        gen = p.generate(items, 8, rnd)
        groups = [
            Group(it, row, [src.score(it, c) for c in row], "me") for it, row in zip(items, gen.completions)
        ]
        p.train_step(groups)
    assert p.skill > 0.3
