"""The shared-folder file formats: builders for what a node writes, strict parsers
for what it reads. A parser returns a dataclass or raises ``Rejected(reason)``.

Every file carries an envelope: ``schema``, ``node_id``, ``instance`` and the
``round``/``stage``/``epoch`` it belongs to. Bump a schema's version when a field
changes meaning.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from typing import Any

from sapod.errors import Rejected
from sapod.store import valid_node_id

EXPERIMENT = "sapod.experiment/1"
STATE = "sapod.state/1"
PEER = "sapod.peer/1"
ROLLOUTS = "sapod.rollouts/1"
REWARDS = "sapod.rewards/1"
CHECKPOINT = "sapod.checkpoint/1"
TALLY = "sapod.tally/1"

MAX_TEXT = 64 * 1024  # one question or completion
MAX_ITEMS = 256
MAX_COMPLETIONS = 256


def envelope(schema: str, node_id: str, instance: str, round_: int, stage: int, epoch: int) -> dict[str, Any]:
    return {"schema": schema, "node_id": node_id, "instance": instance, "round": round_, "stage": stage, "epoch": epoch}


# -- field checks -----------------------------------------------------------------

def _get(d: dict[str, Any], key: str, kind: type | tuple[type, ...]) -> Any:
    if key not in d:
        raise Rejected(f"missing field {key!r}")
    value = d[key]
    if isinstance(value, bool) and kind is not bool:
        raise Rejected(f"field {key!r} has the wrong type")
    if not isinstance(value, kind):
        raise Rejected(f"field {key!r} has the wrong type")
    return value


def _int(d: dict[str, Any], key: str, lo: int = 0, hi: int = 2**63) -> int:
    value = _get(d, key, int)
    if not lo <= value <= hi:
        raise Rejected(f"field {key!r} out of range: {value}")
    return value


def _num(d: dict[str, Any], key: str) -> float:
    try:
        value = float(_get(d, key, (int, float)))
    except OverflowError:  # an integer beyond float range: JSON allows 4300 digits
        value = math.inf
    if not math.isfinite(value):
        raise Rejected(f"field {key!r} is not finite")
    return value


def _str(d: dict[str, Any], key: str, max_len: int = 256) -> str:
    value = _get(d, key, str)
    if len(value) > max_len:
        raise Rejected(f"field {key!r} too long")
    return value


def check_envelope(d: dict[str, Any], schema: str, node_id: str | None = None) -> None:
    got = d.get("schema")
    if got != schema:
        raise Rejected(f"schema {str(got)[:40]!r}, expected {schema!r}")
    if node_id is not None:
        claimed = _str(d, "node_id", 64)
        if claimed != node_id:
            raise Rejected(f"node_id {claimed!r} disagrees with the file name {node_id!r}")
    _str(d, "instance", 64)


def _same_slot(d: dict[str, Any], round_: int, stage: int) -> None:
    _int(d, "epoch")
    if _int(d, "round") != round_ or _int(d, "stage") != stage:
        raise Rejected(f"round/stage {d.get('round')}/{d.get('stage')} disagree with the folder {round_}/{stage}")


# -- state ----------------------------------------------------------------------

@dataclass(frozen=True)
class State:
    round: int
    stage: int
    epoch: int
    seq: int
    status: str  # "open" | "finished"
    opened_at: float
    coordinator: str
    instance: str

    @property
    def order(self) -> tuple[int, int]:
        """Readers never accept a state ordered before one they have seen."""
        return (self.epoch, self.seq)


def state_doc(s: State) -> dict[str, Any]:
    return {
        "schema": STATE, "round": s.round, "stage": s.stage, "epoch": s.epoch, "seq": s.seq,
        "status": s.status, "opened_at": s.opened_at,
        "coordinator": {"node_id": s.coordinator, "instance": s.instance},
        "node_id": s.coordinator, "instance": s.instance,
    }


def parse_state(d: dict[str, Any]) -> State:
    check_envelope(d, STATE)
    coord = _get(d, "coordinator", dict)
    status = _str(d, "status", 16)
    if status not in ("open", "finished"):
        raise Rejected(f"unknown status {status!r}")
    return State(
        round=_int(d, "round"), stage=_int(d, "stage"), epoch=_int(d, "epoch"), seq=_int(d, "seq"),
        status=status, opened_at=_num(d, "opened_at"),
        coordinator=_str(coord, "node_id", 64), instance=_str(coord, "instance", 64),
    )


# -- peers ----------------------------------------------------------------------

@dataclass(frozen=True)
class Peer:
    node_id: str
    instance: str
    role: str
    beat: int
    round: int
    phase: str
    status: str  # "running" | "stopped" | "degraded" | "finished"
    started_at: float
    model: str
    host: str
    pid: int
    epoch: int = 0  # the epoch of the swarm state the node follows (0: none yet)


def parse_peer(d: dict[str, Any], node_id: str) -> Peer:
    check_envelope(d, PEER, node_id)
    role = _str(d, "role", 16)
    if role not in ("worker", "coordinator"):
        raise Rejected(f"unknown role {role!r}")
    return Peer(
        node_id=node_id, instance=_str(d, "instance", 64), role=role, beat=_int(d, "beat"),
        round=_int(d, "round", -1), phase=_str(d, "phase", 32), status=_str(d, "status", 16),
        started_at=_num(d, "started_at"), model=_str(d, "model", 512), host=_str(d, "host", 256),
        pid=_int(d, "pid"), epoch=_int(d, "epoch", hi=2**62),
    )


# -- rollouts -------------------------------------------------------------------

@dataclass(frozen=True)
class ClaimedItem:
    """A question-group as a peer published it; its provenance is checked before use."""

    task: str
    seed: int
    index: int
    question: str
    answer: str | None
    completions: tuple[str, ...]
    # finished[g]: completion g ended with an end-of-sequence token. () when none did, or the
    # file does not say (the field is optional: files of older nodes have none).
    finished: tuple[bool, ...] = ()


@dataclass(frozen=True)
class Rollouts:
    node_id: str
    instance: str
    model: str
    items: tuple[ClaimedItem, ...] = field(default_factory=tuple)

    @functools.cached_property
    def distinct(self) -> tuple[tuple[int, ClaimedItem], ...]:
        """``(position, item)`` for each item but exact repeats of an earlier one; computed
        once per file (parsed files are shared by the nodes of a process)."""
        first: dict[ClaimedItem, int] = {}
        for i, item in enumerate(self.items):
            first.setdefault(item, i)
        return tuple((i, item) for item, i in first.items())


def parse_rollouts(d: dict[str, Any], node_id: str, round_: int, stage: int) -> Rollouts:
    """Keys it does not know are ignored, so an optional field (as ``finished`` was) can be
    added without a version bump: older nodes read the newer files."""
    check_envelope(d, ROLLOUTS, node_id)
    _same_slot(d, round_, stage)
    raw = _get(d, "items", list)
    if len(raw) > MAX_ITEMS:
        raise Rejected(f"too many items: {len(raw)}")
    items = []
    for i, it in enumerate(raw):
        if not isinstance(it, dict):
            raise Rejected(f"item {i} is not an object")
        completions = _get(it, "completions", list)
        if not completions or len(completions) > MAX_COMPLETIONS:
            raise Rejected(f"item {i}: {len(completions)} completions")
        if not all(isinstance(c, str) and len(c) <= MAX_TEXT for c in completions):
            raise Rejected(f"item {i}: a completion is not a string or too long")
        answer = it.get("answer")
        if answer is not None and (not isinstance(answer, str) or len(answer) > MAX_TEXT):
            raise Rejected(f"item {i}: bad answer")
        finished = it.get("finished", [])
        if "finished" in it and (not isinstance(finished, list) or len(finished) != len(completions)
                                 or not all(isinstance(f, bool) for f in finished)):
            raise Rejected(f"item {i}: bad finished (not {len(completions)} booleans)")
        items.append(ClaimedItem(
            task=_str(it, "task", 128), seed=_int(it, "seed"), index=_int(it, "index", 0, 10**6),
            question=_str(it, "question", MAX_TEXT), answer=answer, completions=tuple(completions),
            finished=tuple(finished) if any(finished) else (),  # one form for "none finished"
        ))
    return Rollouts(node_id=node_id, instance=_str(d, "instance", 64), model=_str(d, "model", 512), items=tuple(items))


# -- rewards (the submission) ---------------------------------------------------

@dataclass(frozen=True)
class Submission:
    node_id: str
    instance: str
    reward_mean: float
    reward_sum: float
    n_completions: int
    n_local: int
    n_external: int
    external_from: tuple[str, ...]
    cumulative_reward: float


def submission_doc(node_id: str, instance: str, round_: int, stage: int, epoch: int, *, reward_mean: float,
                   reward_sum: float, n_completions: int, n_local: int, external_sources: list[str],
                   cumulative_reward: float) -> dict[str, Any]:
    """A worker's submission; ``external_sources`` names the peer of each external group trained on."""
    doc = envelope(REWARDS, node_id, instance, round_, stage, epoch)
    doc.update(reward_mean=reward_mean, reward_sum=reward_sum, n_completions=n_completions, n_local=n_local,
               n_external=len(external_sources), external_from=sorted(set(external_sources)),
               cumulative_reward=cumulative_reward)
    return doc


