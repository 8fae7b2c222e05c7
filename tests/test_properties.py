"""Property tests (Hypothesis) for every parser of data read from the shared folder.

Everything in that folder comes from peers that may crash mid-write, run other
versions or be hostile (DESIGN.md section 3, RELIABILITY.md). The property each
reader must keep: for ANY input it returns a value that meets its documented
constraints, or rejects it (``Rejected`` with a reason, or "not there yet") --
never any other exception, never a NaN, never a value that cannot be written back.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import math
import os
import random
import re
import shutil
import tempfile
import threading
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from sapod import paths, progress, schema, store
from sapod.checkpoint import COUNTERS, read_counters
from sapod.errors import Rejected
from sapod.gather import GatherResult, list_peer_rollouts, load_peer_rollouts, rollouts_doc
from sapod.peers import GONE, PeerTable
from sapod.rounds import ALL_SUBMITTED, TIMED_OUT, RoundBook
from sapod.state import StateReader
from sapod.taskbase import MAX_COMPLETION_CHARS
from sapod.types import TaskItem

# Reproducible in CI (derandomize), no example database written into the tree, no
# per-example deadline (file I/O on a busy CI box is slow now and then).
PROPS = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                        HealthCheck.filter_too_much])
FILES = settings(PROPS, max_examples=60)  # each example writes real files
FEW = settings(PROPS, max_examples=40)  # each example regenerates reasoning-gym items


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is per test, not per example)."""
    with tempfile.TemporaryDirectory(prefix="sapod-prop-") as d:
        yield Path(d)


# -- strategies -------------------------------------------------------------------

NODE_ID = st.from_regex(store.NODE_ID_PATTERN, fullmatch=True).filter(lambda s: not s.endswith(".json"))
INSTANCE = st.text(max_size=64)
U63 = st.integers(0, 2**63)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
HUGE_INTS = [2**63 + 1, 10**400, -(10**400), 10**4000]  # all within JSON's 4300-digit limit
JUNK = st.sampled_from([
    None, True, False, 0, -1, -(2**63), *HUGE_INTS, math.nan, math.inf, -math.inf, 1e308, -0.0, "", "NaN",
    "x" * (schema.MAX_TEXT + 1), [], {}, [None], {"reward_mean": math.nan}, [[[[[]]]]], "\u0000", "w1\n",
])
FIELDS = sorted({
    "schema", "node_id", "instance", "round", "stage", "epoch", "seq", "status", "opened_at", "coordinator",
    "role", "beat", "phase", "started_at", "model", "host", "pid", "items", "task", "seed", "index",
    "question", "answer", "completions", "reward_mean", "reward_sum", "n_completions", "n_local",
    "n_external", "external_from", "cumulative_reward", "reason", "counted", "missing", "collected_at",
    "closed_at", "seconds", "protocol", "settings",
})
SCALAR = (st.none() | st.booleans() | st.integers() | st.integers(-(10**500), 10**500) | st.floats()
          | st.text(max_size=16) | JUNK)
KEY = st.sampled_from(FIELDS) | st.text(max_size=8)
JSONLIKE = st.recursive(SCALAR, lambda c: st.lists(c, max_size=4) | st.dictionaries(KEY, c, max_size=5),
                        max_leaves=12)
FINITE_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | FINITE | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=6), c, max_size=3), max_leaves=8)
LONE_SURROGATES = st.text(st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF, categories=["Cs"]),
                          min_size=1, max_size=3)


@dataclasses.dataclass
class Case:
    """A valid document as a real builder writes it, where it sits, and what it parses to."""

    kind: str
    doc: dict[str, Any]
    expect: Any
    node: str = "w1"
    round: int = 0
    stage: int = 0


IDENTITY = {  # fields that must agree with the file's name/folder (schema: with the file kind)
    "state": ("schema",), "peer": ("schema", "node_id"), "experiment": ("schema",),
    "rollouts": ("schema", "node_id", "round", "stage"), "submission": ("schema", "node_id", "round", "stage"),
    "tally": ("schema", "round", "stage"),
}


def parse(c: Case, doc: Any) -> Any:
    if c.kind == "state":
        return schema.parse_state(doc)
    if c.kind == "peer":
        return schema.parse_peer(doc, c.node)
    if c.kind == "rollouts":
        return schema.parse_rollouts(doc, c.node, c.round, c.stage)
    if c.kind == "submission":
        return schema.parse_submission(doc, c.node, c.round, c.stage)
    if c.kind == "tally":
        return schema.parse_tally(doc, c.round, c.stage)
    if c.kind == "experiment":
        return schema.parse_experiment(doc)
    raise AssertionError(c.kind)


@st.composite
def valid_state(draw: Any) -> Case:
    s = schema.State(round=draw(U63), stage=draw(U63), epoch=draw(U63), seq=draw(U63),
                     status=draw(st.sampled_from(["open", "finished"])), opened_at=draw(FINITE),
                     coordinator=draw(NODE_ID), instance=draw(INSTANCE))
    return Case("state", schema.state_doc(s), s)


@st.composite
def valid_peer(draw: Any) -> Case:
    node, instance, round_ = draw(NODE_ID), draw(INSTANCE), draw(st.integers(-1, 2**63))
    p = schema.Peer(node_id=node, instance=instance, role=draw(st.sampled_from(["worker", "coordinator"])),
                    beat=draw(U63), round=round_, phase=draw(st.text(max_size=32)),
                    status=draw(st.sampled_from(["running", "stopped", "degraded", "finished"])),
                    started_at=draw(FINITE), model=draw(st.text(max_size=512)), host=draw(st.text(max_size=256)),
                    pid=draw(st.integers(0, 2**22)))
    # The shape Node._peer_doc writes.
    doc = schema.envelope(schema.PEER, node, instance, round_, 0, 0)
    doc.update(role=p.role, model=p.model, host=p.host, pid=p.pid, version="0.1", started_at=p.started_at,
               beat=p.beat, phase=p.phase, status=p.status)
    return Case("peer", doc, p, node=node)


def _slot(draw: Any, node: str | None, round_: int | None, stage: int | None) -> tuple[str, int, int]:
    """The (node, round, stage) a file is for: the given ones, drawn where not given."""
    return (draw(NODE_ID) if node is None else node, draw(st.integers(0, 10**6)) if round_ is None else round_,
            draw(st.integers(0, 3)) if stage is None else stage)


@st.composite
def valid_rollouts(draw: Any, node: str | None = None, round_: int | None = None,
                   stage: int | None = None) -> Case:
    node, round_, stage = _slot(draw, node, round_, stage)
    instance, model = draw(INSTANCE), draw(st.text(max_size=40))
    n = draw(st.integers(0, 3))
    items = [TaskItem(task=draw(st.text(max_size=20)), seed=draw(U63), index=draw(st.integers(0, 10**6)),
                      question=draw(st.text(max_size=40)), answer=draw(st.none() | st.text(max_size=10)),
                      metadata=draw(st.dictionaries(st.text(max_size=5), FINITE_JSON, max_size=2)))
             for _ in range(n)]
    comps = [draw(st.lists(st.text(max_size=30), min_size=1, max_size=4)) for _ in range(n)]
    doc = rollouts_doc(node, instance, round_, stage, draw(U63), model, items, comps)
    expect = schema.Rollouts(node_id=node, instance=instance, model=model, items=tuple(
        schema.ClaimedItem(it.task, it.seed, it.index, it.question, it.answer, tuple(c))
        for it, c in zip(items, comps)))
    return Case("rollouts", doc, expect, node=node, round=round_, stage=stage)


@st.composite
def valid_submission(draw: Any, node: str | None = None, round_: int | None = None,
                     stage: int | None = None) -> Case:
    node, round_, stage = _slot(draw, node, round_, stage)
    instance = draw(INSTANCE)
    ext = sorted(set(draw(st.lists(NODE_ID, max_size=3))))
    mean, total, cum = draw(FINITE), draw(FINITE), draw(FINITE)
    n, n_local = draw(st.integers(0, 10**4)), draw(st.integers(0, 64))
    doc = schema.submission_doc(node, instance, round_, stage, draw(U63), reward_mean=mean, reward_sum=total,
                                n_completions=n, n_local=n_local, external_sources=ext, cumulative_reward=cum)
    expect = schema.Submission(node_id=node, instance=instance, reward_mean=mean, reward_sum=total,
                               n_completions=n, n_local=n_local, n_external=len(ext), external_from=tuple(ext),
                               cumulative_reward=cum)
    return Case("submission", doc, expect, node=node, round=round_, stage=stage)


