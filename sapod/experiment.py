"""``sapod experiment``: the same swarm under several I/J splits (I+J fixed) and seeds, one run
after another, then the paper-style table, OUT/results.json, OUT/report.md and plots.

Every (config, seed) run has its own shared folder OUT/runs/{name}/ holding experiment {name},
driven by ``demo.run_swarm`` in this process. Rerunning the same command skips finished runs and
resumes unfinished ones: the coordinator takes over the open round and each worker loads the
checkpoint it wrote when stopped. A run that cannot resume without losing trained rounds (a
hard kill: some worker's checkpoint is older than its metrics) starts again from scratch.
OUT/plan.json pins the swarm settings, so a rerun cannot mix runs made with different ones.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.checkpoint import latest_checkpoint
from sapod.config import Config, add_arguments, build_config
from sapod.demo import DEMO_DEFAULTS, prepare_model, round_rewards, run_swarm, say, worker_ids
from sapod.logs import configure_logging
from sapod.progress import read_jsonl
from sapod.report import (Experiment, config_numbers, early_late, format_results, load_experiment, load_rows,
                          plot_comparison, plot_cumulative_comparison, summary_rows, total_format)
from sapod.schema import State
from sapod.state import StateReader

PASS_FLAGS = ("model", "seed", "num_generations", "max_new_tokens", "learning_rate", "temperature", "tasks",
              "device", "compile_generation", "cache_dir", "checkpoint_interval", "checkpoint_keep", "round_timeout",
              "gather_timeout", "stop_timeout", "poll_interval", "heartbeat_interval", "watch_mode", "log_format",
              "log_level")
# What a run's numbers depend on besides I, J, the seed, --nodes and --rounds: a rerun must not mix values.
PLAN_KEYS = ("model", "num_generations", "max_new_tokens", "learning_rate", "temperature", "tasks")
# The demo's small defaults, but timeouts for nodes that take turns on one GPU thread: a worker's
# gather wait holds every other node's generation, and a stuck node fails the whole run anyway.
EXPERIMENT_DEFAULTS = {**DEMO_DEFAULTS, "seed": 1, "gather_timeout": 900.0, "round_timeout": 3600.0,
                       "checkpoint_keep": 1}
# A clean stop (Ctrl-C) exits 0 like every sapod command; its message says how to resume.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_START, EXIT_INTERRUPTED = 0, 1, 2, 3, 0


class UsageError(ValueError):
    """Bad --configs/--seeds/--out: a one-line message, exit 2."""


@dataclass(frozen=True)
class Run:
    i: int
    j: int
    seed: int

    @property
    def config(self) -> str:
        return f"i{self.i}j{self.j}"

    @property
    def name(self) -> str:
        return f"{self.config}-seed{self.seed}"


def _duration(seconds: float) -> str:
    if seconds < 10:
        return f"{seconds:.1f}s"
    s = int(round(seconds))
    return f"{s}s" if s < 60 else f"{s // 60}m{s % 60:02d}s" if s < 3600 else f"{s // 3600}h{s % 3600 // 60:02d}m"


# -- parsing ------------------------------------------------------------------------

def parse_configs(text: str) -> list[tuple[int, int]]:
    """``"4/0,2/2"`` -> [(4, 0), (2, 2)]; every I+J equal (the paper compares splits of one budget)."""
    configs = []
    for part in text.split(","):
        left, sep, right = part.strip().partition("/")
        if not sep or not left.strip().isdecimal() or not right.strip().isdecimal():
            raise UsageError(f"--configs: {part.strip()!r} is not I/J (two whole numbers, e.g. 2/2)")
        configs.append((int(left), int(right)))
    for i, j in configs:
        if i < 1:
            raise UsageError(f"--configs: {i}/{j} has I={i}; every node needs at least one own question (I >= 1)")
    if len(set(configs)) != len(configs):
        raise UsageError(f"--configs: {text!r} names a config twice")
    if len({i + j for i, j in configs}) > 1:
        sums = ", ".join(f"{i}/{j}={i + j}" for i, j in configs)
        raise UsageError(f"--configs: I+J must be the same for every config (got {sums})")
    return configs


def parse_seeds(text: str, first: int) -> list[int]:
    """``"1,5,9"`` is those seeds; a single ``"N"`` is N seeds counting up from ``first`` (--seed)."""
    parts = [p.strip() for p in text.split(",")]
    if not all(p.isdecimal() for p in parts):
        raise UsageError(f"--seeds: {text!r} is not a count (3) or a list of seeds (1,2,3)")
    if len(parts) == 1:
        if int(parts[0]) < 1:
            raise UsageError("--seeds: the count must be at least 1")
        return list(range(first, first + int(parts[0])))
    seeds = [int(p) for p in parts]
    if len(set(seeds)) != len(seeds):
        raise UsageError(f"--seeds: {text!r} names a seed twice")
    return seeds


# -- one run --------------------------------------------------------------------------

def run_root(out: Path, run: Run) -> Path:
    return paths.experiment_root(out / "runs" / run.name, run.name)


def _completed(state: State) -> int:
    """Rounds the coordinator has closed: all before the open one, all up to a finished one."""
    return state.round + 1 if state.status == "finished" else state.round


def _done_rounds(root: Path, rounds: int) -> tuple[int, bool]:
    """(rounds the coordinator has completed, whether all ``rounds`` are)."""
    state = StateReader(root).read()
    if state is None:
        return 0, False
    done = _completed(state)
    return done, state.status == "finished" and done >= rounds


def _resumable(root: Path, nodes: int) -> bool:
    """True when no worker would lose trained rounds: each checkpoint is as new as its metrics."""
    for node in worker_ids(nodes):
        rows = load_rows(root, node)
        found = latest_checkpoint(root, node)
        if rows and (found is None or found[0] < rows[-1]["round"]):
            return False
    return True


class _Progress:
    """Per-round progress with an ETA for the whole experiment: a bar on a terminal, a line every
    tenth of a run otherwise (a 2000-round run should not print 2000 lines). ``total`` counts every
    round of every run, ``before`` those an earlier invocation did: they count as done, not for the pace."""

    def __init__(self, total_rounds: int, done_before: int = 0):
        self.total, self.before, self.done, self.t0 = total_rounds, done_before, 0, time.monotonic()
        self.tty = sys.stdout.isatty()
        self.bar_shown = False

    def eta(self) -> str:
        if not self.done:
            return "?"
        return _duration((time.monotonic() - self.t0) / self.done * max(0, self.total - self.before - self.done))

    def say(self, text: str) -> None:
        if self.bar_shown:
            sys.stdout.write("\r" + " " * 100 + "\r")
            self.bar_shown = False
        say(text)

    def watcher(self, cfg: Config, label: str, already: int) -> Callable[[], None]:
        reader, seen = StateReader(cfg.root), [already]
        step = max(1, math.ceil(cfg.max_rounds / 10))

        def poll() -> None:
            state = reader.read()
            if state is None:
                return
            done = _completed(state)
            if done <= seen[0]:
                return
            self.done += done - seen[0]
            seen[0] = done
            rewards = [r for r, _ in round_rewards(cfg.root, done - 1).values()]
            mean = f"{sum(rewards) / len(rewards):.3f}" if rewards else "-"
            pct = 100 * (self.before + self.done) // max(1, self.total)
            text = f"{label} round {done}/{cfg.max_rounds} reward {mean}   experiment {pct:3d}%  ETA {self.eta()}"
            if self.tty:
                filled = 20 * done // cfg.max_rounds
                sys.stdout.write(f"\r[{'#' * filled}{'.' * (20 - filled)}] {text}   ")
                sys.stdout.flush()
                self.bar_shown = True
            elif done % step == 0 or done == cfg.max_rounds:
                say(f"  {text}")
        return poll


# -- numbers ----------------------------------------------------------------------------

def run_numbers(run: Run, root: Path) -> dict[str, Any]:
    exp = load_experiment(root, run.name)
    row = summary_rows([exp])[0]  # total reward as `sapod report` defines it: sum over node-rounds
    first, last = early_late(exp)
    return {"name": run.name, "config": run.config, "I": run.i, "J": run.j, "seed": run.seed, "root": str(root),
            "nodes": row["nodes"], "rounds": row["rounds"], "total_reward": row["total_reward"],
            "mean_reward": row["mean_reward"], "first_fifth_reward": first, "last_fifth_reward": last,
            # The coordinator's own open-to-advance times: the run's training time without start-up.
            "round_seconds": sum(e["seconds"] for e in read_jsonl(paths.progress_file(root, "coordinator"))
                                 if e.get("event") == "round_complete" and isinstance(e.get("seconds"), (int, float))),
            "per_node_total": {n: sum(r["reward_mean"] for r in rows) for n, rows in sorted(exp.rows.items())}}


# -- outputs ------------------------------------------------------------------------------

def _write_json(path: Path, doc: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=2) + "\n")
    os.replace(tmp, path)


def _plots(out: Path, finished: list[tuple[Run, Path]], window: int) -> list[Path]:
    """Reward over rounds per config (nodes and seeds averaged), per run, and cumulative per config."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return []
    per_config: dict[str, Experiment] = {}
    per_run = []
    for run, root in finished:
        exp = load_experiment(root, run.name)
        per_run.append(exp)
        merged = per_config.setdefault(run.config, Experiment(run.config, root, exp.settings))
        merged.rows.update({f"seed{run.seed}/{node}": rows for node, rows in exp.rows.items()})
    configs = [e for e in per_config.values() if e.rows]
    if not configs:
        return []
    return [plot_comparison(configs, out / "reward-by-config.png", window),
            plot_cumulative_comparison(configs, out / "cumulative-by-config.png"),
            plot_comparison([e for e in per_run if e.rows], out / "reward-by-run.png", window)]


