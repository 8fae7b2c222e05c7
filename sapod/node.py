"""What every node shares: identity, registration, heartbeat, phases, stop handling.

A node is an object, not a process: several can run in one event loop (tests,
``sapod demo``, benchmarks). ``run()`` returns when the node is done or told to
stop, and raises ``Displaced`` or ``StartupError`` for the daemon to turn into an
exit code.
"""

from __future__ import annotations

import asyncio
import errno
import inspect
import os
import random
import socket
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import structlog

from sapod import __version__, owner, paths, schema
from sapod.config import Config
from sapod.errors import Displaced, StartupError, Stopping
from sapod.executor import finish, run_append, run_write
from sapod.housekeeping import remove_stale_temps
from sapod.logs import RecordBuffer, get_logger, write_records
from sapod.sdnotify import Notifier
from sapod.state import StateReader
from sapod.store import atomic_write_json
from sapod.watch import Watcher, is_remote, mount_fstype, pick_watch_mode

T = TypeVar("T")
BACKOFF_MAX = 60.0  # seconds between retries of a failing shared folder, at most
STARTUP_TRIES = 5  # registration attempts on a folder that fails with a transient error
TRANSIENT_ERRNOS = frozenset({errno.EIO, errno.ENOTCONN, errno.ESTALE, errno.EAGAIN, errno.ETIMEDOUT,
                              errno.EBUSY, errno.EINTR})