@st.composite
def valid_tally(draw: Any) -> Case:
    round_, stage = draw(st.integers(0, 10**6)), draw(st.integers(0, 3))
    book = RoundBook(round_, stage)
    for node in draw(st.lists(NODE_ID, max_size=4, unique=True)):
        assert book.offer(node, draw(valid_submission(node, round_, stage)).doc) is None
    live = set(draw(st.lists(NODE_ID, max_size=4)))
    coord, instance, epoch = draw(NODE_ID), draw(INSTANCE), draw(U63)
    reason = draw(st.sampled_from([ALL_SUBMITTED, TIMED_OUT]))
    seconds, collected, closed = draw(FINITE), draw(FINITE), draw(FINITE)
    doc = book.tally(live=live, reason=reason, coordinator=coord, instance=instance, epoch=epoch,
                     seconds=seconds, collected_at=collected, closed_at=closed)
    expect = schema.Tally(round=round_, stage=stage, epoch=epoch, coordinator=coord, reason=reason,
                          counted={n: s.reward_mean for n, s in book.accepted.items()},
                          missing=tuple(sorted(live - book.accepted.keys())), seconds=seconds, collected_at=collected,
                          closed_at=closed)
    return Case("tally", doc, expect, round=round_, stage=stage)


@st.composite
def valid_experiment(draw: Any) -> Case:
    settings_ = draw(st.dictionaries(st.text(max_size=8), FINITE_JSON, max_size=4))
    doc = {"schema": schema.EXPERIMENT, "protocol": draw(st.integers(0, 100)), "created_at": draw(FINITE),
           "created_by": {"node_id": draw(NODE_ID), "instance": draw(INSTANCE)}, "settings": settings_}
    return Case("experiment", doc, settings_)


VALID = st.one_of(valid_state(), valid_peer(), valid_rollouts(), valid_submission(), valid_tally(),
                  valid_experiment())
KINDS = ["state", "peer", "rollouts", "submission", "tally", "experiment"]


# -- what "accepted" promises -------------------------------------------------------

def _text(v: Any, n: int) -> bool:
    return type(v) is str and len(v) <= n


def _int(v: Any, lo: int = 0, hi: int = 2**63) -> bool:
    return type(v) is int and lo <= v <= hi


def _finite(v: Any) -> bool:
    return type(v) is float and math.isfinite(v)


def assert_sane(c: Case, res: Any) -> None:
    """The documented constraints of what a parser returns (identity equals the name, ...)."""
    if c.kind == "state":
        assert isinstance(res, schema.State)
        assert all(_int(getattr(res, f)) for f in ("round", "stage", "epoch", "seq"))
        assert res.status in ("open", "finished") and _finite(res.opened_at)
        assert _text(res.coordinator, 64) and _text(res.instance, 64)
    elif c.kind == "peer":
        assert isinstance(res, schema.Peer) and res.node_id == c.node
        assert res.role in ("worker", "coordinator") and _int(res.beat) and _int(res.round, -1) and _int(res.pid)
        assert _text(res.instance, 64) and _text(res.phase, 32) and _text(res.status, 16)
        assert _text(res.model, 512) and _text(res.host, 256) and _finite(res.started_at)
    elif c.kind == "rollouts":
        assert isinstance(res, schema.Rollouts) and res.node_id == c.node
        assert _text(res.instance, 64) and _text(res.model, 512) and len(res.items) <= schema.MAX_ITEMS
        for it in res.items:
            assert _text(it.task, 128) and _int(it.seed) and _int(it.index, 0, 10**6)
            assert _text(it.question, schema.MAX_TEXT)
            assert it.answer is None or _text(it.answer, schema.MAX_TEXT)
            assert 1 <= len(it.completions) <= schema.MAX_COMPLETIONS
            assert all(_text(x, schema.MAX_TEXT) for x in it.completions)
    elif c.kind == "submission":
        assert isinstance(res, schema.Submission) and res.node_id == c.node and _text(res.instance, 64)
        assert _finite(res.reward_mean) and _finite(res.reward_sum) and _finite(res.cumulative_reward)
        assert _int(res.n_completions) and _int(res.n_local) and _int(res.n_external)
        assert len(res.external_from) <= 4096 and all(store.valid_node_id(x) for x in res.external_from)
    elif c.kind == "tally":
        assert isinstance(res, schema.Tally) and (res.round, res.stage) == (c.round, c.stage)
        assert _int(res.epoch) and _text(res.coordinator, 64) and _text(res.reason, 32)
        assert _finite(res.seconds) and _finite(res.collected_at) and _finite(res.closed_at)
        assert all(store.valid_node_id(n) and _finite(v) for n, v in res.counted.items())
        assert all(store.valid_node_id(n) for n in res.missing)
    else:
        assert isinstance(res, dict)


def through_bytes(c: Case, data: bytes) -> Any:
    """The reader's pipeline for one file's bytes: parsed value, or None when Rejected."""
    try:
        res = parse(c, store.parse_json_bytes(data))
    except Rejected as exc:
        assert isinstance(exc.reason, str) and exc.reason
        return None
    assert_sane(c, res)
    # Whatever a node accepts may be written back into the folder (a tally names the
    # instances it counted; logs and metrics repeat peers' fields): it must serialize.
    store.dumps(dataclasses.asdict(res) if dataclasses.is_dataclass(res) else res)
    return res


def _paths(v: Any, prefix: tuple = ()) -> list[tuple]:
    items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
    out: list[tuple] = []
    for k, x in items:
        out.append(prefix + (k,))
        out.extend(_paths(x, prefix + (k,)))
    return out


def _variants(value: Any) -> list[Any]:
    """Type changes and edge values for one field."""
    out = [None, True, False, -1, *HUGE_INTS, math.nan, math.inf, -math.inf, "", "x" * (schema.MAX_TEXT + 1),
           [], {}, [value], {"v": value}, str(value)[:64]]
    if type(value) is int:
        out += [-value - 1, value + 1, value * 2**64, bool(value % 2)]
        if abs(value) < 2**1000:
            out.append(float(value))
    elif type(value) is float:
        out += [int(value) if math.isfinite(value) else 0, -value, value * 1e308]
    elif type(value) is str:
        out += [value + "x", value * 2 + "y" * 300, value.upper(), value + "\n"]
    return out


@st.composite
def mutated(draw: Any, c: Case) -> dict[str, Any]:
    doc = copy.deepcopy(c.doc)
    for _ in range(draw(st.integers(1, 3))):
        where = _paths(doc)
        if not where:
            break
        p = draw(st.sampled_from(where))
        parent = doc
        for k in p[:-1]:
            parent = parent[k]
        action = draw(st.sampled_from(["drop", "variant", "junk", "extra"]))
        if action == "drop":
            del parent[p[-1]]
        elif action == "variant":
            parent[p[-1]] = copy.deepcopy(draw(st.sampled_from(_variants(parent[p[-1]]))))
        elif action == "junk":
            parent[p[-1]] = copy.deepcopy(draw(JSONLIKE))  # JUNK's constants are shared
        elif isinstance(parent, dict):  # unknown fields are allowed: later versions add some
            parent[draw(KEY)] = copy.deepcopy(draw(JSONLIKE))
    return doc


def outcome(c: Case, doc: Any) -> Any:
    """Parse a dict directly: the value (checked), or None when Rejected; nothing else escapes."""
    try:
        res = parse(c, doc)
    except Rejected as exc:
        assert isinstance(exc.reason, str) and exc.reason and str(exc)
        return None
    assert_sane(c, res)
    return res


# -- schema: round trips of what real builders write ------------------------------

