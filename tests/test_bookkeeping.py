"""Stateful property tests (Hypothesis) of the coordinator's round bookkeeping and of the state
pointer's readers.

``SwarmRounds`` drives ``RoundBook`` the way the coordinator does (rescans of the rewards folder,
``decide``, the tally, the next round, restarts) while workers submit, resubmit, post junk, die
and join. ``StatePointer`` drives ``StateReader`` against a coordinator that writes increasing
(epoch, seq) and a mount that sometimes shows an older, torn or missing file.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

from sapod import paths, schema, store
from sapod.errors import Rejected
from sapod.rounds import ALL_SUBMITTED, TIMED_OUT, RoundBook
from sapod.schema import Submission
from sapod.state import StateReader

MACHINE = settings(max_examples=60, stateful_step_count=40, deadline=None, derandomize=True, database=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])

NODES = ("w1", "w2", "w3", "w4")
TIMEOUT = 10.0
BAD = ("other_round", "other_stage", "foreign_node", "nan", "huge", "wrong_schema", "missing_field", "torn",
       "garbage", "not_object", "bad_external", "empty")


def submission(node: str, round_: int, stage: int, mean: float, instance: str = "i1") -> dict[str, Any]:
    """A worker's submission, as Worker._round builds it."""
    return schema.submission_doc(node, instance, round_, stage, 1, reward_mean=mean, reward_sum=mean * 8,
                                 n_completions=8, n_local=2, external_sources=["w9"],
                                 cumulative_reward=mean * (round_ + 1))


