"""``sapod demo``: a coordinator and N workers in one process on a temporary folder,
one line per completed round, and a summary table at the end."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.config import Config, add_arguments, build_config
from sapod.daemon import run_loop
from sapod.errors import ModelLoadError, Rejected
from sapod.logs import configure_logging, get_logger
from sapod.progress import metrics_summary, read_jsonl
from sapod.schema import parse_submission
from sapod.state import StateReader
from sapod.store import list_node_files, read_json

# The easy mix: sapod:tiny earns some reward there (almost none on the paper's nine tasks),
# so a demo shows training that can go somewhere.
DEMO_DEFAULTS: dict[str, Any] = {
    "experiment": "demo", "max_new_tokens": 48, "heartbeat_interval": 1.0, "peer_timeout": 30.0,
    "poll_interval": 0.5, "gather_timeout": 60.0, "round_timeout": 300.0, "log_level": "warning",
    "stop_timeout": 30.0, "learning_rate": 1e-4, "tasks": "easy",
}
SHARED_FLAGS = ("model", "seed", "num_train_samples", "num_transplant_trees", "num_generations", "max_new_tokens",
                "learning_rate", "tasks", "watch_mode", "log_format", "log_level", "cache_dir", "device",
                "experiment")


def say(text: str = "") -> None:
    """A line of the command's output (stdout; logs go to stderr)."""
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def demo_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sapod demo", description=(
        "Run a small swarm (a coordinator and N workers) in this process on a temporary folder "
        "with the embedded model, then print a summary."))
    parser.add_argument("--workers", type=int, default=2, help="number of workers [default: 2]")
    parser.add_argument("--rounds", type=int, default=3, help="rounds to run [default: 3]")
    # Not GDRIVE_PATH: with it and EXPERIMENT_NAME exported for a live swarm, a demo would take it over.
    parser.add_argument("--shared", metavar="DIR", help="folder to run in [default: a new temporary folder]")
    add_arguments(parser, only=SHARED_FLAGS, defaults=DEMO_DEFAULTS)
    args = parser.parse_args(argv)
    if args.workers < 1 or args.rounds < 1:
        parser.error("--workers and --rounds must be at least 1")
    flags = vars(args)
    shared = str(Path(flags["shared"]).expanduser()) if flags["shared"] else tempfile.mkdtemp(prefix="sapod-demo-")
    try:
        Path(shared).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        print(f"sapod demo: error: cannot use --shared {shared} as a folder: {exc.strerror or exc}", file=sys.stderr)
        return 2
    defaults = {**DEMO_DEFAULTS, "max_rounds": args.rounds, "checkpoint_interval": args.rounds}
    base = build_config({**flags, "shared": shared}, defaults=defaults)
    configure_logging(base.log_format, base.log_level, stream=sys.stderr)
    say(f"sapod demo: {args.workers} workers, {args.rounds} rounds, model {base.model}, "
         f"I={base.num_train_samples} J={base.num_transplant_trees} G={base.num_generations}")
    say(f"shared folder: {base.root}")
    if not prepare_model(base):
        return 3
    t0 = time.monotonic()
    reporter = _RoundReporter(base, worker_ids(args.workers))
    code = run_swarm(base, args.workers, reporter.report)
    _summary(base, time.monotonic() - t0)
    return code


def prepare_model(cfg: Config) -> bool:
    """Before a swarm starts: build sapod:tiny if that is the model. False (said) if it cannot be built."""
    if cfg.model != "sapod:tiny":
        return True
    try:
        prepare_tiny(cfg)
    except (ModelLoadError, OSError) as exc:
        say(f"cannot build sapod:tiny: {exc}")
        return False
    return True