def _report_md(command: str, table: str, runs: list[dict[str, Any]], plots: list[Path], note: str) -> str:
    md = ["# sapod experiment", "", f"`{command}`", "", table, "", note, ""]
    if plots:
        md += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    md += ["## Runs", "", "| run | nodes | rounds | total reward | mean reward | first 1/5 | last 1/5 |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        fifths = [("-" if v is None else f"{v:.4f}") for v in (r["first_fifth_reward"], r["last_fifth_reward"])]
        total = format(r["total_reward"], total_format(r["total_reward"]))
        md.append(f"| {r['name']} | {r['nodes']} | {r['rounds']} | {total} | "
                  f"{r['mean_reward']:.4f} | {fifths[0]} | {fifths[1]} |")
    return "\n".join(md + [""])


# -- the command ----------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sapod experiment", description=(
        "Run the same swarm under several I/J splits and seeds, one run after another, and compare total "
        "reward against the J=0 (no sharing) baseline. Rerun the same command to resume."))
    parser.add_argument("--configs", default="4/0,2/2", help="I/J pairs with equal I+J; a J=0 one is the baseline [default: 4/0,2/2]")
    parser.add_argument("--seeds", default="3", help="a count N (seeds --seed .. --seed+N-1) or a list 1,2,3 "
                        "[default: 3]")
    parser.add_argument("--nodes", type=int, default=4, help="workers per run [default: 4]")
    parser.add_argument("--rounds", type=int, default=20, help="rounds per run [default: 20]")
    parser.add_argument("--out", type=Path, default=Path("sapod-experiment"),
                        help="results folder, one shared folder per run under OUT/runs/ [default: ./sapod-experiment]")
    parser.add_argument("--window", type=int, default=None, help="moving-average window of the plots in rounds "
                        "[default: rounds/10]")
    parser.add_argument("--keep-checkpoints", action="store_true",
                        help="keep finished runs' final checkpoints (a real model's take GBs per node)")
    add_arguments(parser, only=PASS_FLAGS, defaults={**EXPERIMENT_DEFAULTS, "checkpoint_interval": "--rounds"})
    return parser