def parse_submission(d: dict[str, Any], node_id: str, round_: int, stage: int) -> Submission:
    check_envelope(d, REWARDS, node_id)
    _same_slot(d, round_, stage)
    ext = _get(d, "external_from", list)
    if len(ext) > 4096 or not all(isinstance(x, str) and valid_node_id(x) for x in ext):
        raise Rejected("bad external_from")
    return Submission(
        node_id=node_id, instance=_str(d, "instance", 64), reward_mean=_num(d, "reward_mean"),
        reward_sum=_num(d, "reward_sum"), n_completions=_int(d, "n_completions"),
        n_local=_int(d, "n_local"), n_external=_int(d, "n_external"), external_from=tuple(ext),
        cumulative_reward=_num(d, "cumulative_reward"),
    )


# -- tally (what closed a round) -----------------------------------------------

@dataclass(frozen=True)
class Tally:
    round: int
    stage: int
    epoch: int
    coordinator: str
    reason: str
    counted: dict[str, float]  # node_id -> reward_mean of the submission that counted
    missing: tuple[str, ...]
    seconds: float  # open to decision, on the coordinator's clock
    collected_at: float
    closed_at: float


def parse_tally(d: dict[str, Any], round_: int, stage: int) -> Tally:
    check_envelope(d, TALLY)
    _same_slot(d, round_, stage)
    reason = _str(d, "reason", 32)
    counted_raw = _get(d, "counted", dict)
    missing = _get(d, "missing", list)
    if len(counted_raw) > 4096 or len(missing) > 4096:
        raise Rejected("tally too large")
    counted = {}
    for node_id, sub in counted_raw.items():
        if not valid_node_id(node_id) or not isinstance(sub, dict):
            raise Rejected("bad counted entry")
        counted[node_id] = _num(sub, "reward_mean")
    if not all(isinstance(x, str) and valid_node_id(x) for x in missing):
        raise Rejected("bad missing list")
    return Tally(round=round_, stage=stage, epoch=_int(d, "epoch"), coordinator=_str(d, "node_id", 64),
                 reason=reason, counted=counted, missing=tuple(missing), seconds=_num(d, "seconds"),
                 collected_at=_num(d, "collected_at"), closed_at=_num(d, "closed_at"))


# -- experiment -----------------------------------------------------------------

def parse_experiment(d: dict[str, Any]) -> dict[str, Any]:
    if d.get("schema") != EXPERIMENT:
        raise Rejected(f"schema {str(d.get('schema'))[:40]!r}, expected {EXPERIMENT!r}")
    _int(d, "protocol")
    return _get(d, "settings", dict)
