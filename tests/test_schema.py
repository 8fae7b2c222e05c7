"""Strict parsers for peer data: envelopes, identity, types, finite numbers."""

from __future__ import annotations

import pytest

from sapod import schema
from sapod.errors import Rejected
from sapod.peers import PeerTable
from sapod.store import atomic_write_json
from sapod import paths


def rollouts(node="w1", round_=0, stage=0, **over):
    doc = schema.envelope(schema.ROLLOUTS, node, "i1", round_, stage, 1)
    doc.update(model="m", items=[{"task": "basic_arithmetic", "seed": 1, "index": 0, "question": "q",
                                  "answer": "a", "metadata": {}, "completions": ["x", "y"]}])
    doc.update(over)
    return doc


def submission(node="w1", **over):
    doc = schema.envelope(schema.REWARDS, node, "i1", 0, 0, 1)
    doc.update(reward_mean=0.5, reward_sum=4.0, n_completions=8, n_local=2, n_external=2, external_from=["w2"],
               cumulative_reward=1.5)
    doc.update(over)
    return doc


def test_valid_rollouts_parse():
    """A well-formed rollout file yields its items."""
    r = schema.parse_rollouts(rollouts(), "w1", 0, 0)
    assert r.items[0].completions == ("x", "y") and r.items[0].task == "basic_arithmetic"


@pytest.mark.parametrize("over,reason", [
    ({"schema": "sapod.rollouts/9"}, "schema"),
    ({"node_id": "w2"}, "disagrees with the file name"),
    ({"round": 5}, "disagree with the folder"),
    ({"items": "nope"}, "wrong type"),
    ({"items": [{"task": "t", "seed": 1, "index": 0, "question": "q", "answer": 3, "completions": ["a"]}]},
     "bad answer"),
    ({"items": [{"task": "t", "seed": -1, "index": 0, "question": "q", "answer": "a", "completions": ["a"]}]},
     "out of range"),
    ({"items": [{"task": "t", "seed": 1, "index": 0, "question": "q", "answer": "a", "completions": [1, 2]}]},
     "not a string"),
    ({"items": [{"task": "t", "seed": True, "index": 0, "question": "q", "answer": "a", "completions": ["a"]}]},
     "wrong type"),
])
def test_bad_rollouts_rejected(over, reason):
    """Wrong schema, identity, slot or types are rejected with a reason."""
    with pytest.raises(Rejected, match=reason):
        schema.parse_rollouts(rollouts(**over), "w1", 0, 0)


def test_submission_parse_and_reject():
    """Submissions parse; a non-finite or mistyped number is rejected."""
    assert schema.parse_submission(submission(), "w1", 0, 0).n_external == 2
    with pytest.raises(Rejected):
        schema.parse_submission(submission(reward_mean="0.5"), "w1", 0, 0)
    with pytest.raises(Rejected):
        schema.parse_submission(submission(external_from=["../x"]), "w1", 0, 0)


def test_state_round_trip():
    """The state pointer written by state_doc parses back unchanged."""
    s = schema.State(3, 0, 2, 9, "open", 1.5, "c", "inst")
    assert schema.parse_state(schema.state_doc(s)) == s
    bad = schema.state_doc(s) | {"status": "paused"}
    with pytest.raises(Rejected, match="unknown status"):
        schema.parse_state(bad)


def peer_doc(node, beat, instance="i1", status="running", role="worker"):
    doc = schema.envelope(schema.PEER, node, instance, 0, 0, 0)
    doc.update(role=role, model="m", host="h", pid=1, version="0", started_at=0.0, beat=beat, phase="p",
               status=status)
    return doc


def test_liveness_from_beat_counter_on_local_clock(tmp_path):
    """A peer is dead once its beat has not changed for PEER_TIMEOUT on our clock, whatever its timestamps."""
    now = [100.0]
    table = PeerTable(tmp_path, timeout=10, clock=lambda: now[0])
    atomic_write_json(paths.peer_file(tmp_path, "w1"), peer_doc("w1", 1))
    atomic_write_json(paths.peer_file(tmp_path, "w2"), peer_doc("w2", 1, status="stopped"))
    table.refresh()
    assert table.live() == {"w1"}
    now[0] = 109.0
    table.refresh()
    assert table.live() == {"w1"}
    now[0] = 111.0
    table.refresh()
    assert table.live() == set()
    atomic_write_json(paths.peer_file(tmp_path, "w1"), peer_doc("w1", 2))
    table.refresh()
    assert table.live() == {"w1"}


