"""The coordinator: opens rounds and advances them. Light, no GPU, never imports torch.

A round advances when every live worker has submitted for it, or when
ROUND_TIMEOUT has passed (on this node's monotonic clock) with at least one
submission. Each start takes the next epoch; a coordinator that sees a higher
epoch than its own steps down (Displaced, exit 4).
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from sapod import PROTOCOL, paths, schema
from sapod.errors import Displaced, Rejected
from sapod.housekeeping import tidy_for
from sapod.node import Node
from sapod.peers import PeerTable
from sapod.schema import State, Submission, parse_submission
from sapod.state import StateReader, read_experiment
from sapod.store import ROLLOUT_FILE_MAX, atomic_write_json, list_node_files, read_json


class Coordinator(Node):
    role = "coordinator"

    async def main(self) -> None:
        await self.set_phase("register")
        settings = await self.io(self._ensure_experiment)
        self.reader = StateReader(self.root, trust_stat=self.inline_io)
        self.table = PeerTable.shared(self.root, self.cfg.peer_timeout)
        state = await self.io(self._take_over)
        self.log.info("coordinating", epoch=state.epoch, round=state.round, status=state.status, **settings)
        self._accepted: dict[str, Submission] = {}
        self._rejected: dict[str, str] = {}
        opened = time.monotonic()
        while not self.stop.is_set() and state.status == "open":
            self.round = state.round
            structlog.contextvars.bind_contextvars(round=state.round, stage=state.stage)
            if self.phase != "collect":
                await self.set_phase("collect")
            # Watch first, then look, then wait: a submission that landed before the
            # watch existed is found by the look, not by the next rescan.
            self.watch(paths.peers_dir(self.root), paths.rewards_dir(self.root, state.round, state.stage))
            await self.io(self.table.refresh, self.peer_refresh_age)
            await self.io(self._collect, state)
            submitted = set(self._accepted)
            if submitted and self.table.live("worker") <= submitted:
                await self.io(self.table.refresh)  # about to advance: make sure no newcomer is missed
            live = self.table.live("worker")
            timed_out = time.monotonic() - opened >= self.cfg.round_timeout
            if submitted and (live <= submitted or timed_out):
                state = await self._advance(state, live, submitted, timed_out, time.monotonic() - opened)
                opened = time.monotonic()
                self.poll_soon()
                continue
            await self.wait_event()
        if state.status == "finished":
            self.status = "finished"
            await self.set_phase("finished")
            await self.progress("finished", rounds=state.round + 1)

    # -- experiment and state -----------------------------------------------------
    def _ensure_experiment(self) -> dict[str, Any]:
        ours = self.cfg.settings()
        recorded = read_experiment(self.root)
        if recorded is None:
            atomic_write_json(paths.experiment_file(self.root), {
                "schema": schema.EXPERIMENT, "protocol": PROTOCOL, "created_at": time.time(),
                "created_by": {"node_id": self.node_id, "instance": self.instance}, "settings": ours})
            return ours
        differ = {k: (recorded.get(k), v) for k, v in ours.items() if recorded.get(k) != v and k != "max_rounds"}
        if differ:
            self.log.warning("experiment_settings_differ", recorded_wins=sorted(differ))
        return {**ours, **{k: v for k, v in recorded.items() if k in ours and k != "max_rounds"}}

    def _take_over(self) -> State:
        """Start or resume the swarm's state one epoch above whatever is there."""
        old = self.reader.read()
        now = time.time()
        if old is None:
            new = State(0, 0, 1, 1, "open", now, self.node_id, self.instance)
        else:
            status = old.status
            if status == "finished" and old.round + 1 < self.cfg.max_rounds:
                # MAX_ROUNDS was raised: carry on with the next round.
                new = State(old.round + 1, 0, old.epoch + 1, old.seq + 1, "open", now, self.node_id, self.instance)
            else:
                new = State(old.round, old.stage, old.epoch + 1, old.seq + 1, status, old.opened_at,
                            self.node_id, self.instance)
        atomic_write_json(paths.state_file(self.root), schema.state_doc(new))
        self.reader.current = new
        self.epoch = new.epoch
        return new

    def _fence(self) -> None:
        """Step down if a newer coordinator has written the state since we did."""
        seen = self.reader.read()
        if seen is not None and (seen.epoch > self.epoch or
                                 (seen.epoch == self.epoch and seen.instance != self.instance)):
            raise Displaced(f"coordinator {seen.coordinator} (epoch {seen.epoch}) took over")

    def _collect(self, state: State) -> None:
        folder = paths.rewards_dir(self.root, state.round, state.stage)
        for node_id, path in list_node_files(folder).items():
            if node_id in self._accepted:
                continue
            try:
                doc = read_json(path, ROLLOUT_FILE_MAX)
                if doc is None:
                    continue
                self._accepted[node_id] = parse_submission(doc, node_id, state.round, state.stage)
            except Rejected as exc:
                if self._rejected.get(node_id) != exc.reason:
                    self._rejected[node_id] = exc.reason
                    self.log.warning("submission_rejected", peer=node_id, reason=exc.reason)

    async def _advance(self, state: State, live: set[str], submitted: set[str], timed_out: bool,
                       seconds: float) -> State:
        await self.io(self._fence)
        mean = sum(s.reward_mean for s in self._accepted.values()) / len(self._accepted)
        missing = sorted(live - submitted)
        self.log.info("round_complete", round=state.round, submitted=sorted(submitted), missing=missing,
                      timed_out=timed_out, seconds=round(seconds, 3), reward_mean=round(mean, 4))
        await self.progress("round_complete", round=state.round, submitted=sorted(submitted), missing=missing,
                            timed_out=timed_out, seconds=seconds, reward_mean=mean)
        nxt = state.round + 1
        if nxt >= self.cfg.max_rounds:
            new = State(state.round, state.stage, state.epoch, state.seq + 1, "finished", state.opened_at,
                        self.node_id, self.instance)
        else:
            new = State(nxt, 0, state.epoch, state.seq + 1, "open", time.time(), self.node_id, self.instance)
        await self.publish(paths.state_file(self.root), schema.state_doc(new))
        self.reader.current = new
        self._accepted, self._rejected = {}, {}
        await self.io(self.records.flush)
        if new.status == "open":
            tidied = await self.io(tidy_for, self.cfg, new.round)
            if tidied and (tidied["rounds_removed"] or tidied["errors"]):
                self.log.info("rounds_tidied", **tidied)
        return new