def bad_file(kind: str, node: str, round_: int, stage: int) -> bytes:
    good = submission(node, round_, stage, 0.5)
    if kind == "other_round":
        return store.dumps(submission(node, round_ + 1 if round_ == 0 else round_ - 1, stage, 0.5))
    if kind == "other_stage":
        return store.dumps(submission(node, round_, stage + 1, 0.5))
    if kind == "foreign_node":
        return store.dumps(submission("x" + node, round_, stage, 0.5))
    if kind == "nan":
        return json.dumps(good | {"reward_mean": math.nan}).encode()
    if kind == "huge":
        return json.dumps(good | {"reward_sum": 10**400}).encode()
    if kind == "wrong_schema":
        return store.dumps(good | {"schema": "sapod.rewards/2"})
    if kind == "missing_field":
        return store.dumps({k: v for k, v in good.items() if k != "n_local"})
    if kind == "torn":
        blob = store.dumps(good)
        return blob[: len(blob) // 2]
    if kind == "garbage":
        return b"\x00\xff garbage"
    if kind == "not_object":
        return b"[1, 2, 3]"
    if kind == "bad_external":
        return store.dumps(good | {"external_from": ["../etc"]})
    return b""


def read_as_coordinator(blob: bytes) -> dict[str, Any] | Rejected:
    """What Coordinator._collect hands to RoundBook.offer for a file's bytes."""
    if not blob:
        return Rejected("empty file")
    try:
        return store.parse_json_bytes(blob)
    except Rejected as exc:
        return exc


class SwarmRounds(RuleBasedStateMachine):
    """The rewards folder of the open round, the live set, the clock, and the coordinator's book."""

    def __init__(self) -> None:
        super().__init__()
        self.round, self.stage = 0, 0
        self.folder: dict[str, bytes] = {}  # node -> bytes the listing shows for the open round
        self.whole: set[str] = set()  # nodes whose file is a valid submission (write-once from then on)
        self.replaced: set[str] = set()  # nodes that wrote a second, different valid version
        self.live: set[str] = set()
        self.elapsed = 0.0
        self.closed_rounds = 0
        self._new_book()

    def _new_book(self) -> None:
        self.book = RoundBook(self.round, self.stage)
        self.first: dict[str, Submission] = {}  # the first valid submission this book was offered per node
        self.reasons: dict[str, list[str]] = {}  # every rejection reason of each node's files, in order

    def _offer(self, node: str, doc: Any) -> None:
        before = dict(self.book.accepted)
        reason = self.book.offer(node, doc)
        if node in before:
            assert reason is None and self.book.accepted == before  # counted once: later versions ignored
            return
        valid, why = None, doc.reason if isinstance(doc, Rejected) else None
        if isinstance(doc, dict):
            try:
                valid = schema.parse_submission(doc, node, self.round, self.stage)
            except Rejected as exc:
                why = exc.reason
        if doc is None:
            assert reason is None and node not in self.book.accepted
        elif valid is not None:
            assert reason is None and self.book.accepted[node] == valid
            self.first.setdefault(node, valid)
        else:
            assert node not in self.book.accepted and why
            seen = self.reasons.setdefault(node, [])
            assert reason in (None, why)
            if why not in seen:
                assert reason == why  # nothing rejected silently: each new reason is reported
            if why in seen:
                assert reason is None  # once per (node, reason), even when a file flaps between reasons
            seen.append(why)
        assert self.book.accepted.keys() - {node} == before.keys() - {node}

    # -- workers ------------------------------------------------------------------
    def _written(self, node: str, wake: bool) -> None:
        """The coordinator's watch fires for the file (not always: events are hints)."""
        if wake and not self.book.counted(node):
            self._offer(node, read_as_coordinator(self.folder[node]))

    @rule(node=st.sampled_from(NODES), mean=st.floats(0, 1), instance=st.sampled_from(["i1", "i2"]),
          wake=st.booleans())
    def submit(self, node: str, mean: float, instance: str, wake: bool) -> None:
        """A worker publishes its submission for the open round (or a retry rewrites the same)."""
        if node in self.whole:
            return
        self.folder[node] = store.dumps(submission(node, self.round, self.stage, mean, instance))
        self.whole.add(node)
        self._written(node, wake)

    @precondition(lambda self: self.whole)
    @rule(data=st.data(), mean=st.floats(0, 1), wake=st.booleans())
    def resubmit(self, data: st.DataObject, mean: float, wake: bool) -> None:
        """A second, different version under the same name: must be ignored once the first counted."""
        node = data.draw(st.sampled_from(sorted(self.whole)))
        blob = store.dumps(submission(node, self.round, self.stage, mean, "i-again"))
        if blob != self.folder[node]:
            self.folder[node] = blob
            self.replaced.add(node)
            self._written(node, wake)

    @rule(node=st.sampled_from(NODES), kind=st.sampled_from(BAD), wake=st.booleans())
    def submit_bad(self, node: str, kind: str, wake: bool) -> None:
        """A torn, foreign, mis-slotted or hostile file where a submission is not (yet) whole."""
        if node not in self.whole:
            self.folder[node] = bad_file(kind, node, self.round, self.stage)
            self._written(node, wake)

    @rule(node=st.sampled_from(NODES))
    def join(self, node: str) -> None:
        self.live.add(node)

    @rule(node=st.sampled_from(NODES))
    def die(self, node: str) -> None:
        self.live.discard(node)

    @rule(dt=st.sampled_from([0.0, 0.5, 3.0, TIMEOUT]))
    def time_passes(self, dt: float) -> None:
        self.elapsed += dt

    # -- the coordinator ------------------------------------------------------------
    @rule(data=st.data(), recheck=st.booleans())
    def rescan(self, data: st.DataObject, recheck: bool) -> None:
        """Coordinator._collect: every listed file, in whatever order the listing gives."""
        for node in data.draw(st.permutations(sorted(self.folder))):
            if self.book.counted(node) and not recheck:
                continue
            self._offer(node, read_as_coordinator(self.folder[node]))

    @rule(node=st.sampled_from(NODES))
    def not_there_yet(self, node: str) -> None:
        self._offer(node, None)

    @precondition(lambda self: self.book.decide(self.live, self.elapsed, TIMEOUT) is not None)
    @rule(epoch=st.integers(1, 5))
    def close_round(self, epoch: int) -> None:
        """Advance: the last look, the tally (parsed back), then a new book for the next round."""
        self.rescan_all()
        reason = self.book.decide(self.live, self.elapsed, TIMEOUT)
        assert reason in (ALL_SUBMITTED, TIMED_OUT) and self.book.accepted  # never an empty round
        doc = self.book.tally(live=self.live, reason=reason, coordinator="coord", instance="ci", epoch=epoch,
                              seconds=self.elapsed, collected_at=1000.0, closed_at=1001.0)
        assert sorted(doc["counted"]) == sorted(self.book.accepted)
        assert doc["missing"] == sorted(self.live - self.book.accepted.keys())
        tally = schema.parse_tally(store.parse_json_bytes(store.dumps(doc)), self.round, self.stage)
        assert tally.counted == {n: s.reward_mean for n, s in self.first.items()}
        assert set(tally.missing) == self.live - set(tally.counted) and tally.reason == reason
        assert (tally.epoch, tally.coordinator, tally.seconds) == (epoch, "coord", self.elapsed)
        with pytest.raises(Rejected):  # a tally is only ever read for its own round
            schema.parse_tally(doc, self.round + 1, self.stage)
        self.round += 1
        self.closed_rounds += 1
        self.folder, self.whole, self.replaced, self.elapsed = {}, set(), set(), 0.0
        self._new_book()

    def rescan_all(self) -> None:
        for node in sorted(self.folder):
            if not self.book.counted(node):
                self._offer(node, read_as_coordinator(self.folder[node]))

    @rule()
    def coordinator_restarts(self) -> None:
        """A new coordinator (new book, fresh clock) re-offers every file present: it counts the
        same set as the old one had after its own last look."""
        self.rescan_all()
        old = dict(self.book.accepted)
        self._new_book()
        self.elapsed = 0.0
        self.rescan_all()
        assert self.book.accepted.keys() == old.keys()
        for node, sub in old.items():
            if node not in self.replaced:
                assert self.book.accepted[node] == sub

    # -- invariants -------------------------------------------------------------------
    @invariant()
    def counted_once_with_the_first_valid_version(self) -> None:
        assert self.book.accepted == self.first
        assert all(sub.node_id == node for node, sub in self.book.accepted.items())
        assert all(self.book.counted(n) == (n in self.book.accepted) for n in NODES)

    @invariant()
    def decide_follows_the_rules(self) -> None:
        acc = self.book.accepted.keys()
        for elapsed in (self.elapsed, 0.0, TIMEOUT - 1e-9, TIMEOUT, TIMEOUT + 1):
            got = self.book.decide(set(self.live), elapsed, TIMEOUT)
            if not acc:
                assert got is None  # an empty round never closes
            elif self.live and self.live <= acc:
                assert got == ALL_SUBMITTED
            elif elapsed >= TIMEOUT:
                assert got == TIMED_OUT
            else:
                assert got is None

    @invariant()
    def mean_reward_is_the_mean_of_counted(self) -> None:
        means = [s.reward_mean for s in self.book.accepted.values()]
        assert self.book.mean_reward() == pytest.approx(sum(means) / len(means) if means else 0.0)


TestSwarmRounds = SwarmRounds.TestCase
TestSwarmRounds.settings = MACHINE


def test_offer_reports_each_reason_once_even_when_a_file_flaps():
    book = RoundBook(0, 0)
    reported = [book.offer("w1", read_as_coordinator(bad_file(kind, "w1", 0, 0)))
                for kind in ("torn", "nan", "torn", "nan")]
    assert reported[:2] == [read_as_coordinator(bad_file("torn", "w1", 0, 0)).reason,
                            read_as_coordinator(bad_file("nan", "w1", 0, 0)).reason]
    assert reported[2:] == [None, None]


class StatePointer(RuleBasedStateMachine):
    """A coordinator writes increasing (epoch, seq); a stale mount sometimes shows an older file,
    a torn one or none. Every reader only ever moves forward."""

    def __init__(self) -> None:
        super().__init__()
        self.tmp = Path(tempfile.mkdtemp(prefix="sapod-state-"))
        self.file = paths.state_file(self.tmp)
        self.history: list[schema.State] = []  # every state any coordinator wrote, in write order
        self.newest: schema.State | None = None  # the real coordinator's latest
        self.shown: schema.State | None = None  # what the file holds now, when valid
        self.readers: list[tuple[StateReader, list[schema.State | None]]] = []

    @initialize(trust_stat=st.booleans())
    def start(self, trust_stat: bool) -> None:
        self.readers.append((StateReader(self.tmp, trust_stat=False), []))
        self.readers.append((StateReader(self.tmp, trust_stat=trust_stat), []))

    def teardown(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _show(self, s: schema.State) -> None:
        store.atomic_write_json(self.file, schema.state_doc(s), durable=False)
        self.shown = s

    def _write(self, s: schema.State) -> None:
        assert self.newest is None or s.order > self.newest.order
        self.history.append(s)
        self.newest = s
        self._show(s)

    @rule(finish=st.booleans())
    def coordinator_advances(self, finish: bool) -> None:
        n = self.newest
        if n is None:
            self._write(schema.State(0, 0, 1, 1, "open", 1.0, "c1", "i1"))
        else:
            self._write(schema.State(n.round + 1, 0, n.epoch, n.seq + 1, "finished" if finish else "open",
                                     n.opened_at + 1, n.coordinator, n.instance))

    @rule(node=st.sampled_from(["c1", "c2"]))
    def coordinator_takes_over(self, node: str) -> None:
        n = self.newest or schema.State(0, 0, 0, 0, "open", 0.0, node, "i0")
        self._write(schema.State(n.round, n.stage, n.epoch + 1, n.seq + 1, "open", n.opened_at, node,
                                 f"{node}-{n.epoch + 1}"))

    @precondition(lambda self: self.history)
    @rule(data=st.data())
    def stale_mount_shows_an_older_file(self, data: st.DataObject) -> None:
        self._show(data.draw(st.sampled_from(self.history)))

    @precondition(lambda self: self.newest is not None and self.newest.epoch > 0)
    @rule(ahead=st.integers(1, 100))
    def paused_old_coordinator_writes(self, ahead: int) -> None:
        """Kleppmann's paused leader: an older epoch with a higher seq, written after a takeover."""
        n = self.newest
        assert n is not None
        stale = schema.State(n.round + 5, 0, n.epoch - 1, n.seq + ahead, "open", 0.0, "old", "old-i")
        self.history.append(stale)
        self._show(stale)

    @rule(cut=st.integers(0, 300), junk=st.sampled_from([b"", b"\x00" * 8, b"NaN", b"{}", b"[]"]))
    def torn_or_garbage(self, cut: int, junk: bytes) -> None:
        blob = store.dumps(schema.state_doc(self.newest or schema.State(9, 9, 9, 9, "open", 0.0, "c", "i")))
        store.atomic_write_bytes(self.file, blob[: cut % len(blob)] + junk, durable=False)
        self.shown = None

    @rule()
    def file_vanishes(self) -> None:
        self.file.unlink(missing_ok=True)
        self.shown = None

    @precondition(lambda self: self.newest is not None)
    @rule()
    def mount_catches_up(self) -> None:
        assert self.newest is not None
        self._show(self.newest)

    @rule()
    def a_node_starts_reading(self) -> None:
        self.readers.append((StateReader(self.tmp), []))

    @rule()
    def read(self) -> None:
        for reader, seen in self.readers:
            got = reader.read()
            if seen and seen[-1] is not None:
                assert got is not None and got.order >= seen[-1].order, (got, seen[-1])
            assert got is None or got in self.history  # never a state nobody wrote
            if not reader.trust_stat and self.shown is not None and (
                    not seen or seen[-1] is None or self.shown.order >= seen[-1].order):
                assert got == self.shown  # re-reading each time: nothing newer is missed
            seen.append(got)

    @invariant()
    def readers_never_went_backwards(self) -> None:
        for reader, seen in self.readers:
            orders = [s.order for s in seen if s is not None]
            assert orders == sorted(orders)
            assert all(s is not None for s in seen[next((i for i, s in enumerate(seen) if s), len(seen)):])
            if seen:
                assert reader.current == seen[-1]


TestStatePointer = StatePointer.TestCase
TestStatePointer.settings = settings(MACHINE, max_examples=40, stateful_step_count=30)


def test_readers_of_a_process_read_each_version_of_the_pointer_once(tmp_path: Path) -> None:
    """On a local disk the nodes of a process share what one version of the file held; a
    new version is read again, a bad one is refused by every reader, and each reader still
    never moves backwards."""
    readers = [StateReader(tmp_path, trust_stat=True) for _ in range(5)]
    file = paths.state_file(tmp_path)
    first = schema.State(0, 0, 1, 1, "open", 1.0, "c1", "i1")
    store.atomic_write_json(file, schema.state_doc(first), durable=False)
    reads = store.IO["reads"]
    assert [r.read() for r in readers] == [first] * 5
    assert store.IO["reads"] - reads == 1

    second = schema.State(1, 0, 1, 2, "open", 2.0, "c1", "i1")
    store.atomic_write_json(file, schema.state_doc(second), durable=False)
    assert [r.read() for r in readers[:3]] == [second] * 3
    assert store.IO["reads"] - reads == 2
    store.atomic_write_bytes(file, b'{"torn', durable=False)  # readers 3 and 4 never saw `second`
    assert [r.read() for r in readers] == [second] * 3 + [first] * 2
    assert store.IO["reads"] - reads == 3
    assert all(r._last_reason is not None and r._last_reason.startswith("not valid JSON") for r in readers)

    file.unlink()  # gone: nothing is shared, each reader keeps what it had
    assert [r.read() for r in readers] == [second] * 3 + [first] * 2
    older = schema.State(0, 0, 1, 1, "open", 1.0, "c1", "i1")  # a stale copy shown again
    store.atomic_write_json(file, schema.state_doc(older), durable=False)
    assert [r.read() for r in readers] == [second] * 3 + [first] * 2