class Node:
    role = "node"

    def __init__(self, cfg: Config, *, stop: asyncio.Event | None = None):
        self.cfg = cfg
        self.root = cfg.root
        self.node_id = cfg.node_id
        self.instance = uuid.uuid4().hex
        self.started_at = time.time()
        self.stop = stop or asyncio.Event()
        self.phase = "starting"
        self.status = "running"
        self.round = -1
        self.beat = 0
        self.log = get_logger()
        self.watcher: Watcher | None = None
        self.reader: StateReader | None = None  # the swarm state, once the role reads it
        self.inline_io = False
        self.watch_mode = "poll"
        self._hb_task: asyncio.Task[None] | None = None
        self._hb_lock = asyncio.Lock()
        self.registered = asyncio.Event()  # set once the peer file is written at startup
        self._displaced: Displaced | None = None
        self.notifier = Notifier(cfg.notify_socket)
        self.records = RecordBuffer()
        self._appending: asyncio.Task[None] | None = None  # this node's records being appended
        self._wd_task: asyncio.Task[None] | None = None
        self._stop_task: asyncio.Task[None] | None = None  # settles `stopping` when stop is set
        # Done once stop is set (from startup on): a future to race other work against.
        self.stopping: asyncio.Future[None] | None = None
        # How stale a cached view of peers/ may be: heartbeats move only this often.
        self.peer_refresh_age = min(cfg.heartbeat_interval, cfg.peer_timeout / 4)
        self._hot_until = 0.0
        self._io_failures = 0
        self._degraded_since = 0.0

    # -- lifecycle ------------------------------------------------------------
    async def run(self) -> None:
        structlog.contextvars.bind_contextvars(node=self.node_id, role=self.role)
        # Resolved once, under the configuration in force now: a lazy logger would rebuild
        # itself on every call, and a node logs a dozen lines a round.
        self.log = get_logger().bind()
        try:
            await self.startup()
            self._hb_task = asyncio.create_task(self._heartbeat_loop(), name=f"heartbeat-{self.node_id}")
            if self.cfg.watchdog_usec > 0:
                self._wd_task = asyncio.create_task(self._watchdog_loop(), name=f"watchdog-{self.node_id}")
            self.notifier.ready(self._status_text())
            try:
                await self.main()
            except Stopping:
                self.log.info("stopped_while_retrying", phase=self.phase)
            self.check_displaced()
        except Exception as exc:
            if not isinstance(exc, (Displaced, StartupError)):
                await self.progress("error", error=f"{type(exc).__name__}: {exc}"[:500])
            raise
        finally:
            await self.shutdown()

    async def startup(self) -> None:
        self.watch_mode, why = pick_watch_mode(self.cfg.watch_mode, self.cfg.shared)
        self.inline_io = not is_remote(mount_fstype(self.cfg.shared))
        self.log.info("node_starting", version=__version__, instance=self.instance, model=self.cfg.model,
                      shared=str(self.cfg.shared), experiment=self.cfg.experiment, watch=self.watch_mode,
                      watch_reason=why, inline_io=self.inline_io)
        if self.watch_mode == "inotify" and not self.inline_io:
            self.log.warning("inotify_on_network_mount", reason=why, hint="WATCH_MODE=auto polls here")
        await self._yield_to_live_owner()
        for attempt in range(1, STARTUP_TRIES + 1):
            self.registered_at = time.monotonic()
            try:
                await self.io(self._check_folder)
                break
            except OSError as exc:
                # A flaky mount (EIO, ENOTCONN, ...) gets a few backed-off tries; a folder
                # that is not there (an unmounted mount point) fails at once.
                if exc.errno not in TRANSIENT_ERRNOS or attempt == STARTUP_TRIES:
                    raise StartupError(f"shared folder {self.cfg.shared} is not usable: {exc}") from None
                await self.io_trouble(exc, "register")
        self.io_ok()
        self.registered.set()
        self.watcher = Watcher(self.watch_mode, asyncio.get_running_loop())
        self.stopping = asyncio.get_running_loop().create_future()
        self._stop_task = asyncio.create_task(self._on_stop(), name=f"stop-{self.node_id}")

    async def io(self, fn: Callable[..., T], *args: Any) -> T:
        """Blocking file work: in a thread on network and FUSE mounts, where one call can
        hang for seconds and must not stall heartbeats; inline on a local disk, where a
        small read or write costs less than the hop to a thread and back."""
        if self.inline_io:
            return fn(*args)
        return await asyncio.to_thread(fn, *args)

    async def publish(self, path: Path, doc: dict[str, Any]) -> None:
        """A durable, atomic write, always in a thread: its fsyncs wait on the disk,
        and nodes sharing a process should wait in parallel, not one after another."""
        await run_write(atomic_write_json, path, doc)

    def _check_folder(self) -> None:
        if not self.cfg.shared.is_dir():
            raise OSError(f"{self.cfg.shared} is not a folder (is the drive mounted?)")
        for d in (paths.peers_dir(self.root), paths.state_dir(self.root), paths.logs_dir(self.root, self.node_id)):
            d.mkdir(parents=True, exist_ok=True)
        if stale := remove_stale_temps(paths.peer_file(self.root, self.node_id)):
            self.log.info("stale_temps_removed", folder="peers", count=stale)
        self._write_peer()

    async def main(self) -> None:
        raise NotImplementedError

    async def shutdown(self) -> None:
        self.notifier.stopping()
        # Cancel all before awaiting any: awaiting the first lets the others run, and a
        # watchdog ping sent after STOPPING=1 would tell systemd we are running again.
        tasks = [t for t in (self._hb_task, self._wd_task, self._stop_task) if t is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            try:
                await task
            except (asyncio.CancelledError, Displaced):
                pass
        if self.watcher is not None:
            self.watcher.close()
        if self._displaced is None and self.phase != "starting":
            if self.status in ("running", "degraded"):
                self.status = "stopped"
            try:
                await self.heartbeat()  # the final one says we are gone
            except (OSError, Displaced):
                pass
        await self.records_written()
        await self.io(self.records.flush)  # what failed on the way, and the lines since
        self.log.info("node_stopped", status=self.status if self.phase != "starting" else "never_started",
                      round=self.round)
        self.notifier.close()

    async def _watchdog_loop(self) -> None:
        """WATCHDOG=1 from the event loop itself: a wedged loop stops the pings and systemd restarts us."""
        interval = self.cfg.watchdog_usec / 2e6
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    def _status_text(self) -> str:
        where = f"round {self.round}" if self.round >= 0 else "no round yet"
        return f"{self.role} {self.node_id}: {self.phase}, {where}"

    # -- heartbeat --------------------------------------------------------------
    def _peer_doc(self) -> dict[str, Any]:
        # The epoch is the swarm state's this node follows: a coordinator that takes over
        # must start above it, or the node would ignore its state (Coordinator._take_over).
        followed = self.reader.current if self.reader is not None else None
        doc = schema.envelope(schema.PEER, self.node_id, self.instance, self.round, 0,
                              0 if followed is None else followed.epoch)
        doc.update(role=self.role, model=self.cfg.model, host=socket.gethostname()[:256], pid=os.getpid(),
                   version=__version__, started_at=self.started_at, beat=self.beat, phase=self.phase,
                   status=self.status)
        return doc

    def _write_peer(self) -> None:
        self.beat += 1
        atomic_write_json(paths.peer_file(self.root, self.node_id), self._peer_doc(), durable=False)

    async def _yield_to_live_owner(self) -> None:
        """Before registering: if the heartbeat already under this NODE_ID still moves,
        step down (exit 4) without touching its file. A crashed predecessor's beat stands
        still, so a restart waits about two heartbeats and then takes over."""
        first = await self.io(owner.look, self.root, self.node_id, self.instance)
        if first in (owner.ABSENT, owner.FREE):
            return
        deadline = time.monotonic() + 2 * self.cfg.heartbeat_interval + 0.5
        while time.monotonic() < deadline and not self.stop.is_set():
            await self.nap(self.cfg.heartbeat_interval / 4)
            now = await self.io(owner.look, self.root, self.node_id, self.instance)
            if now == owner.FREE:
                return
            first, moved = owner.still_beating(first, now)
            if moved:
                raise owner.displaced(now, self.node_id)

    def _check_owner(self) -> None:
        """Anyone else's instance in our peer file wrote it after our last beat: a twin.

        The later-started daemon yields (exit 4); the earlier one carries on and
        overwrites, so the twin sees the original owner on its next beat. A stale
        file from a crashed predecessor is overwritten at registration and never
        comes back.
        """
        other = owner.look(self.root, self.node_id, self.instance, io_errors=False)
        if isinstance(other, str):
            return
        if (other.started_at, other.instance) < (self.started_at, self.instance):
            raise owner.displaced(other, self.node_id)
        self.log.warning("duplicate_node_id", other_instance=other.instance, other_host=other.host)

    async def heartbeat(self) -> None:
        async with self._hb_lock:
            await self.io(self._check_owner)
            # On a network mount the write runs in a thread, which a cancel (at shutdown)
            # does not stop: the lock is held until it lands, or it could land after the
            # final "stopped" beat and say "running" again.
            await finish(self.io(self._write_peer))

    async def _heartbeat_loop(self) -> None:
        while True:
            await asyncio.sleep(self.cfg.heartbeat_interval)
            try:
                await self.heartbeat()
            except Displaced as exc:
                self._displaced = exc
                self.log.error("displaced", reason=str(exc))
                self.stop.set()
                return
            except OSError as exc:
                self.log.warning("heartbeat_failed", error=str(exc))

    # -- trouble with the shared folder ------------------------------------------------
    async def io_trouble(self, exc: OSError, where: str) -> None:
        """A file operation on the shared folder failed (EIO, ENOTCONN, ESTALE, a
        throttled FUSE call, ENOSPC...): report ourselves degraded, back off, carry on.

        Nothing on a network mount fails for good in a way a restart would fix, so the
        node stays up and retries: POLL_INTERVAL doubling per consecutive failure, with
        jitter (nodes throttled together should not retry together), at most 60 s.
        """
        self._io_failures += 1
        delay = min(BACKOFF_MAX, self.cfg.poll_interval * 2 ** min(self._io_failures - 1, 16))
        delay *= random.uniform(0.5, 1.0)
        if self.status == "running":
            self.status = "degraded"
            self._degraded_since = time.monotonic()
        self.log.warning("io_error", where=where, errno=errno.errorcode.get(exc.errno or 0, exc.errno),
                         error=str(exc)[:300], failures=self._io_failures, retry_in=round(delay, 2))
        await self.nap(delay)

    async def steady(self, where: str, fn: Callable[..., Any], *args: Any) -> Any:
        """fn(*args) through any number of I/O errors, backing off between tries (see
        io_trouble): file work (a plain function, run as ``io`` runs it) or a coroutine
        function. For the steps between registering and the main loop, which a transient
        EIO must not turn into a crash; Stopping if a stop request comes."""
        while True:
            try:
                if inspect.iscoroutinefunction(fn):
                    return await fn(*args)
                return await self.io(fn, *args)
            except OSError as exc:
                if self.stop.is_set():
                    raise Stopping() from exc
                await self.io_trouble(exc, where)
                if self.stop.is_set():
                    raise Stopping() from exc

    def io_ok(self) -> None:
        """A round of file work went through: no longer degraded."""
        if self._io_failures:
            self.log.info("recovered", failures=self._io_failures,
                          degraded_seconds=round(time.monotonic() - self._degraded_since, 3))
            self._io_failures = 0
            if self.status == "degraded":
                self.status = "running"

    async def nap(self, seconds: float) -> None:
        """Sleep, but wake at once for a stop request."""
        try:
            await asyncio.wait_for(self.stop.wait(), seconds)
        except asyncio.TimeoutError:
            pass

    def check_displaced(self) -> None:
        if self._displaced is not None:
            raise self._displaced

    # -- phases and waiting -------------------------------------------------------
    async def set_phase(self, phase: str, **fields: Any) -> None:
        """One canonical line and one training event per state transition."""
        previous, self.phase = self.phase, phase
        self.poll_soon()
        self.log.info("phase", phase=phase, previous=previous, **fields)
        if self.notifier.address:  # under systemd only
            self.notifier.status(self._status_text())
        self.records.add(paths.events_file(self.root, self.node_id), {
            "ts": time.time(), "node_id": self.node_id, "instance": self.instance, "round": self.round,
            "phase": phase, "previous": previous, **fields})

    async def progress(self, event: str, **fields: Any) -> None:
        """A progress record (started / round_complete / checkpoint / finished / error), written at the next flush."""
        self.records.add(paths.progress_file(self.root, self.node_id), {
            "ts": time.time(), "event": event, "node_id": self.node_id, "role": self.role,
            "instance": self.instance, "round": self.round, **fields})

    def flush_records(self) -> None:
        """Append the pending records on a records thread while the node goes on: an
        append waits on the folder (on a Drive mount it can mean uploading the file
        again), and the next phase need not wait for it. One batch of a node's at a
        time, so its records stay in order; what is added meanwhile goes with the next
        batch (a slow folder gets fewer, larger appends, not a queue that grows). Rows
        that fail are held for the next flush."""
        if self._appending is None or self._appending.done():
            self._appending = asyncio.ensure_future(self._append_pending())

    async def _append_pending(self) -> None:
        while pending := self.records.take():
            failed = await run_append(write_records, pending)
            self.records.restore(failed)
            if failed:
                return  # tried again at the next flush, not in a loop

    async def records_written(self) -> None:
        """Until the batch being appended, and any records it picks up after, are written."""
        if self._appending is not None:
            await asyncio.wait({self._appending})

    def watch(self, *folders: Path) -> None:
        assert self.watcher is not None
        self.watcher.watch(list(folders))

    def expect(self, folder: Path, since: tuple[int, int] | None, events: int) -> None:
        """The next wait wakes for ``folder`` only after ``events`` events (Watcher.expect)."""
        assert self.watcher is not None
        self.watcher.expect(str(folder), since, events)

    def poll_soon(self) -> None:
        """Something is expected soon (a phase began, or a wait saw part of what it waits
        for arrive): in poll mode, rescan 8 times as often for one POLL_INTERVAL, then at
        the normal pace.

        A quick round is then seen within a fraction of the interval, hop after hop
        (state -> workers -> peers' rollouts -> coordinator), and a wait whose files are
        arriving stays quick however long it is, while a wait with nothing arriving costs
        at most 8 extra reads. (A doubling back-off compounds across the hops instead.)
        """
        self._hot_until = time.monotonic() + self.cfg.poll_interval

    async def wait_event(self, timeout: float | None = None) -> None:
        """Until a file event, the next rescan, or a stop request."""
        assert self.watcher is not None
        rescan = self.cfg.poll_interval
        if self.watch_mode == "poll" and time.monotonic() < self._hot_until:
            rescan /= 8
        if not self.stop.is_set():  # a stop request wakes the watcher (_on_stop)
            await self.watcher.wait(rescan if timeout is None else min(timeout, rescan))
        self.check_displaced()

    async def _on_stop(self) -> None:
        """One waiter on the stop request for the node's life, so that each wait is a single
        future, not a task per wait (a node waits a few times a round, N nodes in a process
        N times that): it wakes the watcher and settles ``stopping``."""
        await self.stop.wait()
        if self.stopping is not None and not self.stopping.done():
            self.stopping.set_result(None)
        if self.watcher is not None:
            self.watcher.wake()