def test_bad_peer_files_are_skipped(tmp_path):
    """A torn or forged peer file is skipped, not fatal, and the others still count."""
    atomic_write_json(paths.peer_file(tmp_path, "w1"), peer_doc("w1", 1))
    paths.peer_file(tmp_path, "w2").write_text('{"schema": "sapod.peer/1", "node_')
    atomic_write_json(paths.peer_file(tmp_path, "w3"), peer_doc("w4", 1))
    table = PeerTable(tmp_path, timeout=10)
    table.refresh()
    assert table.live() == {"w1"}


def test_live_set_is_kept_until_a_refresh_or_a_deadline(tmp_path):
    """live() is answered from memory between refreshes, but never past the moment a peer
    would time out, and a refresh that sees a change is reflected at once."""
    now = [100.0]
    table = PeerTable(tmp_path, timeout=10, clock=lambda: now[0])
    atomic_write_json(paths.peer_file(tmp_path, "w1"), peer_doc("w1", 1))
    table.refresh()
    now[0] = 105.0
    atomic_write_json(paths.peer_file(tmp_path, "w2"), peer_doc("w2", 1))
    table.refresh()
    assert table.live() == {"w1", "w2"}
    now[0] = 109.9
    assert table.live() == {"w1", "w2"}
    now[0] = 110.0  # w1's beat has stood still for the timeout; no refresh in between
    assert table.live() == {"w2"}
    atomic_write_json(paths.peer_file(tmp_path, "w2"), peer_doc("w2", 2, status="stopped"))
    assert table.live() == {"w2"}  # not read yet
    table.refresh()
    assert table.live() == set() and table.live(None) == set()


# -- the optional per-completion "finished" flags ---------------------------------------

def _item(**over):
    it = {"task": "basic_arithmetic", "seed": 1, "index": 0, "question": "q", "answer": "a", "metadata": {},
          "completions": ["x", "y", "z"]}
    it.update(over)
    return it


def test_rollouts_finished_flags_round_trip():
    """rollouts_doc writes ``finished`` for an item where some completion ended with eos, and
    parse_rollouts reads it back; an item none of whose completions finished carries no field
    and reads back as none finished (()), as do files without it."""
    from sapod.gather import rollouts_doc
    from sapod.types import TaskItem

    items = [TaskItem("basic_arithmetic", 1, i, "q", "a") for i in range(3)]
    comps = [["x", "y", "z"]] * 3
    doc = rollouts_doc("w1", "i1", 0, 0, 1, "m", items, comps, [[True, False, True], [False] * 3, []])
    assert doc["items"][0]["finished"] == [True, False, True]
    assert "finished" not in doc["items"][1] and "finished" not in doc["items"][2]
    r = schema.parse_rollouts(doc, "w1", 0, 0)
    assert [i.finished for i in r.items] == [(True, False, True), (), ()]
    assert [i.completions for i in r.items] == [("x", "y", "z")] * 3
    plain = rollouts_doc("w1", "i1", 0, 0, 1, "m", items, comps)  # a policy that cannot tell
    assert all("finished" not in it for it in plain["items"])
    assert all(i.finished == () for i in schema.parse_rollouts(plain, "w1", 0, 0).items)
    with pytest.raises(ValueError):
        rollouts_doc("w1", "i1", 0, 0, 1, "m", items[:1], comps[:1], [[True]])


def test_old_format_rollouts_without_finished_parse():
    """A file of an older node (no ``finished`` anywhere) parses: nothing finished."""
    r = schema.parse_rollouts(rollouts(items=[_item()]), "w1", 0, 0)
    assert r.items[0].finished == () and r.items[0].completions == ("x", "y", "z")
    assert schema.parse_rollouts(rollouts(items=[_item(finished=[False] * 3)]), "w1", 0, 0).items[0].finished == ()


def test_unknown_item_and_file_keys_are_ignored():
    """The parser reads only the keys it knows, which is what lets an older node read a newer
    file: here a node that does not know ``finished`` stands for one that knows neither key."""
    doc = rollouts(items=[_item(finished=[True, False, False], later_field={"x": 1})], later_top=[1, 2])
    r = schema.parse_rollouts(doc, "w1", 0, 0)
    assert r.items[0].completions == ("x", "y", "z") and r.items[0].finished == (True, False, False)


@pytest.mark.parametrize("finished", [
    [True, False],  # too short
    [True, False, False, True],  # too long
    [1, 0, 0],  # numbers are not booleans
    [True, "no", False],
    "true",
    None,
    {"0": True},
])
def test_bad_finished_flags_are_rejected(finished):
    """``finished`` must be a list of booleans as long as ``completions``; anything else
    rejects the whole file, like any other malformed field."""
    with pytest.raises(Rejected, match="bad finished"):
        schema.parse_rollouts(rollouts(items=[_item(finished=finished)]), "w1", 0, 0)