@PROPS
@given(VALID)
def test_builders_round_trip(c):
    """Documents built by envelope/state_doc/rollouts_doc/the worker/RoundBook.tally parse back equal."""
    assert parse(c, c.doc) == c.expect
    assert parse(c, store.parse_json_bytes(store.dumps(c.doc))) == c.expect
    assert through_bytes(c, json.dumps(c.doc).encode()) == c.expect  # ASCII-escaped, as other writers do


# -- schema: any JSON-like value, any mutation of a valid document ----------------

@PROPS
@given(st.sampled_from(KINDS), st.dictionaries(KEY, JSONLIKE, max_size=8), NODE_ID)
def test_any_json_object_is_parsed_or_rejected(kind, doc, node):
    """An arbitrary object (NaN, inf, huge ints, nesting, wrong types) never raises past Rejected."""
    outcome(Case(kind, {}, None, node=node), doc)


@PROPS
@given(st.sampled_from(KINDS), JSONLIKE)
def test_any_json_value_through_the_byte_pipeline(kind, value):
    """Any value serialized (NaN/Infinity included) through parse_json_bytes + parser: value or Rejected."""
    data = json.dumps(value, allow_nan=True).encode()
    res = through_bytes(Case(kind, {}, None), data)
    if not isinstance(value, dict):
        assert res is None  # the top level must be an object
    if any(isinstance(v, float) and not math.isfinite(v) for v in _walk(value)):
        with pytest.raises(Rejected):  # NaN/Infinity constants never get through
            store.parse_json_bytes(data)


@PROPS
@given(VALID, st.data())
def test_mutated_documents_are_parsed_or_rejected(c, data):
    """Drop a key, change a type, NaN/inf/huge/negative/bool/long/nested junk: value or Rejected."""
    outcome(c, data.draw(mutated(c)))


@PROPS
@given(VALID, st.data())
def test_every_edge_value_in_any_field_is_parsed_or_rejected(c, data):
    """One field (at any depth) takes each edge value in turn: huge ints, NaN, inf, bools, types."""
    where = _paths(c.doc)
    assume(where)
    p = data.draw(st.sampled_from(where))
    for v in _variants(_at(c.doc, p)):
        doc = copy.deepcopy(c.doc)
        _set(doc, p, copy.deepcopy(v))
        res = outcome(c, doc)
        if res is not None and isinstance(v, float) and not math.isfinite(v):
            assert c.kind == "experiment" or res == c.expect  # NaN/inf only in a field no parser reads


@PROPS
@given(VALID, st.data())
def test_identity_disagreeing_with_the_name_is_rejected(c, data):
    """A file whose schema/node_id/round/stage disagree with its kind, name or folder is rejected."""
    field = data.draw(st.sampled_from(IDENTITY[c.kind]))
    old = c.doc[field]
    if field == "node_id":
        new = data.draw(NODE_ID.filter(lambda n: n != old) | st.sampled_from([old + "\n", old.upper() + "x", None]))
    elif field == "schema":
        new = data.draw(st.sampled_from([old.replace("/1", "/2"), old.upper(), "", None, [old], old + " "]))
    else:
        new = data.draw(st.integers(-5, 10**6).filter(lambda v: v != old)
                        | st.sampled_from([float(old), str(old), None, [old], old == 1]))
    doc = copy.deepcopy(c.doc)
    doc[field] = new
    assume(new != old or type(new) is not type(old))
    with pytest.raises(Rejected) as exc:
        parse(c, doc)
    assert exc.value.reason
    doc.pop(field)
    with pytest.raises(Rejected):
        parse(c, doc)


# -- schema at the byte level: truncation, torn writes, bit flips, junk -------------

def _serialized(c: Case, ascii_: bool) -> bytes:
    return json.dumps(c.doc, ensure_ascii=ascii_, separators=(",", ":")).encode()


@PROPS
@given(VALID, st.booleans(), st.data())
def test_truncated_or_torn_files_are_rejected(c, ascii_, data):
    """A strict prefix of a file (a crash mid-write), NUL-padded or not, is never accepted."""
    blob = _serialized(c, ascii_)
    cut = data.draw(st.integers(0, len(blob) - 1))
    pad = data.draw(st.sampled_from([b"", b"\x00" * 16, b"\n"]))
    assert through_bytes(c, blob[:cut] + pad) is None


@PROPS
@given(VALID, st.booleans(), st.data())
def test_bit_flips_parse_equal_or_are_rejected(c, ascii_, data):
    """One flipped bit: the same value (if the JSON is unchanged), another sane value, or Rejected."""
    blob = bytearray(_serialized(c, ascii_))
    i = data.draw(st.integers(0, len(blob) - 1))
    blob[i] ^= 1 << data.draw(st.integers(0, 7))
    res = through_bytes(c, bytes(blob))
    try:
        same = json.loads(bytes(blob)) == c.doc
    except (ValueError, RecursionError):
        same = False
    if same:
        assert res == c.expect


@PROPS
@given(VALID, st.data())
def test_spliced_junk_parses_sanely_or_is_rejected(c, data):
    """Random bytes overwritten or inserted anywhere in a valid file."""
    blob = _serialized(c, data.draw(st.booleans()))
    i = data.draw(st.integers(0, len(blob)))
    junk = data.draw(st.binary(min_size=1, max_size=12) | st.sampled_from(
        [b"NaN", b"Infinity", b"-Infinity", b"1e999", b"\xff\xfe", b"\\ud800", b'"', b"}", b"{", b"[" * 50]))
    keep = data.draw(st.booleans())
    through_bytes(c, blob[:i] + junk + blob[i + (0 if keep else len(junk)):])


@PROPS
@given(st.sampled_from(KINDS), st.binary(max_size=300))
def test_arbitrary_bytes_are_rejected_or_sane(kind, blob):
    through_bytes(Case(kind, {}, None), blob)


@PROPS
@given(VALID, LONE_SURROGATES, st.data())
def test_unpaired_surrogate_escapes_never_get_through(c, bad, data):
    """A peer's ``"\\ud800"`` escape decodes to a str no UTF-8 writer can encode: the file is rejected
    (else the coordinator's tally, or a tokenizer, fails on it later)."""
    doc = copy.deepcopy(c.doc)
    strings = [p for p in _paths(doc) if isinstance(_at(doc, p), str)]
    assume(strings)
    p = data.draw(st.sampled_from(strings))
    _set(doc, p, _at(doc, p) + bad)
    res = through_bytes(c, json.dumps(doc).encode())  # ensure_ascii: the surrogate travels escaped
    if res is not None:  # accepted only where the field is ignored
        assert res == c.expect


def _at(doc: Any, p: tuple) -> Any:
    for k in p:
        doc = doc[k]
    return doc


def _set(doc: Any, p: tuple, value: Any) -> None:
    _at(doc, p[:-1])[p[-1]] = value


def test_deep_nesting_is_rejected_not_a_recursion_error():
    """Nesting at and just under the JSON parser's limit, in every field a parser formats."""
    depths = [1, 50, *range(900, 1001)]
    for kind in KINDS:
        for field in ("schema", "node_id", "round", "stage", "items", "coordinator", "counted"):
            for n in depths:
                base = {"schema": getattr(schema, kind.upper(), schema.ROLLOUTS) if kind != "submission"
                        else schema.REWARDS, "node_id": "w1", "instance": "i", "round": 1, "stage": 0}
                blob = json.dumps(base).encode()[:-1] + f',"{field}":'.encode() + b"[" * n + b"]" * n + b"}"
                assert through_bytes(Case(kind, {}, None), blob) is None


# -- parse_json_bytes ---------------------------------------------------------------

def _walk(v: Any) -> Iterator[Any]:
    yield v
    if isinstance(v, dict):
        for k, x in v.items():
            yield k
            yield from _walk(x)
    elif isinstance(v, list):
        for x in v:
            yield from _walk(x)


@PROPS
@given(st.binary(max_size=200) | JSONLIKE.map(lambda v: json.dumps(v, allow_nan=True).encode()))
@example(b'{"a": NaN}')
@example(b'{"a": [1, -Infinity]}')
@example(b"\xef\xbb\xbf{}")
@example(b'{"a": "\xff"}')
@example(b"[" * 100_000)
@example(b"1" * 5000)
@example(b'{"a": "\\udc00"}')
def test_parse_json_bytes_gives_a_finite_object_or_rejects(blob):
    try:
        obj = store.parse_json_bytes(blob)
    except Rejected as exc:
        assert exc.reason
        return
    assert isinstance(obj, dict)
    for v in _walk(obj):
        assert not (isinstance(v, float) and not math.isfinite(v))
    store.dumps(obj)  # no NaN, no unencodable string: it can be written back


