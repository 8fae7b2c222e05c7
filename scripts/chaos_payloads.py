"""Hostile files for the chaos harness: what a crashed, buggy or malicious peer can
leave in the shared folder. Each payload goes under a fresh fake node id (or a name
that is not a node id at all), so the harness can find the reason a node logged for
it. Every payload must be rejected or ignored; none may crash a node or be trained on.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapod import paths, schema
from sapod.gather import rollouts_doc

# A node logs each of these events, with the peer id or path, when it turns a file down.
REJECTION_EVENTS = ("rollouts_rejected", "item_rejected", "submission_rejected", "peer_file_rejected",
                    "entry_ignored", "state_file_rejected")


@dataclass
class Payload:
    kind: str
    path: Path  # where it was written
    key: str  # the fake node id a rejection names, or the file name an "ignored" line names
    # A peer's rollouts file is read, and its items checked, only when a node's sampler
    # draws from it: such a payload may go unread (and then cannot have been trained on).
    examined_only_if_sampled: bool = False
    landed_late: bool = False  # the round had opened before the file was in place: no node need read it


class PayloadMaker:
    def __init__(self, seed: int, tasks: Any, huge_every: int = 25):
        self.rng = random.Random(seed)
        self.tasks = tasks
        self.n = 0
        self.huge_every = huge_every

    def _id(self) -> str:
        self.n += 1
        return f"x{self.n:05d}"

    def _valid_rollouts(self, node: str, r: int) -> dict[str, Any]:
        items = self.tasks.sample(1, self.rng.getrandbits(32))
        return rollouts_doc(node, "f" * 32, r, 0, 1, "m", items, [["<answer>1</answer>", "<answer>2</answer>"]])

    def _valid_rewards(self, node: str, r: int) -> dict[str, Any]:
        return schema.submission_doc(node, "f" * 32, r, 0, 1, reward_mean=0.5, reward_sum=4.0, n_completions=8,
                                     n_local=2, external_sources=[], cumulative_reward=1.0)

    def batch(self, root: Path, r: int, real_ids: list[str], count: int) -> list[Payload]:
        """``count`` payloads for round ``r`` (written before it opens, so every node lists them)."""
        kinds = [k for k in dir(self) if k.startswith("p_")]
        out = []
        for _ in range(count):
            kind = self.rng.choice(kinds)
            if kind == "p_huge" and self.n % self.huge_every:
                kind = "p_torn"
            out.append(getattr(self, kind)(root, r, real_ids))
        return out

    # -- rollouts folder -------------------------------------------------------
    def _rollout(self, root: Path, r: int, kind: str, data: bytes, node: str | None = None) -> Payload:
        """A file in the round's rollouts folder under a node's name: read only if sampled."""
        node = node or self._id()
        path = paths.rollout_file(root, r, 0, node)
        _write(path, data)
        return Payload(kind, path, node, examined_only_if_sampled=True)

    def p_torn(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        data = _dump(self._valid_rollouts(node, r))
        return self._rollout(root, r, "torn", data[: self.rng.randrange(1, len(data) - 1)], node=node)

    def p_empty(self, root: Path, r: int, real: list[str]) -> Payload:
        return self._rollout(root, r, "empty", b"")

    def p_bitflip(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        data = bytearray(_dump(self._valid_rollouts(node, r)))
        at = data.index(b"sapod.rollouts/1") + self.rng.randrange(16)  # a flip where it must be caught
        data[at] ^= 1 << self.rng.randrange(8)
        return self._rollout(root, r, "bitflip", bytes(data), node=node)

    def p_huge(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        path = paths.rollout_file(root, r, 0, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as fh:  # 100 MB, sparse: costs no disk, and no reader may read it
            fh.truncate(100 * 2**20)
        return Payload("huge_100MB", path, node, examined_only_if_sampled=True)

    def p_wrong_schema(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        return self._rollout(root, r, "wrong_schema", _dump(self._valid_rewards(node, r)), node=node)

    def p_wrong_types(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = self._valid_rollouts(node, r)
        field, value = self.rng.choice([("items", "many"), ("round", str(r)), ("epoch", 1.5), ("items", [[1, 2]]),
                                        ("items", [{"completions": [1, 2]}]), ("instance", None)])
        doc[field] = value
        return self._rollout(root, r, "wrong_types", _dump(doc), node=node)

    def p_nan(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = self._valid_rewards(node, r)
        doc[self.rng.choice(["reward_mean", "reward_sum", "cumulative_reward"])] = float(
            self.rng.choice(["nan", "inf", "-inf"]))
        path = paths.reward_file(root, r, 0, node)
        _write(path, json.dumps(doc).encode())  # json writes NaN/Infinity literals
        return Payload("nan_infinity", path, node)

    def p_identity(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = self._valid_rollouts(self.rng.choice(real), r)  # claims to be a real node
        return self._rollout(root, r, "identity_mismatch", _dump(doc), node=node)

    def p_wrong_round(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        return self._rollout(root, r, "wrong_round", _dump(self._valid_rollouts(node, r + 7)), node=node)

    def p_deep(self, root: Path, r: int, real: list[str]) -> Payload:
        return self._rollout(root, r, "deep_nesting", b"[" * 200_000 + b"]" * 200_000)

    def p_bad_utf8(self, root: Path, r: int, real: list[str]) -> Payload:
        return self._rollout(root, r, "bad_utf8", b'{"schema": "\xff\xfe"}')

    def p_forged(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = self._valid_rollouts(node, r)
        item = doc["items"][0]
        if self.rng.random() < 0.5:
            item["question"] += " (and add 1)"
        else:
            item["answer"] = "forged"
        item["completions"] = ["<answer>forged</answer>", "<answer>1</answer>"]
        return self._rollout(root, r, "forged_provenance", _dump(doc), node=node)

    # -- rewards and peers ------------------------------------------------------
    def p_bad_submission(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = self._valid_rewards(node, r)
        doc["external_from"] = ["../../etc/passwd"]
        path = paths.reward_file(root, r, 0, node)
        _write(path, _dump(doc))
        return Payload("bad_submission", path, node)

    def p_peer(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        doc = schema.envelope(schema.PEER, self.rng.choice(real), "f" * 32, r, 0, 0)  # identity mismatch
        doc.update(role="worker", beat="many")
        path = paths.peer_file(root, node)
        _write(path, _dump(doc))
        return Payload("bad_peer", path, node)

    # -- names that are not node files ------------------------------------------
    def p_conflict_copy(self, root: Path, r: int, real: list[str]) -> Payload:
        name = f"{self.rng.choice(real)} ({self.rng.randrange(1, 4)}).json"
        path = paths.rollouts_dir(root, r, 0) / name
        _write(path, _dump(self._valid_rollouts(real[0], r)))
        return Payload("conflict_copy", path, _rel(path))

    def p_temp_name(self, root: Path, r: int, real: list[str]) -> Payload:
        name = f"{self._id()}.json.tmp{self.rng.randrange(1000)}"
        path = paths.rollouts_dir(root, r, 0) / name
        _write(path, b"{")
        return Payload("temp_file", path, _rel(path))

    def p_symlink(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        path = paths.rollout_file(root, r, 0, node)
        path.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(self.rng.choice(["/etc/passwd", "/dev/zero", "../../../../../../etc/hostname"]), path)
        return Payload("symlink_outside", path, _rel(path))

    def p_separator(self, root: Path, r: int, real: list[str]) -> Payload:
        name = f"{self._id()}\\..\\w1.json"  # a backslash in an id: never a node id
        path = paths.rollouts_dir(root, r, 0) / name
        _write(path, _dump(self._valid_rollouts(real[0], r)))
        return Payload("path_separator_id", path, _rel(path))

    def p_folder(self, root: Path, r: int, real: list[str]) -> Payload:
        node = self._id()
        path = paths.rollout_file(root, r, 0, node)
        path.mkdir(parents=True, exist_ok=True)
        return Payload("folder_named_like_a_file", path, _rel(path))


def _rel(path: Path) -> str:
    """round_r/stage_s/name: what an ``entry_ignored`` path ends with, in any replica."""
    return "/".join(path.parts[-3:])


def _dump(doc: dict[str, Any]) -> bytes:
    return json.dumps(doc).encode()


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.hostile"
    tmp.write_bytes(data)
    os.replace(tmp, path)


def rejected(payload: Payload, logged: list[dict[str, Any]]) -> str | None:
    """The reason some node logged for this payload, or None."""
    for e in logged:
        if e.get("event") not in REJECTION_EVENTS:
            continue
        if e.get("peer") == payload.key or str(e.get("path", "")).endswith("/" + payload.key):
            return str(e.get("reason"))
    return None