def prepare_tiny(cfg: Config) -> None:
    """Build (once) and cache sapod:tiny, showing progress: a bar on a terminal, stages otherwise."""
    from sapod.policy.tiny import ensure_tiny

    tty = sys.stdout.isatty()
    shown: dict[str, int] = {}

    def progress(stage: str, fraction: float) -> None:
        pct = int(fraction * 100)
        if tty:
            bar = "#" * (pct // 5)
            sys.stdout.write(f"\rbuilding sapod:tiny: {stage:<10} [{bar:<20}] {pct:3d}%")
            sys.stdout.flush()
        elif pct // 25 > shown.get(stage, -1):
            shown[stage] = pct // 25
            say(f"building sapod:tiny: {stage} {pct}%")

    t0 = time.monotonic()
    where = ensure_tiny(cfg.cache_dir, progress=progress)
    if shown or tty and time.monotonic() - t0 > 1:
        say(("\r" if tty else "") + f"built sapod:tiny in {time.monotonic() - t0:.1f}s at {where}" + " " * 20)


def worker_ids(n_workers: int) -> list[str]:
    return [f"worker-{i + 1}" for i in range(n_workers)]


def run_swarm(base: Config, n_workers: int, on_poll: Callable[[], None] | None = None) -> int:
    """Run a coordinator and ``n_workers`` workers in this process on ``base.root`` until the
    experiment finishes or SIGINT/SIGTERM stops it; 1 if a node failed, else 0.

    ``on_poll`` (blocking, run in a thread) is called every 0.25 s while the swarm runs and once
    after it ended, never twice at once: it is how callers print progress. A stopped swarm
    returns 0 with its state still open; callers that care read the state.
    """
    return run_loop(_run_swarm(base, n_workers, on_poll))


async def _run_swarm(base: Config, n_workers: int, on_poll: Callable[[], None] | None) -> int:
    from sapod.coordinator import Coordinator
    from sapod.worker import Worker

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    coordinator = Coordinator(base.with_(role="coordinator", node_id="coordinator"), stop=stop)
    workers = [Worker(base.with_(role="worker", node_id=w), stop=stop) for w in worker_ids(n_workers)]

    def stop_if_failed(task: asyncio.Task[Any]) -> None:
        # Without this a swarm whose workers all failed to start would wait for them forever.
        if not task.cancelled() and task.exception() is not None:
            stop.set()

    def start(node: Any) -> asyncio.Task[Any]:
        task = asyncio.create_task(node.run(), name=node.node_id)
        task.add_done_callback(stop_if_failed)
        return task

    # The coordinator starts once every worker has registered (or ended): resuming a run
    # stopped mid-round, it must count a worker that still owes the open round among the
    # live ones before it decides that every live worker has submitted.
    worker_tasks = [start(w) for w in workers]
    for w, task in zip(workers, worker_tasks):
        registered = asyncio.ensure_future(w.registered.wait())
        await asyncio.wait({registered, task}, return_when=asyncio.FIRST_COMPLETED)
        registered.cancel()
    tasks = [start(coordinator), *worker_tasks]
    ended = asyncio.Event()

    async def report() -> None:
        if on_poll is None:
            return
        try:
            await asyncio.to_thread(on_poll)
        except Exception as exc:  # printing progress must never fail the swarm
            get_logger().warning("progress_report_failed", error=f"{type(exc).__name__}: {exc}")

    async def poll() -> None:
        while not ended.is_set():
            try:
                await asyncio.wait_for(ended.wait(), 0.25)
            except asyncio.TimeoutError:
                await report()

    watching = asyncio.create_task(poll())
    results = await asyncio.gather(*tasks, return_exceptions=True)
    ended.set()
    await watching  # lets a call in flight return before the last one
    await report()
    failed = [(t.get_name(), r) for t, r in zip(tasks, results) if isinstance(r, BaseException)]
    for name, exc in failed:
        say(f"{name} failed: {type(exc).__name__}: {exc}")
    return 1 if failed else 0


class _RoundReporter:
    """Prints one line per round once the coordinator has moved past it."""

    def __init__(self, cfg: Config, workers: list[str]):
        self.cfg, self.workers = cfg, workers
        self.reader = StateReader(cfg.root)
        self.reported, self.t0 = -1, time.monotonic()
        self.tty = sys.stdout.isatty()

    def report(self) -> None:
        state = self.reader.read()
        if state is None:
            return
        done = state.round - 1 if state.status == "open" else state.round
        if self.reported >= done:
            return
        # The coordinator's own open-to-advance time for each round, not when we noticed it.
        seconds = {e.get("round"): e.get("seconds") for e in read_jsonl(paths.progress_file(self.cfg.root, "coordinator"))
                   if e.get("event") == "round_complete"}
        while self.reported < done:
            self.reported += 1
            rewards = round_rewards(self.cfg.root, self.reported)
            cells = "  ".join(f"{w} {rewards[w][0]:.3f} ({rewards[w][1]} ext)" if w in rewards else f"{w} -"
                              for w in self.workers)
            took = seconds.get(self.reported)
            took_text = f"{took:5.1f}s" if isinstance(took, (int, float)) else "    ?"
            clear = "\r" + " " * 72 + "\r" if self.tty else ""
            say(f"{clear}round {self.reported + 1}/{self.cfg.max_rounds} done in {took_text}   reward: {cells}")
        if self.tty and self.reported + 1 < self.cfg.max_rounds:
            self._bar(state.round)

    def _bar(self, open_round: int) -> None:
        done, total = self.reported + 1, self.cfg.max_rounds
        width = 30
        filled = width * done // total
        elapsed = time.monotonic() - self.t0
        eta = f"ETA {elapsed / done * (total - done):4.0f}s" if done else "ETA    ?"
        sys.stdout.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} rounds  {eta}  "
                         f"(round {open_round + 1} running)")
        sys.stdout.flush()


def round_rewards(root: Path, round_: int) -> dict[str, tuple[float, int]]:
    out = {}
    for node_id, path in list_node_files(paths.rewards_dir(root, round_, 0)).items():
        try:
            doc = read_json(path)
            if doc is not None:
                sub = parse_submission(doc, node_id, round_, 0)
                out[node_id] = (sub.reward_mean, sub.n_external)
        except Rejected:
            continue  # a bad submission is the coordinator's to report
    return out


def _summary(cfg: Config, seconds: float) -> None:
    root = cfg.root
    nodes = sorted(p.name for p in (root / "logs").iterdir() if p.is_dir()) if (root / "logs").is_dir() else []
    say()
    say(f"{'node':<14}{'rounds':>7}{'mean reward':>13}{'cumulative':>12}{'external used':>15}")
    for node in nodes:
        s = metrics_summary(root, node)
        if s["rounds"] == 0:
            continue
        say(f"{node:<14}{s['rounds']:>7}{s['mean_reward']:>13.4f}{s['cumulative_reward']:>12.4f}"
             f"{s['external_used']:>15}")
    say()
    state = StateReader(root).read()
    ended = "finished in" if state is not None and state.status == "finished" else "stopped after"  # Ctrl-C
    say(f"{ended} {seconds:.1f}s; files under {root}")
    say(f"  state: {paths.state_file(root)}")
    say(f"  metrics: {root / 'logs'}/<node>/metrics.jsonl   checkpoints: {paths.checkpoints_dir(root)}")
