"""A training node. Its state machine, in one place:

    register -> await_stage -> generate -> publish -> gather -> train -> submit
             -> [checkpoint] -> await_stage ... -> finished

Generation, training and checkpoints run on the process's single GPU thread;
the loop keeps heartbeats and file events flowing meanwhile. A worker that
starts late or restarts resumes from its latest complete checkpoint and joins
the round that is open now; it never writes into a closed round.
"""

from __future__ import annotations

import asyncio
import errno
import random
import time
from typing import Any, TypeVar

import structlog

from sapod import paths, schema
from sapod.checkpoint import (carried_forward, clear_stale_tmp, dir_bytes, free_bytes, list_checkpoints, owed_submission,
                              read_counters, save_checkpoint)
from sapod.daemon import freeze_startup_heap
from sapod.config import recorded_settings
from sapod.errors import ConfigError, Displaced, Rejected, StartupError, Stopping
from sapod.executor import GPU, first_done, run_on_gpu
from sapod.gather import (GatherResult, choose_external, list_peer_rollouts, own_rollouts, own_submission,
                          rollouts_doc)
from sapod.node import Node
from sapod.peers import PeerTable
from sapod.policy.loader import load_policy
from sapod.sampling import round_seed
from sapod.schema import State
from sapod.state import StateReader, read_experiment
from sapod.tasks import default_system_prompt, make_task_source
from sapod.types import Group
from sapod.watch import folder_version

T = TypeVar("T")
CHECKPOINT_HEADROOM = 1.2  # free space wanted, relative to the last checkpoint's size
SWARM_SETTINGS = ("num_train_samples", "num_transplant_trees", "num_generations", "tasks", "seed")


