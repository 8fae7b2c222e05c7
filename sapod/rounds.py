"""The coordinator's bookkeeping for the open round: which submissions count and
when the round may close. Pure (no files, no clock), so it can be tested on its own.

Rules:
- a submission counts once: the first valid file from a node is kept, later
  versions of that name are ignored (submissions are write-once);
- a rejected file is reported once per reason (it is re-offered on every rescan,
  because on a syncing mount a torn file may still become whole);
- a round closes when every live worker has a counted submission, or when
  ROUND_TIMEOUT has passed with at least one; an empty round never closes, and
  neither does one with no live worker before the timeout (a swarm restarted
  mid-round: the submissions left from before the stop are not "every worker"
  while the workers that owe theirs are still starting).
"""

from __future__ import annotations

from typing import Any

from sapod import schema
from sapod.errors import Rejected
from sapod.schema import Submission, parse_submission

ALL_SUBMITTED, TIMED_OUT = "all_submitted", "timeout"


class RoundBook:
    def __init__(self, round_: int, stage: int):
        self.round = round_
        self.stage = stage
        self.accepted: dict[str, Submission] = {}
        self._rejected: dict[str, set[str]] = {}

    def counted(self, node_id: str) -> bool:
        """Already counted: its file need not be read again."""
        return node_id in self.accepted

    def offer(self, node_id: str, doc: dict[str, Any] | Rejected | None) -> str | None:
        """Consider one submission file's content (None: not there yet; a Rejected:
        the file could not be read or parsed as JSON).

        Returns the rejection reason the first time this node's file is rejected for
        it (for the log), otherwise None.
        """
        if doc is None or node_id in self.accepted:
            return None
        try:
            if isinstance(doc, Rejected):
                raise doc
            self.accepted[node_id] = parse_submission(doc, node_id, self.round, self.stage)
        except Rejected as exc:
            reasons = self._rejected.setdefault(node_id, set())
            if exc.reason in reasons or len(reasons) >= 64:  # a flapping file is not logged forever
                return None
            reasons.add(exc.reason)
            return exc.reason
        self._rejected.pop(node_id, None)
        return None

    def decide(self, live: set[str], elapsed: float, timeout: float) -> str | None:
        """Why the round may close now (ALL_SUBMITTED or TIMED_OUT), or None to keep waiting."""
        if not self.accepted:
            return None
        if live and live <= self.accepted.keys():
            return ALL_SUBMITTED
        if elapsed >= timeout:
            return TIMED_OUT
        return None

    def mean_reward(self) -> float:
        return sum(s.reward_mean for s in self.accepted.values()) / max(1, len(self.accepted))

    def tally(self, *, live: set[str], reason: str, coordinator: str, instance: str, epoch: int,
              seconds: float, collected_at: float, closed_at: float) -> dict[str, Any]:
        """The record of what closed the round, written before the state moves on."""
        doc = schema.envelope(schema.TALLY, coordinator, instance, self.round, self.stage, epoch)
        doc.update(
            reason=reason,
            counted={n: {"instance": s.instance, "reward_mean": s.reward_mean} for n, s in sorted(self.accepted.items())},
            missing=sorted(live - self.accepted.keys()),
            seconds=seconds, collected_at=collected_at, closed_at=closed_at,
        )
        return doc
