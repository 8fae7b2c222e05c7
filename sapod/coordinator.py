"""The coordinator: opens rounds and advances them. Light, no GPU, never imports torch.

A round advances when every live worker (at least one) has submitted for it,
or when ROUND_TIMEOUT has passed (on this node's monotonic clock) with at least
one submission. Each start takes the next epoch; a coordinator that sees a higher
epoch than its own steps down (Displaced, exit 4).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

import structlog

from sapod import PROTOCOL, paths, schema
from sapod.config import recorded_settings
from sapod.daemon import freeze_startup_heap
from sapod.errors import ConfigError, Displaced, Rejected, StartupError, Unreadable
from sapod.executor import run_write
from sapod.housekeeping import round_folders, set_aside_archives, tidy_for
from sapod.node import Node
from sapod.peers import PeerTable
from sapod.rounds import TIMED_OUT, RoundBook
from sapod.schema import State
from sapod.state import StateReader, read_experiment
from sapod.store import ROLLOUT_FILE_MAX, atomic_write_json, list_node_entries, read_each, read_json
from sapod.tasks import task_spec_problem
from sapod.watch import folder_version


class Coordinator(Node):
    role = "coordinator"

    async def main(self) -> None:
        await self.set_phase("register")
        if not paths.experiment_file(self.root).exists():  # a new run: the workers will take our TASKS
            if problem := await asyncio.to_thread(task_spec_problem, self.cfg.tasks):
                raise ConfigError(f"TASKS={self.cfg.tasks!r}: {problem}")
        settings = await self.steady("experiment", self._ensure_experiment)
        self.reader = StateReader(self.root, trust_stat=self.inline_io)
        self.table = PeerTable.shared(self.root, self.cfg.peer_timeout, concurrent=not self.inline_io)
        # The rewards folder's watch.folder_version at the last look (a round's own folder
        # has its own watch, so a version from an earlier round's folder is never taken).
        self._rewards_listed_at: tuple[int, int] | None = None
        state = await self.steady("takeover", self._take_over)
        self.log.info("coordinating", epoch=state.epoch, round=state.round, status=state.status, **settings)
        book = RoundBook(state.round, state.stage)
        freeze_startup_heap()
        opened = guard_due = time.monotonic()
        while not self.stop.is_set() and state.status == "open":
            self.round = state.round
            structlog.contextvars.bind_contextvars(round=state.round, stage=state.stage)
            if self.phase != "collect":
                await self.set_phase("collect")
            try:
                # Watch first, then look, then wait: a submission that landed before the
                # watch existed is found by the look, not by the next rescan.
                rewards = paths.rewards_dir(self.root, state.round, state.stage)
                self.watch(paths.peers_dir(self.root), rewards)
                await self.io(self.table.refresh, self.peer_refresh_age)
                if time.monotonic() >= guard_due:  # once per POLL_INTERVAL, not on every file event
                    await self.io(self._guard, state)
                    guard_due = time.monotonic() + self.cfg.poll_interval
                had = len(book.accepted)
                await self.io(self._collect, book)
                if len(book.accepted) > had:
                    self.poll_soon()  # submissions are coming in: the rest are likely close behind
                if book.accepted and self.table.live("worker") <= book.accepted.keys():
                    await self.io(self.table.refresh)  # about to advance: make sure no newcomer is missed
                reason = book.decide(self.table.live("worker"), time.monotonic() - opened, self.cfg.round_timeout)
                if reason is not None:
                    state = await self._advance(state, book, reason, time.monotonic() - opened)
                    book = RoundBook(state.round, state.stage)
                    opened = time.monotonic()
                    self.poll_soon()
                self.io_ok()
            except OSError as exc:
                await self.io_trouble(exc, self.phase)
                continue
            if reason is None:
                # Each missing submission, when it comes, makes an event: wake for no fewer.
                self.expect(rewards, self._rewards_listed_at, len(self.table.live("worker") - book.accepted.keys()))
                await self.wait_event()
        if state.status == "finished":
            self.status = "finished"
            await self.set_phase("finished")
            await self.progress("finished", rounds=state.round + 1)

    # -- experiment and state -----------------------------------------------------
    def _ensure_experiment(self) -> dict[str, Any]:
        """The swarm's settings: those recorded in experiment.json, or ours, recorded now
        if there is no such file. A file that cannot be read now is waited for (steady
        retries), never written over; one that is not valid stops the coordinator."""
        ours = self.cfg.settings()
        path = paths.experiment_file(self.root)
        try:
            recorded = read_experiment(self.root, strict=True)
        except Unreadable as exc:
            raise exc.as_oserror(path) from None
        except Rejected as exc:
            raise StartupError(f"{path} is not a valid record of the swarm's settings ({exc.reason}): "
                               "fix it, or remove it to record this coordinator's") from None
        if recorded is None:  # a new run
            stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
            set_aside_archives(paths.archives_dir(self.cfg.shared), self.root.name, stamp)
            atomic_write_json(paths.experiment_file(self.root), {
                "schema": schema.EXPERIMENT, "protocol": PROTOCOL, "created_at": time.time(),
                "created_by": {"node_id": self.node_id, "instance": self.instance}, "settings": ours})
            return ours
        try:
            theirs = recorded_settings(recorded, [k for k in ours if k != "max_rounds"])
        except ConfigError as exc:
            raise StartupError(f"{path}: {exc}") from None
        differ = sorted(k for k, v in theirs.items() if ours[k] != v)
        if differ:
            self.log.warning("experiment_settings_differ", recorded_wins=differ)
        return {**ours, **theirs}

    def _take_over(self) -> State:
        """Start or resume the swarm's state one epoch above whatever is there.

        A view of the folder can be stale (a replica that has not synced): a tally
        proves its round closed, so the state never reopens a round at or below the
        highest tally seen. Nodes accept only a state whose epoch is not below the one
        they follow, so the new epoch is above every epoch seen in the state file, a
        tally or a heartbeat (each node's says which it follows). A state file that is
        there but cannot be read now is waited for (steady retries), not taken for none.
        """
        assert self.reader is not None
        old = self.reader.read()
        if old is None and isinstance(self.reader.problem, Unreadable):
            raise self.reader.problem.as_oserror(paths.state_file(self.root))
        closed, tally_epoch = self._last_tally()
        self.table.refresh()
        seen_epoch = max([tally_epoch, *(p.epoch for p in self.table.peers().values())])
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
        if closed >= new.round and new.status == "open":
            self.log.warning("stale_state_skipped", state_round=new.round, last_tally=closed)
            if closed + 1 >= self.cfg.max_rounds:
                new = replace(new, round=closed, stage=0, status="finished", opened_at=now)
            else:
                new = replace(new, round=closed + 1, stage=0, opened_at=now)
        if new.status == "open" and new.round >= self.cfg.max_rounds:
            # MAX_ROUNDS was lowered below the open round: finish after the last round it
            # allows, as if that one had just closed (raising it again reopens this one).
            self.log.warning("max_rounds_reached", state_round=new.round, max_rounds=self.cfg.max_rounds)
            new = replace(new, round=new.round - 1, stage=0, status="finished")
        if seen_epoch >= new.epoch:
            new = replace(new, epoch=seen_epoch + 1)
        atomic_write_json(paths.state_file(self.root), schema.state_doc(new))
        self.reader.current = new
        self.epoch = new.epoch
        return new

    def _last_tally(self) -> tuple[int, int]:
        """(highest round with a tally, highest epoch in it), or (-1, 0)."""
        rounds = sorted((r for r, _ in round_folders(paths.rewards_root(self.root))), reverse=True)
        for r in rounds[:8]:  # the newest few suffice; older ones are behind any state
            try:
                doc = read_json(paths.tally_file(self.root, r, 0))
                if doc is not None:
                    return r, schema.parse_tally(doc, r, 0).epoch
            except Rejected:
                continue
        return -1, 0

    def _guard(self, mine: State) -> None:
        """Step down for a newer coordinator; put our state back if an older one (or a
        stale replica) wrote over it. Equal epochs (two coordinators that started from
        one stale view) are settled by instance id, so exactly one carries on."""
        try:
            doc = read_json(paths.state_file(self.root))
            seen = None if doc is None else schema.parse_state(doc)
        except Rejected:
            return
        if seen is None:
            return
        if (seen.epoch, seen.instance) > (mine.epoch, mine.instance):
            raise Displaced(f"coordinator {seen.coordinator} (epoch {seen.epoch}) took over")
        if seen.instance != mine.instance or seen.seq < mine.seq:
            self.log.warning("state_restored", overwritten_by=seen.coordinator, their_epoch=seen.epoch,
                             their_seq=seen.seq)
            atomic_write_json(paths.state_file(self.root), schema.state_doc(mine))

    def _collect(self, book: RoundBook) -> None:
        folder = paths.rewards_dir(self.root, book.round, book.stage)
        self._rewards_listed_at = folder_version(str(folder))
        waiting = [(n, p) for n, (p, _) in list_node_entries(folder).items() if not book.counted(n)]
        docs = read_each(lambda item: read_json(item[1], ROLLOUT_FILE_MAX), waiting, not self.inline_io)
        # Several at a time on a network mount: submissions land together at a round's end.
        for (node_id, _), doc in zip(waiting, docs):
            reason = book.offer(node_id, doc)
            if reason is not None:
                self.log.warning("submission_rejected", peer=node_id, reason=reason)

    async def _advance(self, state: State, book: RoundBook, reason: str, seconds: float) -> State:
        """Close the round: one last look, the tally, then the next state.

        The tally (rewards/round_r/stage_s/_tally.json) is written before the state
        moves on: it is the record of which submissions counted. A coordinator killed
        between the two writes reopens the same round and writes it again.
        """
        collected_at = time.time()
        await self.io(self._collect, book)  # the last look: nothing that landed before it is left out
        await self.io(self._guard, state)
        live = self.table.live("worker")
        tally = book.tally(live=live, reason=reason, coordinator=self.node_id, instance=self.instance,
                           epoch=self.epoch, seconds=seconds, collected_at=collected_at, closed_at=time.time())
        await self.publish(paths.tally_file(self.root, state.round, state.stage), tally)
        nxt = state.round + 1
        if nxt >= self.cfg.max_rounds:
            new = State(state.round, state.stage, state.epoch, state.seq + 1, "finished", state.opened_at,
                        self.node_id, self.instance)
        else:
            new = State(nxt, 0, state.epoch, state.seq + 1, "open", time.time(), self.node_id, self.instance)
        await self.publish(paths.state_file(self.root), schema.state_doc(new))
        self.reader.current = new
        submitted, missing, mean = sorted(book.accepted), tally["missing"], book.mean_reward()
        self.log.info("round_complete", round=state.round, submitted=submitted, missing=missing,
                      timed_out=reason == TIMED_OUT, seconds=round(seconds, 3), reward_mean=round(mean, 4))
        await self.progress("round_complete", round=state.round, submitted=submitted, missing=missing,
                            timed_out=reason == TIMED_OUT, seconds=seconds, reward_mean=mean)
        self.flush_records()
        if new.status == "open":
            # Never inline: packing and removing old rounds can take minutes (cleanup turned
            # on late, or KEEP_LAST lowered), and heartbeats and WATCHDOG=1 must go on.
            await run_write(tidy_for, self.cfg, new.round)  # logs rounds_tidied itself
        return new
