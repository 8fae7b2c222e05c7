"""Rollouts files between generation and training: the per-completion ``finished`` flags
(the completion ended with an end-of-sequence token) travel from a node's Generation through
its published file into its own Groups and its peers'."""

from __future__ import annotations

import json
import random

import pytest

from sapod import paths
from sapod.gather import GatherResult, choose_external, list_peer_rollouts, own_rollouts, rollouts_doc
from sapod.store import atomic_write_json
from sapod.tasks import make_task_source
from sapod.types import Generation, Group, TaskItem


def _sums(tmp_path, n: int):
    rows = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(n)]
    (tmp_path / "sums.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return make_task_source(str(tmp_path / "sums.jsonl"))


def _completions(i: int) -> list[str]:
    return [f"<answer>{i + 1}</answer>", "<answer>0</answer>", "<answer>7</answer>"]  # right once: signal


def test_group_and_generation_default_to_nothing_finished():
    """Callers that know nothing of the flags keep working: none finished, one flag per completion."""
    item = TaskItem("t", 0, 0, "q", "a")
    assert Group(item, ["a", "b"], [1.0, 0.0], "me").finished == [False, False]
    assert Group(item, ["a", "b"], [1.0, 0.0], "me", [True, False]).finished == [True, False]
    gen = Generation(completions=[["a", "b"], ["c"]], tokens=3)
    assert gen.finished == [[False, False], [False]]
    assert Generation([["a", "b"], ["c"]], 3, [[True, False], []]).finished == [[True, False], [False]]
    with pytest.raises(ValueError):
        Group(item, ["a", "b"], [1.0, 0.0], "me", [True])
    with pytest.raises(ValueError):
        Generation([["a", "b"]], 2, [[True, False], [True]])


def test_peer_groups_carry_the_flags_of_the_file(tmp_path):
    """choose_external builds each peer Group with the flags the peer published; a file
    without them (an older node) gives groups with none finished."""
    tasks = _sums(tmp_path, 4)
    items = [tasks._item(i) for i in range(4)]
    new = rollouts_doc("new", "i", 0, 0, 1, "m", items[:2], [_completions(0), _completions(1)],
                       [[True, False, True], [False, True, False]])
    old = rollouts_doc("old", "i", 0, 0, 1, "m", items[2:], [_completions(2), _completions(3)])
    atomic_write_json(paths.rollout_file(tmp_path, 0, 0, "new"), new, durable=False)
    atomic_write_json(paths.rollout_file(tmp_path, 0, 0, "old"), old, durable=False)
    result = GatherResult()
    list_peer_rollouts(tmp_path, 0, 0, "me", result)
    chosen, offered, _ = choose_external(result, tasks, 4, random.Random(0), 8, 2, 0, 0)
    assert offered == 4 and len(chosen) == 4
    flags = {(g.source, g.item.index): g.finished for g in chosen}
    assert flags == {("new", 0): [True, False, True], ("new", 1): [False, True, False],
                     ("old", 2): [False] * 3, ("old", 3): [False] * 3}


def test_a_restarted_node_reuses_its_published_flags(tmp_path):
    """own_rollouts (a node restarted mid-round) returns the completions with their flags."""
    tasks = _sums(tmp_path, 2)
    items = [tasks._item(i) for i in range(2)]
    doc = rollouts_doc("w1", "i", 3, 0, 1, "m", items, [_completions(0), _completions(1)],
                       [[False, True, False], [False, False, False]])
    atomic_write_json(paths.rollout_file(tmp_path, 3, 0, "w1"), doc, durable=False)
    got_items, gen = own_rollouts(tmp_path, 3, 0, "w1", tasks)
    assert [i.index for i in got_items] == [0, 1] and gen.tokens == 0
    assert gen.completions == [_completions(0), _completions(1)]
    assert gen.finished == [[False, True, False], [False, False, False]]