class Worker(Node):
    role = "worker"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.cumulative_reward = 0.0
        self.rounds_done = 0
        self.external_used = 0
        self.last_round = -1  # last round this node finished (trained on)
        self.dirty = False  # model changed since the last checkpoint
        self.gpu_abandoned = False
        self.checkpoint_owed = False  # the last checkpoint attempt failed or was skipped
        self.checkpoint_bytes = 0  # size of the last checkpoint: the space the next one needs
        # (round, stage, document) of a trained round whose submission is not out yet (a
        # stop came while its publish was retried): kept in checkpoints, sent when back.
        self.unsubmitted: tuple[int, int, dict[str, Any]] | None = None
        # Only the first round this instance runs can hold files of an earlier instance.
        self._first_round = True

    async def main(self) -> None:
        await self.set_phase("register")
        # The model loads while the id is claimed; a name that cannot load should fail at
        # once, not after waiting for a coordinator.
        loading = asyncio.ensure_future(run_on_gpu(lambda: load_policy(self.cfg, default_system_prompt())))
        try:
            await self._claim_id()
            assert self.stopping is not None
            await first_done(loading, self.stopping)  # a stop need not wait for a slow load
            if not loading.done():
                raise Stopping()
            self.policy = loading.result()
        except (StartupError, Displaced, Stopping):
            loading.cancel()
            raise
        except Exception as exc:  # a model that cannot load is a failed start, not a crash
            raise StartupError(f"cannot load model {self.cfg.model!r}: {exc}") from exc
        try:
            await self._adopt_settings()
        except Stopping:
            return
        try:
            self.tasks = make_task_source(self.cfg.tasks)
        except ValueError as exc:
            raise StartupError(f"TASKS={self.cfg.tasks!r}: {exc}") from None
        await self._resume()
        freeze_startup_heap()
        self.reader = StateReader(self.root, trust_stat=self.inline_io)
        self.table = PeerTable.shared(self.root, self.cfg.peer_timeout, concurrent=not self.inline_io)
        await self.progress("started", model=self.cfg.model, resumed_round=self.last_round)
        try:
            while not self.stop.is_set():
                await self.set_phase("await_stage")
                try:
                    state = await self._await_state()
                    if state is None:
                        break
                    if state.status == "finished":
                        self.status = "finished"
                        break
                    await self._round(state)
                    self.io_ok()
                except Stopping:
                    self.log.info("round_abandoned", round=self.round)
                    break
                except OSError as exc:
                    # Nothing of this round was trained on yet (a failed submission is
                    # retried in place): try it again the way a restart would, reusing
                    # rollouts that did get published.
                    self._first_round = True
                    await self.io_trouble(exc, self.phase)
        finally:
            await self._final_checkpoint()
        if self.status == "finished":
            await self.set_phase("finished", rounds_done=self.rounds_done)
            await self.progress("finished", rounds_done=self.rounds_done, cumulative_reward=self.cumulative_reward)

    # -- startup --------------------------------------------------------------------
    async def _adopt_settings(self) -> None:
        """The coordinator's experiment.json settings are the swarm's; wait for it."""
        self.watch(self.root)
        while (settings := await self.steady("settings", read_experiment, self.root)) is None:
            if self.stop.is_set():
                raise Stopping()
            await self.wait_event()
        try:
            recorded = recorded_settings(settings, SWARM_SETTINGS)
        except ConfigError as exc:
            raise StartupError(f"{paths.experiment_file(self.root)}: {exc}") from None
        changes = {k: v for k, v in recorded.items() if v != getattr(self.cfg, k)}
        if changes:
            self.log.info("settings_from_experiment", **changes)
            self.cfg = self.cfg.with_(**changes)

    async def _claim_id(self) -> None:
        """Do no work until NODE_ID is surely ours.

        Registration overwrote the peer file; a daemon already running under this id
        writes it back at its next heartbeat. Checking once one and a half heartbeats
        after registering means a second daemon steps down (exit 4) before it has
        published or trained anything, so nothing is done twice under one name.
        """
        left = self.registered_at + 1.5 * self.cfg.heartbeat_interval - time.monotonic()
        if left > 0:
            await self.nap(left)
        await self.steady("claim_id", self.heartbeat)

    async def _resume(self) -> None:
        """From the newest checkpoint that restores; an older one if the newest does not
        (a save cut short by a power loss); none at all is a startup error."""
        if stale := await self.steady("resume", clear_stale_tmp, self.root, self.node_id):
            self.log.info("stale_checkpoint_tmp_removed", folders=stale)
        found = await self.steady("resume", list_checkpoints, self.root, self.node_id)
        failed: list[str] = []
        for round_, directory in reversed(found):
            try:
                counters = await self.io(read_counters, directory, self.node_id)
                await run_on_gpu(self.policy.load, directory)
                break
            except (Rejected, OSError, ValueError, RuntimeError) as exc:
                self.log.error("checkpoint_unusable", checkpoint=str(directory), error=str(exc)[:300])
                failed.append(f"{directory}: {exc}")
        else:
            if failed:
                raise StartupError(f"no checkpoint can be restored ({'; '.join(failed)})")
            return
        self.unsubmitted = owed_submission(counters, self.node_id)
        counters = await self.io(carried_forward, self.root, self.node_id, counters)
        self.last_round = counters["round"]
        self.rounds_done = counters["rounds_done"]
        self.cumulative_reward = float(counters["cumulative_reward"])
        self.external_used = int(counters.get("external_used", 0))
        self.round = self.last_round
        self.checkpoint_bytes = await self.steady("resume", dir_bytes, directory)
        self.log.info("resumed", checkpoint=str(directory), round=self.last_round, rounds_done=self.rounds_done)
        await self.progress("resumed", checkpoint_round=round_)

    async def _await_state(self) -> State | None:
        self.watch(paths.state_dir(self.root))
        self.flush_records()  # the round's records, one append per file, written meanwhile
        while not self.stop.is_set():
            state = await self.io(self.reader.read)
            if state is not None and self.unsubmitted is not None:
                await self._submit_owed(state)
            if state is not None and (state.status == "finished" or state.round > self.last_round):
                return state
            await self.wait_event()
        return None

    # -- one round ------------------------------------------------------------------
    async def _gpu(self, fn: Any, *args: Any) -> Any:
        """GPU work that a stop waits for, but at most STOP_TIMEOUT longer."""
        fut = GPU.submit(fn, *args)
        assert self.stopping is not None
        await first_done(fut, self.stopping)
        if not fut.done():
            done, _ = await asyncio.wait({fut}, timeout=self.cfg.stop_timeout)
            if not done:
                self.gpu_abandoned = True
                raise Stopping()
        return fut.result()

    def _check_stop(self) -> None:
        self.check_displaced()
        if self.stop.is_set():
            raise Stopping()

    async def _round(self, state: State) -> None:
        r, s, cfg = state.round, state.stage, self.cfg
        self.round = r
        structlog.contextvars.bind_contextvars(round=r, stage=s)
        first, self._first_round = self._first_round, False
        if first and await self.io(own_submission, self.root, r, s, self.node_id):
            self.log.info("already_submitted", round=r)  # a restart after submitting
            self.last_round = r
            return
        t_round = time.monotonic()
        await self.set_phase("generate")
        t0 = time.monotonic()
        earlier = await self.io(own_rollouts, self.root, r, s, self.node_id, self.tasks) if first else None
        if earlier is not None:
            items, gen = earlier
            self.log.info("reusing_published_rollouts", round=r)
        else:
            items = self.tasks.sample(cfg.num_train_samples, round_seed(cfg.seed, self.node_id, r, "questions"))
            gen = await self._gpu(self.policy.generate, items, cfg.num_generations,
                                  round_seed(cfg.seed, self.node_id, r, "generate"))
        completions, tokens = gen.completions, gen.tokens
        t_generate = time.monotonic() - t0
        self._check_stop()

        if earlier is None:
            await self.set_phase("publish", tokens=tokens, seconds=round(t_generate, 3))
            doc = rollouts_doc(self.node_id, self.instance, r, s, state.epoch, cfg.model, items, completions,
                               gen.finished)
            await self.publish(paths.rollout_file(self.root, r, s, self.node_id), doc)

        await self.set_phase("gather")
        t0 = time.monotonic()
        result = await self._gather(r, s)
        t_gather = time.monotonic() - t0
        local = [Group(it, comps, await self.io(self._score, it, comps), self.node_id, fin)
                 for it, comps, fin in zip(items, completions, gen.finished)]
        rng = random.Random(round_seed(cfg.seed, self.node_id, r, "external"))
        external, available, dropped = await self.io(choose_external, result, self.tasks, cfg.num_transplant_trees, rng,
                                                     4 * max(cfg.num_generations, 8), cfg.num_train_samples, r, s,
                                                     not self.inline_io)
        self._check_stop()

        await self.set_phase("train", local=len(local), external=len(external))
        t0 = time.monotonic()
        stats = await self._gpu(self.policy.train_step, local + external)
        t_train = time.monotonic() - t0
        self.dirty = True
        own = [x for g in local for x in g.rewards]
        reward_sum = sum(own)
        reward_mean = reward_sum / len(own)
        self.cumulative_reward += reward_mean
        self.rounds_done += 1
        self.external_used += len(external)
        self.last_round = r

        await self.set_phase("submit")
        sub = schema.submission_doc(self.node_id, self.instance, r, s, state.epoch, reward_mean=reward_mean,
                                    reward_sum=reward_sum, n_completions=len(own), n_local=len(local),
                                    external_sources=[g.source for g in external],
                                    cumulative_reward=self.cumulative_reward)
        row = {
            "ts": time.time(), "round": r, "stage": s, "node_id": self.node_id, "rewards": own,
            "reward_mean": reward_mean, "reward_sum": reward_sum, "cumulative_reward": self.cumulative_reward,
            "n_local": len(local), "n_external": len(external), "external_from": sorted({g.source for g in external}),
            "external_available": available, "dropped_zero_advantage": dropped,
            "rejected_invalid": result.invalid_items + len(result.rejected), "submitted": False,
            "submitted_at": None, "instance": self.instance,
            "loss": stats.get("loss", 0.0), "grad_norm": stats.get("grad_norm", 0.0),
            "tokens_generated": tokens, "tokens_trained": stats.get("tokens", 0),
            "t_generate": t_generate, "t_gather": t_gather, "t_train": t_train, "t_checkpoint": 0.0,
        }
        self.unsubmitted = (r, s, sub)
        try:
            closed, submitted_at = await self._submit(r, s, sub)
        except Stopping:  # trained on, so kept: the row now, the submission when the worker is back
            self.records.add(paths.metrics_file(self.root, self.node_id),
                             {**row, "owed": True, "t_round": time.monotonic() - t_round})
            raise
        self.unsubmitted = None

        if (r + 1) % cfg.checkpoint_interval == 0 or self.checkpoint_owed:
            row["t_checkpoint"] = await self._checkpoint()
        row.update(submitted=not closed, submitted_at=submitted_at, t_round=time.monotonic() - t_round)
        self.records.add(paths.metrics_file(self.root, self.node_id), row)
        self.log.info("round_done", reward_mean=round(reward_mean, 4), cumulative=round(self.cumulative_reward, 4),
                      external=len(external), loss=round(row["loss"], 5), seconds=round(row["t_round"], 3))
        await self.progress("round_complete", reward_mean=reward_mean, cumulative_reward=self.cumulative_reward,
                            n_external=len(external))

    async def _submit(self, r: int, s: int, doc: dict[str, Any]) -> tuple[bool, float | None]:
        """Publish the round's submission, retrying through folder trouble: the model
        has trained on this round, so the round is never re-run. ``(closed, when)``:
        closed when the round was over before we could submit (nothing written)."""
        while True:
            try:
                if await self.io(self._round_closed, r):
                    self.log.warning("round_closed_before_submit", round=r)
                    return True, None
                await self.publish(paths.reward_file(self.root, r, s, self.node_id), doc)
                return False, time.time()
            except OSError as exc:
                self._check_stop()
                await self.io_trouble(exc, "submit")

    async def _submit_owed(self, state: State) -> None:
        """The submission of a round trained on before a stop, while that round is open:
        the coordinator waits for it (with a single worker, for ever)."""
        assert self.unsubmitted is not None
        r, s, doc = self.unsubmitted
        if state.round < r and state.status == "open":
            return  # a view from before that round: wait for a newer one
        if (state.round, state.stage, state.status) == (r, s, "open"):
            closed, _ = await self._submit(r, s, doc)
            if not closed:
                self.log.info("owed_submission_published", round=r)
        self.unsubmitted = None

    def _score(self, item: Any, completions: list[str]) -> list[float]:
        return [self.tasks.score(item, c) for c in completions]

    def _round_closed(self, r: int) -> bool:
        # The last round closes without the round moving on: the state says finished at r.
        state = self.reader.read()
        return state is not None and (state.round > r or state.status == "finished")

    async def _gather(self, r: int, s: int) -> GatherResult:
        """Wait until every live peer's rollouts file is listed, or GATHER_TIMEOUT. Nothing
        is read here: the sampler reads the files it draws from (see choose_external)."""
        result = GatherResult()
        if self.cfg.num_transplant_trees == 0:
            return result
        rollouts_dir = paths.rollouts_dir(self.root, r, s)
        self.watch(rollouts_dir, paths.state_dir(self.root))
        deadline = time.monotonic() + self.cfg.gather_timeout
        state_dir, state_seen = str(paths.state_dir(self.root)), None
        while True:
            await self.io(self.table.refresh, self.peer_refresh_age)
            had = len(result.files)
            await self.io(list_peer_rollouts, self.root, r, s, self.node_id, result)
            if len(result.files) > had:
                self.poll_soon()  # peers are publishing: the rest are likely close behind
            waiting = self.table.live("worker") - {self.node_id} - result.files.keys()
            if not waiting:
                break
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.warning("gather_timeout", waiting_for=sorted(waiting), have=sorted(result.files))
                break
            # Has the round closed under us (we are the straggler)? Not worth a look while
            # inotify shows no change in the state folder since the last one.
            version = folder_version(state_dir)
            if version is None or version != state_seen:
                state_seen = version
                if await self.io(self._round_closed, r):
                    break
            self._check_stop()
            # Each missing file, when it comes, makes an event: wake for no fewer.
            assert result.listed is not None  # list_peer_rollouts sets it
            self.expect(rollouts_dir, result.listed.version, len(waiting))
            await self.wait_event(left)
        return result

    # -- checkpoints ------------------------------------------------------------------
    def _counters(self) -> dict[str, Any]:
        return {"rounds_done": self.rounds_done, "cumulative_reward": self.cumulative_reward,
                "external_used": self.external_used, "instance": self.instance, "seed": self.cfg.seed,
                # Every random choice is seeded from (SEED, node, round, purpose), so the
                # round number is the whole RNG state a resume needs.
                "rng": "derived from (seed, node_id, round, purpose)",
                "unsubmitted": None if self.unsubmitted is None else dict(
                    zip(("round", "stage", "doc"), self.unsubmitted))}

    async def _checkpoint(self) -> float:
        """Save, unless the disk cannot hold it: a failed or skipped checkpoint leaves
        the previous one in place and is owed, i.e. retried after the next round."""
        await self.set_phase("checkpoint")
        t0 = time.monotonic()
        try:
            free = await self.io(free_bytes, self.root)
            need = int(self.checkpoint_bytes * CHECKPOINT_HEADROOM) + 2**20
            if free < need:
                self.checkpoint_owed = True
                self.log.warning("checkpoint_skipped_low_space", free_bytes=free, need_bytes=need)
                return time.monotonic() - t0
            where = await run_on_gpu(save_checkpoint, self.root, self.node_id, self.last_round, self.policy,
                                     self._counters(), self.cfg.checkpoint_keep)
            self.checkpoint_bytes = await self.io(dir_bytes, where)
        except OSError as exc:
            self.checkpoint_owed = True
            self.log.error("checkpoint_failed", error=str(exc)[:300],
                           errno=errno.errorcode.get(exc.errno or 0, exc.errno))
            return time.monotonic() - t0
        self.dirty = self.checkpoint_owed = False
        await self.progress("checkpoint", path=str(where))
        return time.monotonic() - t0

    async def _final_checkpoint(self) -> None:
        if self.dirty and not self.gpu_abandoned and self._displaced is None and self.last_round >= 0:
            await self._checkpoint()