# -- valid_node_id, list_node_files / list_node_entries ----------------------------

@PROPS
@given(st.text(max_size=70) | NODE_ID | NODE_ID.map(lambda n: n + "\n") | NODE_ID.map(lambda n: n + ".json"))
def test_valid_node_id_is_exactly_the_pattern(s):
    expected = re.fullmatch(store.NODE_ID_PATTERN, s) is not None and not s.endswith(".json")
    assert store.valid_node_id(s) == expected


HOSTILE_NAMES = st.sampled_from([
    "w1 (1).json", ".w1.json.tmp-123-abcdef12", ".nfs000000000001", "w1.json\n", "w1.JSON", "w1.json.json",
    "\uff571.json", "w\u04351.json", "w1\u200b.json", "\u04301.json", "w1.js\u043en", "w1.json ", " w1.json",
    "-w1.json", "_tally.json", "a\\b.json", "a:b.json", "a" * 64 + ".json", "a" * 65 + ".json", ".json",
    "..json", "w1.json~", "w1.json.partial", "W1.json", "1.json", "w1..json", "w1\r.json", "w1.json\r",
])
NAMES = (NODE_ID.map(lambda n: n + ".json") | NODE_ID.map(lambda n: n + " (1).json")
         | NODE_ID.map(lambda n: f".{n}.json.tmp-1-deadbeef") | HOSTILE_NAMES
         | st.text(st.characters(exclude_characters="/\x00"), min_size=1, max_size=20))


@FILES
@given(st.dictionaries(NAMES, st.sampled_from(["file", "file", "symlink", "dangling", "dir", "fifo"]),
                       max_size=10))
def test_listing_keeps_exactly_the_node_files(entries):
    """Only regular files named exactly ``{node_id}.json``: no conflict copies, temp files, .nfs,
    lookalikes, trailing newlines, too-long ids, links or folders."""
    with scratch() as d:
        target = d / "target"
        target.mkdir()
        (target / "x.json").write_bytes(b"{}")
        folder = d / "f"
        folder.mkdir()
        made = {}
        for name, kind in entries.items():
            if name in (".", ".."):
                continue
            p = folder / name
            try:
                if kind == "file":
                    p.write_bytes(b"{}")
                elif kind == "symlink":
                    p.symlink_to(target / "x.json")
                elif kind == "dangling":
                    p.symlink_to(target / "missing.json")
                elif kind == "dir":
                    p.mkdir()
                else:
                    os.mkfifo(p)
            except OSError:  # a name too long for the filesystem
                continue
            made[name] = kind
        want = {name[:-5]: os.path.join(folder, name) for name, kind in made.items()
                if kind == "file" and re.fullmatch(store.NODE_ID_PATTERN + r"\.json", name)
                and not name[:-5].endswith(".json")}
        got = store.list_node_entries(folder)
        assert {k: v[0] for k, v in got.items()} == want
        for node, (path, inode) in got.items():
            assert inode == os.lstat(path).st_ino
        assert store.list_node_files(folder) == {k: Path(v) for k, v in want.items()}
        assert store.list_node_files(d / "absent") == {}


# -- read_json / read_json_sized ------------------------------------------------

@FILES
@given(st.binary(max_size=200) | VALID.map(lambda c: store.dumps(c.doc)), st.integers(0, 400))
def test_read_json_sized_caps_then_parses(blob, cap):
    with scratch() as d:
        p = d / "w1.json"
        p.write_bytes(blob)
        try:
            doc, size = store.read_json_sized(p, cap)
        except Rejected as exc:
            assert exc.reason
            if len(blob) > cap:
                assert "too large" in exc.reason
            elif not blob:
                assert exc.reason == "empty file"
            else:
                with pytest.raises(Rejected):
                    store.parse_json_bytes(blob)
            return
        assert len(blob) <= cap and size == len(blob) and doc == store.parse_json_bytes(blob)
        assert store.read_json(p, cap) == doc


def test_size_cap_is_checked_before_reading(tmp_path):
    """A 1 GiB (sparse) file costs one stat: it is rejected without a byte being read."""
    p = tmp_path / "w1.json"
    with open(p, "wb") as fh:
        fh.truncate(1 << 30)
    with mock.patch("os.fdopen", side_effect=AssertionError("read a file over its cap")):
        with pytest.raises(Rejected, match="too large"):
            store.read_json(p)
        with pytest.raises(Rejected, match="too large"):
            store.read_json_sized(p, store.ROLLOUT_FILE_MAX)