def experiment_main(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.rounds < 1 or (args.window is not None and args.window < 1):
        return _usage("--nodes, --rounds and --window must be at least 1")
    out: Path = args.out.expanduser().resolve()
    flags = {k: v for k, v in vars(args).items() if k in PASS_FLAGS}
    # Checkpoints at the end and on a stop (what a resume needs), not every N rounds: each holds
    # weights and optimizer state for every node.
    defaults = {**EXPERIMENT_DEFAULTS, "max_rounds": args.rounds, "checkpoint_interval": args.rounds}
    base = build_config({**flags, "shared": str(out)}, defaults=defaults)
    try:
        configs = parse_configs(args.configs)
        seeds = parse_seeds(args.seeds, base.seed)
        plan = {"nodes": args.nodes, "rounds": args.rounds, **{k: getattr(base, k) for k in PLAN_KEYS}}
        _check_plan(out, plan)
    except UsageError as exc:
        return _usage(str(exc))
    configure_logging(base.log_format, base.log_level, stream=sys.stderr)
    command = "sapod experiment " + shlex.join(argv)
    runs = [Run(i, j, s) for i, j in configs for s in seeds]
    say(f"sapod experiment: {len(configs)} configs x {len(seeds)} seeds = {len(runs)} runs of {args.nodes} "
         f"workers x {args.rounds} rounds, model {base.model}, G={base.num_generations}; results in {out}")
    baseline = next((f"i{i}j{j}" for i, j in configs if j == 0), None)
    if baseline is None:
        baseline = f"i{configs[0][0]}j{configs[0][1]}"
        say(f"warning: no J=0 config: improvements are relative to the first config, {baseline}")
    if not prepare_model(base):
        return EXIT_START
    failed: list[str] = []
    try:
        code, finished = _run_all(out, base, runs, args, failed)
    except KeyboardInterrupt:  # between runs, where no swarm catches the signal
        code = EXIT_INTERRUPTED
        finished = [(r, run_root(out, r)) for r in runs if _done_rounds(run_root(out, r), args.rounds)[1]]
    try:
        _finish(out, command, configs, baseline, finished, failed, args.window or max(1, args.rounds // 10), plan)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    return code


def _usage(message: str) -> int:
    print(f"sapod experiment: error: {message}", file=sys.stderr)
    return EXIT_USAGE


def _check_plan(out: Path, plan: dict[str, Any]) -> None:
    path = out / "plan.json"
    try:
        old = json.loads(path.read_text())
    except (OSError, ValueError):
        old = None
    if isinstance(old, dict):
        differ = [f"{k} {old.get(k)!r} -> {v!r}" for k, v in plan.items() if old.get(k) != v]
        if differ:
            raise UsageError(f"{out} holds runs made with other settings ({'; '.join(differ)}): use another --out")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        _write_json(path, plan)
    except OSError as exc:
        raise UsageError(f"--out {out}: {exc}") from None


def _run_all(out: Path, base: Config, runs: list[Run], args: argparse.Namespace,
             failed: list[str]) -> tuple[int, list[tuple[Run, Path]]]:
    """Runs what is not finished yet, in order; returns the exit code and the finished runs."""
    before = {r: _done_rounds(run_root(out, r), args.rounds) for r in runs}
    progress = _Progress(len(runs) * args.rounds, sum(min(args.rounds, before[r][0]) for r in runs))
    finished: list[tuple[Run, Path]] = []
    for n, run in enumerate(runs, 1):
        root = run_root(out, run)
        head = f"run {n}/{len(runs)} {run.name}"
        if before[run][1]:
            progress.say(f"{head}: skipped, already finished ({root})")
            finished.append((run, root))
            continue
        already = before[run][0]
        if root.parent.parent.exists() and not _resumable(root, args.nodes):
            progress.say(f"{head}: unfinished and not resumable without losing rounds: starting again")
            shutil.rmtree(root.parent.parent)
            progress.before -= already  # those rounds are run again
            already = 0
        elif already:
            progress.say(f"{head}: resuming after round {already}")
        cfg = base.with_(shared=root.parent.parent, experiment=run.name, seed=run.seed, num_train_samples=run.i,
                         num_transplant_trees=run.j)
        cfg.shared.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        code = run_swarm(cfg, args.nodes, progress.watcher(cfg, run.name, already))
        took = time.monotonic() - t0
        if not _done_rounds(root, args.rounds)[1]:
            if code == 0:  # the swarm was stopped, not broken
                progress.say(f"{head}: interrupted after {_duration(took)}; rerun the same command to resume")
                # Runs later in the order may have finished in an earlier invocation: keep them too.
                return EXIT_INTERRUPTED, finished + [(r, run_root(out, r)) for r in runs[n:] if before[r][1]]
            progress.say(f"{head}: FAILED after {_duration(took)} (see above and {root}/logs)")
            failed.append(run.name)
            continue
        if not args.keep_checkpoints:
            shutil.rmtree(paths.checkpoints_dir(root), ignore_errors=True)
        numbers = run_numbers(run, root)
        finished.append((run, root))
        progress.say(f"{head}: total reward {numbers['total_reward']:.4f} ({numbers['nodes']} nodes x "
                     f"{numbers['rounds']} rounds, mean {numbers['mean_reward']:.4f}) in {_duration(took)}; "
                     f"experiment ETA {progress.eta()}")
    return (EXIT_FAILED if failed else EXIT_OK), finished


def _finish(out: Path, command: str, configs: list[tuple[int, int]], baseline: str,
            finished: list[tuple[Run, Path]], failed: list[str], window: int, plan: dict[str, Any]) -> None:
    runs = [run_numbers(run, root) for run, root in finished]
    rows = config_numbers(configs, runs)
    table = format_results(rows, baseline)
    note = (f"Total reward: sum over workers and rounds of each worker's mean reward per round (the paper's "
            f"cumulative reward), one value per seed; the table shows its mean, min and max over seeds. "
            f"Improvement: mean total vs {baseline}'s. first/last 1/5: mean reward per worker-round over the "
            f"first and last fifth of the rounds.")
    plots = _plots(out, finished, window)
    _write_json(out / "results.json", {"command": command, "settings": plan, "baseline": baseline,
                                       "configs": rows, "runs": runs, "failed": failed})
    (out / "report.md").write_text(_report_md(command, table, runs, plots, note))
    say()
    say(table)
    say()
    if not plots and finished:
        say("plots skipped: matplotlib is not installed (pip install 'sapod[plot]')")
    say(f"wrote {out / 'results.json'}, {out / 'report.md'}" + (f" and {len(plots)} plots" if plots else ""))