def test_links_and_special_files_are_not_followed(tmp_path):
    """Symlinks (to a good file, dangling, to a folder), folders and FIFOs: Rejected, never read, no hang."""
    good = tmp_path / "good.json"
    good.write_bytes(b'{"secret": 1}')
    (tmp_path / "link.json").symlink_to(good)
    (tmp_path / "dangling.json").symlink_to(tmp_path / "nowhere.json")
    (tmp_path / "dirlink.json").symlink_to(tmp_path)
    (tmp_path / "dir.json").mkdir()
    os.mkfifo(tmp_path / "fifo.json")
    results: dict[str, Any] = {}

    def go() -> None:
        for name in ("link.json", "dangling.json", "dirlink.json", "dir.json", "fifo.json"):
            try:
                results[name] = store.read_json(tmp_path / name)
            except Rejected as exc:
                results[name] = exc

    t = threading.Thread(target=go, daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a read blocked (FIFO opened without O_NONBLOCK?)"
    assert all(isinstance(r, Rejected) and r.reason for r in results.values()), results
    assert store.read_json(tmp_path / "absent.json") is None


# -- StateReader --------------------------------------------------------------------

STATE_STEP = st.one_of(
    st.tuples(st.just("state"), st.integers(0, 3), st.integers(0, 6), st.integers(0, 50),
              st.sampled_from(["open", "finished"])),
    st.tuples(st.just("garbage"), st.binary(max_size=40) | JSONLIKE.map(lambda v: json.dumps(v).encode())),
    st.tuples(st.just("torn"), st.integers(0, 200)),
    st.tuples(st.just("delete")),
)


@FILES
@given(st.lists(STATE_STEP, max_size=20), st.booleans())
def test_state_reader_never_goes_backwards(steps, trust_stat):
    """Fed any sequence of state files (stale ones, torn ones, garbage, gaps), read() never returns
    a state ordered (epoch, seq) before one it has returned, and (re-reading each time) returns
    the file's state whenever it is not older."""
    with scratch() as root:
        f = paths.state_file(root)
        reader = StateReader(root, trust_stat=trust_stat)
        last: schema.State | None = None
        shown: schema.State | None = None  # the valid state the file holds, if any
        for step in steps:
            if step[0] == "state":
                _, epoch, seq, round_, status = step
                shown = schema.State(round_, 0, epoch, seq, status, float(round_), "c", f"i{epoch}")
                store.atomic_write_json(f, schema.state_doc(shown), durable=False)
            elif step[0] == "garbage":
                store.atomic_write_bytes(f, step[1], durable=False)
                try:
                    shown = schema.parse_state(store.parse_json_bytes(step[1]))
                except Rejected:
                    shown = None
            elif step[0] == "torn":
                blob = store.dumps(schema.state_doc(schema.State(9, 0, 9, 9, "open", 0.0, "c", "i")))
                store.atomic_write_bytes(f, blob[:step[1] % len(blob)], durable=False)
                shown = None
            else:
                f.unlink(missing_ok=True)
                shown = None
            got = reader.read()
            if last is not None:
                assert got is not None and got.order >= last.order
            if not trust_stat:
                if shown is not None and (last is None or shown.order >= last.order):
                    assert got == shown
                else:
                    assert got == last
            else:
                assert got in (last, shown)
            last = got


# -- PeerTable ------------------------------------------------------------------

PEERS = ("w1", "w2", "c1")
PEER_STEP = st.tuples(
    st.sampled_from(PEERS),
    st.sampled_from(["beat", "beat", "same", "restart", "stop", "garbage", "torn", "delete", "foreign"]),
    st.floats(0, 1.5),  # reader's clock moves
    FINITE,  # the peer's wall clock: any value, never trusted
    st.binary(max_size=30) | JSONLIKE.map(lambda v: json.dumps(v).encode()),
)


@FILES
@given(st.lists(PEER_STEP, max_size=25), st.booleans())
def test_peer_liveness_follows_the_beat_on_our_clock(steps, concurrent):
    """Alive iff its (instance, beat) changed less than PEER_TIMEOUT ago on the reader's clock and
    it has not said it is gone: a beating peer is alive, a stuck one dead, whatever its wall-clock
    fields say; garbage, torn, foreign or deleted files never raise and change nothing. The same
    whether the heartbeats are read one at a time or several at once (a network mount)."""
    timeout = 1.0
    with scratch() as root:
        now = [0.0]
        table = PeerTable(root, timeout, clock=lambda: now[0], concurrent=concurrent)
        last: dict[str, tuple[str, int, str]] = {}  # last valid (instance, beat, status) each peer wrote
        valid_now: set[str] = set()  # peers whose file on disk is valid right now
        observed: dict[str, tuple[str, int, str, float]] = {}  # model: what the table saw, and when it moved
        restarts = 0
        for node, action, dt, wall, junk in steps:
            now[0] += dt
            f = paths.peer_file(root, node)
            inst, beat, status = last.get(node, (f"{node}-0", 0, "running"))
            if action == "beat":
                beat, status = beat + 1, "running"
            elif action == "restart":
                restarts += 1
                inst, beat, status = f"{node}-{restarts}", 0, "running"
            elif action == "stop":
                beat, status = beat + 1, "stopped"
            if action in ("beat", "same", "restart", "stop"):
                doc = schema.envelope(schema.PEER, node, inst, 0, 0, 0)
                doc.update(role="coordinator" if node.startswith("c") else "worker", model="m", host="h",
                           pid=1, version="0", started_at=wall, beat=beat, phase=str(wall)[:32], status=status,
                           ts=wall)
                store.atomic_write_json(f, doc, durable=False)
                last[node] = (inst, beat, status)
                valid_now.add(node)
            else:
                valid_now.discard(node)
                if action == "garbage":
                    store.atomic_write_bytes(f, junk, durable=False)
                elif action == "torn":
                    store.atomic_write_bytes(f, b'{"schema":"sapod.peer/1","node_id":"' + node.encode(), durable=False)
                elif action == "foreign":  # a valid heartbeat that names someone else
                    doc = schema.envelope(schema.PEER, "x" + node, inst, 0, 0, 0)
                    doc.update(role="worker", model="m", host="h", pid=1, version="0", started_at=wall,
                               beat=beat + 7, phase="p", status="running")
                    store.atomic_write_json(f, doc, durable=False)
                else:
                    f.unlink(missing_ok=True)
            table.refresh()
            for n in valid_now:
                i, b, s = last[n]
                prev = observed.get(n)
                observed[n] = (i, b, s, now[0] if prev is None or prev[:2] != (i, b) else prev[3])
            for n in PEERS:
                o = observed.get(n)
                expect = o is not None and o[2] not in GONE and now[0] - o[3] < timeout
                assert table.alive(n) == expect, (n, o, now[0])
                assert table.age(n) == (None if o is None else now[0] - o[3])
            if action in ("beat", "restart"):
                assert table.alive(node)  # a beat that moved is alive now, whatever its clock says
            if action == "stop":
                assert not table.alive(node)
            assert table.live() == {n for n in PEERS if table.alive(n) and not n.startswith("c")}
            assert table.live(None) == {n for n in PEERS if table.alive(n)}
        now[0] += 2 * timeout
        table.refresh()
        assert table.live(None) == set()  # nobody beat for a whole timeout: all dead


# -- tasks: provenance checks, scoring, answer extraction ------------------------

RG_TASKS = ("basic_arithmetic", "binary_matrix")


@pytest.fixture(scope="module")
def rg():
    pytest.importorskip("reasoning_gym")
    from sapod.tasks import ReasoningGymSource

    return ReasoningGymSource(RG_TASKS)


@FEW
@given(st.integers(0, 2**63 - 1), st.integers(0, 7), st.data())
def test_check_accepts_the_genuine_item_and_rejects_forgeries(rg, seed, k, data):
    item = rg.sample(8, seed)[k]
    assert rg.check(item.task, item.seed, item.index, item.question, item.answer) == item
    forged_q = data.draw(st.sampled_from([item.question + " ", item.question[:-1], "", item.question.upper()])
                         | st.text(max_size=20))
    if forged_q != item.question:
        with pytest.raises(Rejected):
            rg.check(item.task, item.seed, item.index, forged_q, item.answer)
    forged_a = data.draw(st.sampled_from([None, "", "0", (item.answer or "") + "0", " " + (item.answer or "")]))
    if forged_a != item.answer:
        with pytest.raises(Rejected):
            rg.check(item.task, item.seed, item.index, item.question, forged_a)
    # The same question claimed under another provenance.
    other = data.draw(st.sampled_from([(item.task, item.seed + 1, item.index), (item.task, item.seed, item.index + 1),
                                       (next(t for t in RG_TASKS if t != item.task), item.seed, item.index)]))
    if rg._item(*other).question != item.question:
        with pytest.raises(Rejected):
            rg.check(*other, item.question, item.answer)


ANY_ARG = JSONLIKE | st.sampled_from(list(RG_TASKS)) | st.integers(-5, 10**5) | st.sampled_from(
    [2**63 - 1, 2**63, 10**6, -(2**63), True, 3.0, "0", "basic_arithmetic\n", "Basic_Arithmetic"])


@FEW
@given(ANY_ARG, ANY_ARG, ANY_ARG, ANY_ARG, ANY_ARG)
def test_check_of_arbitrary_claims_rejects_and_never_raises_otherwise(rg, task, seed, index, question, answer):
    try:
        item = rg.check(task, seed, index, question, answer)
    except Rejected as exc:
        assert exc.reason
        return
    assert isinstance(item, TaskItem) and item.task in RG_TASKS and type(item.seed) is int
    assert (item.question, item.answer) == (question, answer)


HOSTILE_ANSWERS = st.sampled_from([
    "__import__('os').system('echo pwned')", "0x" + "f" * 5000, "1e400", "-1e400", "1e400j", "1" * 5000,
    "[[1, 0], [0, 1]]", "[" * 3000 + "]" * 3000, "lambda: 0", "().__class__.__bases__", "{1, 2}", "set()",
    "b'x'", "'\\x00'", "[1, 2", "None", "True", "nan", "inf", "[0]*10**9", "9" * 4301, "(" * 200 + "1" + ")" * 200,
])
COMPLETIONS = (st.text(max_size=60) | HOSTILE_ANSWERS.map(lambda a: f"<answer>{a}</answer>")
               | st.text(max_size=30).map(lambda a: f"think <answer> {a} </answer>")
               | st.lists(HOSTILE_ANSWERS | st.text(max_size=10), max_size=3).map(
                   lambda xs: "".join(f"<answer>{x}</answer>" for x in xs) + "<answer>")
               | st.sampled_from(["<answer>" * 500, "</answer>" * 10, "<answer></answer>"]))


@FEW
@given(st.integers(0, 2**40), st.integers(0, 3), COMPLETIONS, st.booleans())
def test_score_is_a_finite_reward_and_eval_verifiers_only_see_literals(rg, seed, k, completion, use_gold):
    """score() never raises and returns a float in [0, 1]; a verifier that eval()s the answer is only
    ever handed the gold answer or a plain Python literal."""
    from reasoning_gym.factory import DATASETS

    from sapod import tasks

    item = rg.sample(4, seed)[k]
    if use_gold and item.answer is not None:
        completion = f"<answer>{item.answer}</answer>"
    cls = DATASETS["binary_matrix"][0]
    assert tasks._verifier_evals(cls)  # warm its cache before the spy replaces score_answer
    handed: list[Any] = []
    real = cls.score_answer

    def spy(self, answer, entry):
        handed.append((answer, entry.get("answer")))
        return real(self, answer, entry)

    with mock.patch.object(cls, "score_answer", spy):
        r = rg.score(item, completion)
    assert type(r) is float and math.isfinite(r) and 0.0 <= r <= 1.0
    for answer, gold in handed:
        if answer != gold:
            ast.literal_eval(answer)  # a literal, and nothing else
    if use_gold and item.answer is not None:
        assert r == 1.0


@PROPS
@given(st.text(max_size=80) | HOSTILE_ANSWERS, st.none() | st.text(max_size=10) | HOSTILE_ANSWERS)
@example("1e400", None)
@example("0x" + "f" * 5000, None)
@example("[1e400]", None)
def test_safe_for_eval_gives_a_literal_or_none(answer, gold):
    from sapod.tasks import _safe_for_eval

    out = _safe_for_eval(answer, gold)
    if out is None or (answer == gold and out == answer):
        return
    assert isinstance(out, str)
    ast.literal_eval(out)  # eval(out) can only rebuild a literal: no names, calls or attributes


@PROPS
@given(JSONLIKE | COMPLETIONS | st.just("<answer>x</answer>" + "y" * 200_001))
def test_extract_never_raises(completion):
    from sapod.taskbase import MAX_COMPLETION_CHARS, extract_answer

    out = extract_answer(completion)
    assert out is None or isinstance(out, str)
    if not isinstance(completion, str) or len(completion) > MAX_COMPLETION_CHARS:
        assert out is None
    elif "<answer>" not in completion:
        assert out is None


ANSWER_TEXTS = st.lists(st.sampled_from(["<answer>", "</answer>", "<answer", "answer>", " ", "\n", "\t", "x", "42",
                                         "<", ">", "/", "\u00e9"]), max_size=14).map("".join)


@PROPS
@given(ANSWER_TEXTS | COMPLETIONS)
@example("<answer>3</answer>\n<answer> 4\n5\n</answer>")
@example("<answer><answer> 5 </answer></answer>")
@example("<answer>\t \n</answer>")
def test_extract_matches_reasoning_gym(completion):
    from reasoning_gym.utils import extract_answer as rg_extract

    from sapod.taskbase import extract_answer

    assert extract_answer(completion) == rg_extract(completion)


# The regex extract_answer used before its linear scan (reasoning_gym's pattern): the reference.
_ANSWER_REGEX = re.compile(r"<answer>\s?(.*?)\s?</answer>", re.DOTALL)


def _regex_answer(completion: str) -> str | None:
    answers = _ANSWER_REGEX.findall(completion)
    return answers[-1].strip() if answers else None


# Tags, near-tags, and whitespace that \s and str.strip both see (and "\u200b", which neither does).
ANSWER_PIECES = ("<answer>", "</answer>", "<Answer>", "</ANSWER>", "<answer", "</answer", "answer>", "<", ">", "/",
                 " ", "  ", "\n", "\t", "\r\n", "\x0b", "\x1c", "\x85", "\u00a0", "\u2028", "\u3000", "\u200b",
                 "42", "x", "\u00e9", "<answer> ", " </answer>", "<answer>\n", "\n</answer>")


def test_extract_answer_matches_the_regex_on_random_pieces():
    from sapod.taskbase import extract_answer

    rng = random.Random(20240611)
    for _ in range(5000):
        text = "".join(rng.choices(ANSWER_PIECES, k=rng.randint(0, 24)))
        assert extract_answer(text) == _regex_answer(text), repr(text)


@pytest.mark.parametrize("text, expected", [
    ("", None),
    ("42", None),
    ("<answer>42</answer>", "42"),
    ("<answer>  42 \n</answer>", "42"),                        # stripped, all of the whitespace
    ("<answer>\n4\n2\n</answer>", "4\n2"),                     # across lines
    ("<answer></answer>", ""),                                 # empty, not None
    ("<answer> </answer>", ""),
    ("<answer>\t \n</answer>", ""),
    ("<answer>1</answer><answer>2</answer>", "2"),             # the last pair
    ("<answer>1</answer><answer>2", "1"),                      # an unclosed last tag is no pair
    ("<answer>1</answer></answer>", "1"),
    ("<answer><answer>5</answer></answer>", "<answer>5"),      # not nested: the first closing ends it
    ("<answer>a<answer>b</answer>c</answer>", "a<answer>b"),
    ("</answer><answer>3</answer>", "3"),
    ("</answer>3<answer>", None),
    ("<answer>3</answer>\n<answer> 4\n5\n</answer>", "4\n5"),
    ("<Answer>4</Answer>", None),                              # case-sensitive
    ("<ANSWER>4</answer>", None),
    ("<answer>4</Answer>", None),
    ("<answer >4</answer>", None),
    ("<answer>4</answer >", None),
    ("<answer>\u00a04\u2028</answer>", "4"),                   # Unicode whitespace strips too
    ("<answer>\u200b4</answer>", "\u200b4"),                   # ... but a zero-width space is no whitespace
    ("<answer>" * 3 + "</answer>" * 3, "<answer><answer>"),
    ("<answer>" * 5, None),
    ("</answer>" * 5, None),
])
def test_extract_answer_hand_cases(text, expected):
    from sapod.taskbase import extract_answer

    assert _regex_answer(text) == expected  # the hand-written value is the regex's
    assert extract_answer(text) == expected


def test_extract_answer_ignores_str_subclass_methods():
    from sapod.taskbase import extract_answer

    class Odd(str):
        def find(self, *a: Any) -> int:
            return 0

        def strip(self, *a: Any) -> str:
            return "odd"

        def __getitem__(self, key: Any) -> str:
            return "odd"

    assert extract_answer(Odd("<answer> 7 </answer>")) == "7"
    assert extract_answer(Odd("no tags")) is None


@pytest.mark.parametrize("head, unit, reps, tail", [
    ("", "<answer> ", 7281, ""),                         # 64 KiB of openings, never closed
    ("", "<answer>", 10000, "x"),
    ("", "<answer>", MAX_COMPLETION_CHARS // 8, ""),     # the longest text it looks at
    ("", "<answer>\n", 7281, "</answer"),                 # a closing tag one ">" short
    ("<answer>x</answer>", "<answer> ", 7281, ""),      # a pair, then the hostile run
])
def test_extract_answer_is_linear_on_unclosed_tags(head, unit, reps, tail):
    """Many "<answer>" with no "</answer>" after them took the regex quadratic time, holding the GIL."""
    from sapod.taskbase import extract_answer

    small = head + unit * 50 + tail  # the regex is quick enough here: it gives the expected answer
    expected = _regex_answer(small)
    assert extract_answer(small) == expected
    hostile = head + unit * reps + tail
    assert len(hostile) <= MAX_COMPLETION_CHARS
    started = time.perf_counter()
    out = extract_answer(hostile)
    elapsed = time.perf_counter() - started
    assert out == expected
    assert elapsed < 1.0, f"{elapsed:.2f} s on {len(hostile)} chars"


def test_extract_answer_closed_hostile_run():
    """The same runs with one closing tag at the end: one pair holding all the openings but the first."""
    from sapod.taskbase import extract_answer

    for unit, reps in (("<answer> ", 7281), ("<answer>", 10000)):
        text = unit * reps + "</answer>"
        started = time.perf_counter()
        out = extract_answer(text)
        assert time.perf_counter() - started < 1.0
        assert out == _regex_answer(text) == (unit * (reps - 1)).strip()


# -- checkpoint.read_counters ---------------------------------------------------

@st.composite
def counters_files(draw: Any) -> bytes:
    doc = {"schema": schema.CHECKPOINT, "node_id": "w1", "round": draw(U63), "rounds_done": draw(U63),
           "cumulative_reward": draw(FINITE), "external_used": draw(U63), "instance": draw(INSTANCE),
           "seed": draw(st.integers()), "rng": "derived"}
    how = draw(st.sampled_from(["valid", "mutated", "mutated", "junk", "bytes", "torn"]))
    if how == "mutated":
        doc = draw(mutated(Case("counters", doc, None)))
    elif how == "junk":
        doc = draw(JSONLIKE)
    if how == "bytes":
        return draw(st.binary(max_size=100))
    blob = json.dumps(doc, allow_nan=True).encode()
    return blob[:draw(st.integers(0, len(blob) - 1))] if how == "torn" and blob else blob


@FILES
@given(counters_files())
@example(b'{"schema": "sapod.checkpoint/1", "node_id": "w1", "round": 1, "rounds_done": 1, '
         b'"cumulative_reward": 1' + b"0" * 400 + b"}")
def test_read_counters_returns_sane_counters_or_rejects(blob):
    with scratch() as d:
        (d / COUNTERS).write_bytes(blob)
        try:
            doc = read_counters(d, "w1")
        except Rejected as exc:
            assert exc.reason
            return
    assert doc["schema"] == schema.CHECKPOINT and doc["node_id"] == "w1"
    assert _int(doc["round"], -(2**64), 10**5000) and _int(doc["rounds_done"], -(2**64), 10**5000)
    assert type(doc["cumulative_reward"]) in (int, float) and math.isfinite(float(doc["cumulative_reward"]))
    int(doc.get("external_used", 0))  # what Worker._resume does with it cannot raise


ROUND_NAMES = (st.integers(0, 30).map(lambda r: f"round_{r}")
               | st.sampled_from(["round_03", "round_3\n", "round_\uff13", "round_\u0663", "round_3 (1)", "round_-1",
                                  "round_", "round_3.tmp", ".round_3", "round_0003", "round_1000000000"]))


@FILES
@given(st.lists(st.tuples(ROUND_NAMES, st.booleans()), max_size=8), st.integers(1, 3))
def test_list_checkpoints_sees_each_round_once_and_prune_keeps_the_latest(dirs, keep):
    """Stray folders in checkpoints/ (conflict copies, "round_03", unicode digits, a trailing newline)
    never list a round twice, so prune always keeps this node's latest ``keep`` complete checkpoints."""
    from sapod.checkpoint import list_checkpoints, prune_checkpoints

    with scratch() as root:
        complete = set()
        for name, has_marker in dirs:
            d = paths.checkpoints_dir(root) / name / "w1"
            d.mkdir(parents=True, exist_ok=True)
            m = re.fullmatch(r"round_(0|[1-9][0-9]{0,8})", name)
            if has_marker:
                paths.complete_marker(d).write_text("{}")
                if m:
                    complete.add(int(m.group(1)))
        found = list_checkpoints(root, "w1")
        assert found == [(r, paths.checkpoint_dir(root, r, "w1")) for r in sorted(complete)]
        prune_checkpoints(root, "w1", keep)
        assert [r for r, _ in list_checkpoints(root, "w1")] == sorted(complete)[-keep:]


def test_read_counters_missing_is_rejected(tmp_path):
    with pytest.raises(Rejected, match="missing"):
        read_counters(tmp_path, "w1")


# -- save_checkpoint durability --------------------------------------------------

CKPT_COUNTERS = {"rounds_done": 1, "cumulative_reward": 0.5, "external_used": 0}


def _policy_with_subfolder():
    """The scripted policy, plus files in a subfolder the way a real one writes its tokenizer."""
    from sapod.policy.scripted import ScriptedPolicy

    class WithTokenizer(ScriptedPolicy):
        def save(self, directory: Path) -> None:
            super().save(directory)
            (Path(directory) / "tokenizer").mkdir()
            (Path(directory) / "tokenizer" / "vocab.json").write_text('{"a": 1}')
            (Path(directory) / "optimizer.pt").write_bytes(b"\0" * 1000)

    return WithTokenizer(skill=0.4)


def test_save_checkpoint_fsyncs_the_policys_files_before_complete(tmp_path, monkeypatch):
    """A power cut must never leave a durable COMPLETE beside an empty or truncated model file:
    every file and folder the policy wrote is fsynced before COMPLETE is created, and the folder
    holding the checkpoint is fsynced after the rename that publishes it."""
    from sapod import checkpoint

    root = tmp_path.resolve()
    events: list[tuple[str, str]] = []
    real_fsync, real_replace, real_write = os.fsync, os.replace, checkpoint.atomic_write_json

    def spy_fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def spy_replace(src, dst, *a, **k):
        real_replace(src, dst, *a, **k)
        events.append(("replace", str(dst)))

    def spy_write(path, *a, **k):
        events.append(("write", Path(path).name))
        return real_write(path, *a, **k)

    monkeypatch.setattr(checkpoint.os, "fsync", spy_fsync)  # the os module: store's fsyncs too
    monkeypatch.setattr(checkpoint.os, "replace", spy_replace)
    monkeypatch.setattr(checkpoint, "atomic_write_json", spy_write)
    final = checkpoint.save_checkpoint(root, "w1", 3, _policy_with_subfolder(), CKPT_COUNTERS, keep=2)
    monkeypatch.undo()

    policy_files = {str(p.relative_to(final)) for p in final.rglob("*") if p.is_file()} - {"COMPLETE", COUNTERS}
    assert policy_files == {"scripted.json", "optimizer.pt", "tokenizer/vocab.json"}
    tmp_prefix = str(final.parent / ".w1.tmp-")
    # What was fsynced inside the temp folder, by its path relative to that folder ("" = the folder).
    synced_at = {}
    for i, (kind, path) in enumerate(events):
        if kind == "fsync" and path.startswith(tmp_prefix):
            rel = path[len(tmp_prefix):].partition("/")[2]
            synced_at.setdefault(rel, i)
    complete_created = events.index(("write", "COMPLETE"))
    for rel in policy_files | {"", "tokenizer"}:
        assert rel in synced_at, f"{rel or 'the temp folder'} never fsynced: {events}"
        assert synced_at[rel] < complete_created, f"{rel} fsynced after COMPLETE was written: {events}"
    assert any(p.startswith(".COMPLETE.tmp-") for p in synced_at), events
    assert any(p.startswith(f".{COUNTERS}.tmp-") for p in synced_at), events
    published = events.index(("replace", str(final)))
    assert ("fsync", str(final.parent)) in events[published + 1:], events
    assert checkpoint.latest_checkpoint(root, "w1") == (3, final)


def test_save_checkpoint_fsync_error_fails_the_save(tmp_path, monkeypatch):
    """An fsync that fails on a policy file fails the save as OSError, leaving no checkpoint
    and no temp folder behind (the caller keeps the previous checkpoint and retries later)."""
    from sapod import checkpoint

    root = tmp_path.resolve()
    real_fsync = os.fsync

    def failing_fsync(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith("/optimizer.pt"):
            raise OSError(5, "Input/output error")
        return real_fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", failing_fsync)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(root, "w1", 3, _policy_with_subfolder(), CKPT_COUNTERS, keep=2)
    monkeypatch.undo()
    assert checkpoint.list_checkpoints(root, "w1") == []
    assert os.listdir(paths.checkpoint_dir(root, 3, "w1").parent) == []


class _Killed(BaseException):
    """Stands for a kill -9 or a power cut: nothing after it runs."""


def test_resave_killed_while_removing_the_old_folder_never_leaves_it_listed(tmp_path, monkeypatch):
    """A retry of the same round removes the old folder COMPLETE first: killed partway, the
    half-removed folder is no longer a checkpoint, and the previous round's is the latest."""
    from sapod import checkpoint
    from sapod.policy.scripted import ScriptedPolicy

    root = tmp_path.resolve()
    policy = ScriptedPolicy(skill=0.4)
    r3 = checkpoint.save_checkpoint(root, "w1", 3, policy, CKPT_COUNTERS, keep=2)
    r4 = checkpoint.save_checkpoint(root, "w1", 4, policy, CKPT_COUNTERS, keep=2)
    assert checkpoint.latest_checkpoint(root, "w1") == (4, r4)
    real_rmtree = shutil.rmtree
    removed = []

    def rmtree_killed_partway(path, *a, **k):
        if Path(path) != r4:
            return real_rmtree(path, *a, **k)
        # This filesystem lists COMPLETE last; remove one file, then die.
        first = sorted((p for p in Path(path).iterdir() if p.is_file()), key=lambda p: p.name == "COMPLETE")[0]
        first.unlink()
        removed.append(first.name)
        raise _Killed

    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree_killed_partway)
    with pytest.raises(_Killed):
        checkpoint.save_checkpoint(root, "w1", 4, policy, dict(CKPT_COUNTERS, rounds_done=2), keep=2)
    monkeypatch.undo()
    assert removed and r4.exists()  # the old folder was half removed
    assert [r for r, _ in checkpoint.list_checkpoints(root, "w1")] == [3]
    assert checkpoint.latest_checkpoint(root, "w1") == (3, r3)
    assert read_counters(r3, "w1")["rounds_done"] == 1
    # The next retry replaces the half-removed folder.
    checkpoint.save_checkpoint(root, "w1", 4, policy, dict(CKPT_COUNTERS, rounds_done=2), keep=2)
    assert checkpoint.latest_checkpoint(root, "w1") == (4, r4)
    assert read_counters(r4, "w1")["rounds_done"] == 2


# -- progress.read_jsonl --------------------------------------------------------

SMALL_LINE = 5000  # MAX_LINE, shrunk so that over-long lines are cheap to generate
LINES = st.one_of(
    st.dictionaries(st.text(max_size=6), FINITE_JSON, max_size=4).map(lambda d: json.dumps(d).encode()),
    JSONLIKE.map(lambda v: json.dumps(v, allow_nan=True).encode()),
    st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")),
    st.sampled_from([b"[" * 3000, b'{"a":' * 2000, b"{" * SMALL_LINE + b"}", b'{"a": "' + b"x" * SMALL_LINE + b'"}',
                     b"\xff\xfe{}", b'{"a": 1', b"", b"\r", b'{"a": "\\ud800"}']),
)


@FILES
@given(st.lists(LINES, max_size=8), st.booleans())
def test_read_jsonl_keeps_whole_object_lines_and_skips_the_rest(lines, torn_tail):
    """Torn last line, garbage, over-long and absurdly nested lines are skipped; nothing raises."""
    blob = b"\n".join(lines) + (b"" if torn_tail else b"\n")
    expect = []
    parts = blob.split(b"\n")
    for line in [x + b"\n" for x in parts[:-1]] + [parts[-1]]:
        if len(line) > SMALL_LINE:
            continue
        try:
            row = json.loads(line)
        except (ValueError, RecursionError):
            continue
        if isinstance(row, dict):
            expect.append(row)
    with scratch() as d, mock.patch.object(progress, "MAX_LINE", SMALL_LINE):
        (d / "m.jsonl").write_bytes(blob)
        rows = progress.read_jsonl(d / "m.jsonl")
    assert all(isinstance(r, dict) for r in rows)
    assert json.dumps(rows) == json.dumps(expect)


def test_read_jsonl_huge_line_costs_bounded_memory(tmp_path):
    """A peer's 16 MB line without a newline is skipped without holding it in memory."""
    p = tmp_path / "m.jsonl"
    p.write_bytes(b'{"a": 1}\n' + b"x" * (16 << 20) + b'\n{"b": 2}\n' + b'{"c": ' + b"7" * (4 << 20))
    tracemalloc.start()
    try:
        rows = progress.read_jsonl(p)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert rows == [{"a": 1}, {"b": 2}]
    assert peak < 4 * progress.MAX_LINE, peak


def test_read_jsonl_ignores_special_files(tmp_path):
    """A FIFO (or a folder, or nothing) in place of a log: no rows, no hang."""
    os.mkfifo(tmp_path / "fifo.jsonl")
    (tmp_path / "dir.jsonl").mkdir()
    out: dict[str, Any] = {}
    t = threading.Thread(target=lambda: out.update(
        fifo=progress.read_jsonl(tmp_path / "fifo.jsonl"), dir=progress.read_jsonl(tmp_path / "dir.jsonl"),
        absent=progress.read_jsonl(tmp_path / "absent.jsonl")), daemon=True)
    t.start()
    t.join(10)
    assert not t.is_alive(), "read_jsonl blocked on a FIFO"
    assert out == {"fifo": [], "dir": [], "absent": []}


# -- gather.list_peer_rollouts, load_peer_rollouts -----------------------------------------------------

ROUND, STAGE, ME = 3, 0, "me"


@st.composite
def rollout_folders(draw: Any) -> dict[str, bytes | str]:
    """File name -> content (bytes) or a special kind ("symlink", "dir") for a rollouts folder."""
    files: dict[str, bytes | str] = {}
    for node in draw(st.lists(NODE_ID | st.just(ME), max_size=5, unique=True)):
        how = draw(st.sampled_from(["valid", "valid", "foreign", "other_round", "mutated", "torn", "junk",
                                    "bytes", "nan", "symlink", "dir"]))
        c = draw(valid_rollouts(node if how != "foreign" else node + "x", ROUND if how != "other_round" else ROUND + 1,
                                STAGE))
        if how in ("symlink", "dir"):
            content: bytes | str = how
        elif how == "mutated":
            content = json.dumps(draw(mutated(c)), allow_nan=True).encode()
        elif how == "torn":
            blob = store.dumps(c.doc)
            content = blob[:draw(st.integers(0, len(blob) - 1))]
        elif how == "junk":
            content = json.dumps(draw(JSONLIKE), allow_nan=True).encode()
        elif how == "bytes":
            content = draw(st.binary(max_size=60))
        elif how == "nan":
            content = store.dumps(c.doc)[:-1] + b',"x":NaN}'
        else:
            content = store.dumps(c.doc)
        files[node + ".json"] = content
    for name in draw(st.lists(HOSTILE_NAMES, max_size=3)):
        files.setdefault(name, b'{"schema": "sapod.rollouts/1"}')
    return files


@FILES
@given(rollout_folders(), st.data())
def test_peer_rollouts_over_hostile_files(files, data):
    """Listing reads nothing; every listed peer file, once loaded, is either taken (equal to
    what parse_rollouts makes of it) or recorded as rejected with its reason; our own file
    and stray names are skipped; nothing raises. A file that becomes whole later is listed
    anew and taken then. The same whether the files are read one at a time or several at
    once (as on a network mount)."""
    concurrent = data.draw(st.booleans(), label="concurrent")
    with scratch() as root:
        folder = paths.rollouts_dir(root, ROUND, STAGE)
        folder.mkdir(parents=True)
        for name, content in files.items():
            p = folder / name
            try:
                if content == "symlink":
                    p.symlink_to(root)
                elif content == "dir":
                    p.mkdir()
                else:
                    p.write_bytes(content)  # type: ignore[arg-type]
            except OSError:
                pass
        listed = set(store.list_node_files(folder)) - {ME}
        result = GatherResult()
        list_peer_rollouts(root, ROUND, STAGE, ME, result)
        assert result.files.keys() == listed and not result.rollouts and not result.rejected
        load_peer_rollouts(result, sorted(result.files), ROUND, STAGE, concurrent)
        list_peer_rollouts(root, ROUND, STAGE, ME, result)  # a rescan of unchanged files
        load_peer_rollouts(result, sorted(result.files), ROUND, STAGE, concurrent)  # changes nothing
        assert not result.rollouts.keys() & result.rejected.keys() and not result.gone
        assert result.rollouts.keys() | result.rejected.keys() == listed
        for node in listed:
            try:
                doc, _ = store.read_json_sized(folder / f"{node}.json", store.ROLLOUT_FILE_MAX)
                want = schema.parse_rollouts(doc, node, ROUND, STAGE)
            except Rejected as exc:
                assert result.rejected[node] == exc.reason
            else:
                assert result.rollouts[node] == want
        # The rejected ones finish syncing: whole, valid files replace them.
        fixed = {}
        for node in result.rejected:
            c = data.draw(valid_rollouts(node, ROUND, STAGE))
            store.atomic_write_json(folder / f"{node}.json", c.doc, durable=False)
            fixed[node] = c.expect
        list_peer_rollouts(root, ROUND, STAGE, ME, result)
        load_peer_rollouts(result, sorted(result.files), ROUND, STAGE, concurrent)
        assert result.rejected == {}
        for node, want in fixed.items():
            assert result.rollouts[node] == want
