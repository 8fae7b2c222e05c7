"""``sapod report``: reward plots per experiment and the paper-style comparison table.

Reads each node's full logs/{node}/metrics.jsonl (unlike ``sapod status``, a report
needs every round). matplotlib is imported only here, lazily, and drawn through the
Agg canvas directly so no GUI backend or pyplot global state is involved.
"""

from __future__ import annotations

import argparse
import itertools
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.config import add_arguments, build_config
from sapod.logs import configure_logging
from sapod.progress import finite, metrics_row_ok, progress_nodes, read_jsonl
from sapod.state import read_experiment
from sapod.store import list_node_files, valid_node_id

PHASES = (("t_generate", "generate"), ("t_gather", "gather wait"), ("t_train", "train"),
          ("t_checkpoint", "checkpoint"))
MAX_LEGEND = 12  # beyond this many nodes a legend hides the plot


@dataclass
class Experiment:
    label: str
    root: Path
    settings: dict[str, Any]
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # node -> one row per round, in order

    @property
    def rounds(self) -> list[int]:
        return sorted({r["round"] for rows in self.rows.values() for r in rows})


# -- loading ----------------------------------------------------------------------

def _node_ids(root: Path) -> list[str]:
    """Nodes announce themselves through peers/ and progress_*.jsonl; logs/ is not listed. A folder
    that cannot be listed raises OSError: a report that silently left nodes out would be wrong."""
    return sorted(set(list_node_files(paths.peers_dir(root))) | set(progress_nodes(root, strict=True)))


def load_rows(root: Path, node_id: str) -> list[dict[str, Any]]:
    """Usable metrics rows (``metrics_row_ok``), one per round (a round retried after a restart keeps
    its last row); reward_mean as a float, so that sums of huge integers stay floats."""
    by_round: dict[int, dict[str, Any]] = {}
    for row in read_jsonl(paths.metrics_file(root, node_id)):
        if metrics_row_ok(row):
            row["reward_mean"] = float(row["reward_mean"])
            by_round[row["round"]] = row
    return [by_round[r] for r in sorted(by_round)]


def load_experiment(root: Path, label: str) -> Experiment:
    exp = Experiment(label=label, root=root, settings=read_experiment(root) or {})
    for node_id in _node_ids(root):
        rows = load_rows(root, node_id)
        if rows:
            exp.rows[node_id] = rows
    return exp


def resolve(arg: str, flags: dict[str, Any]) -> Path:
    """A path to an experiment folder, or a name under {GDRIVE_PATH}/experiments/."""
    path = Path(arg).expanduser()
    if "/" in arg or arg in (".", "..") or not valid_node_id(arg) or paths.experiment_file(path).is_file():
        return path
    return paths.experiment_root(build_config(flags).shared, arg)


def _labels(roots: list[Path]) -> list[str]:
    names = [r.resolve().name for r in roots]
    # Two folders with the same name (experiments/demo in two shared folders) need their parent's name.
    return [f"{r.resolve().parent.parent.name}/{n}" if names.count(n) > 1 else n for r, n in zip(roots, names)]


# -- numbers ----------------------------------------------------------------------

def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over ``window`` points; the first points average what exists so far."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def summary_rows(experiments: list[Experiment]) -> list[dict[str, Any]]:
    """One row per experiment; improvement is relative to the first experiment's total."""
    rows = []
    for exp in experiments:
        rewards = [r["reward_mean"] for rows in exp.rows.values() for r in rows]
        s = exp.settings
        rows.append({"experiment": exp.label, "nodes": len(exp.rows), "rounds": len(exp.rounds),
                     "I": s.get("num_train_samples"), "J": s.get("num_transplant_trees"),
                     "G": s.get("num_generations"), "total_reward": sum(rewards),
                     "mean_reward": sum(rewards) / len(rewards) if rewards else 0.0})
    base = rows[0]["total_reward"] if rows else 0.0
    for row in rows:
        # An experiment with no rows yet has nothing to compare, not a -100 % result.
        row["improvement_pct"] = (row["total_reward"] - base) / abs(base) * 100.0 if base and row["nodes"] else None
    return rows


def early_late(exp: Experiment, parts: int = 5) -> tuple[float | None, float | None]:
    """Mean reward over nodes in the first and in the last 1/parts of the rounds (at least one round
    each): the plain check that a run learned at all."""
    rounds = exp.rounds
    if not rounds:
        return None, None
    k = max(1, len(rounds) // parts)
    means = []
    for which in (set(rounds[:k]), set(rounds[-k:])):
        values = [r["reward_mean"] for rows in exp.rows.values() for r in rows if r["round"] in which]
        means.append(sum(values) / len(values))
    return means[0], means[1]


def format_table(rows: list[dict[str, Any]]) -> str:
    """A Markdown table, readable as plain text too."""
    head = ["experiment", "nodes", "rounds", "I", "J", "G", "total reward", "mean reward", "vs baseline"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]
    for r in rows:
        pct = "n/a" if r["improvement_pct"] is None else f"{r['improvement_pct']:+.1f} %"
        cells = [r["experiment"], r["nodes"], r["rounds"], r["I"], r["J"], r["G"], f"{r['total_reward']:.2f}",
                 f"{r['mean_reward']:.4f}", pct]
        lines.append("| " + " | ".join("-" if c is None else str(c) for c in cells) + " |")
    return "\n".join(lines)


# -- across seeds (sapod experiment) -------------------------------------------------

def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def config_numbers(configs: list[tuple[int, int]], runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per config: total reward over seeds (mean, min, max), improvement of the mean over the
    baseline (the J=0 config, else the first) and the first-fifth / last-fifth learning check."""
    rows = []
    for i, j in configs:
        mine = [r for r in runs if (r["I"], r["J"]) == (i, j)]
        totals = [r["total_reward"] for r in mine]
        first = _mean([r["first_fifth_reward"] for r in mine if r["first_fifth_reward"] is not None])
        last = _mean([r["last_fifth_reward"] for r in mine if r["last_fifth_reward"] is not None])
        rows.append({"config": f"i{i}j{j}", "I": i, "J": j, "seeds": [r["seed"] for r in mine],
                     "total_reward_mean": _mean(totals), "total_reward_min": min(totals, default=None),
                     "total_reward_max": max(totals, default=None), "first_fifth_reward": first,
                     "last_fifth_reward": last,
                     "learning_change": None if first is None or last is None else last - first})
    base = next((r for r in rows if r["J"] == 0), rows[0] if rows else None)
    for r in rows:
        b, v = (base or {}).get("total_reward_mean"), r["total_reward_mean"]
        r["baseline"] = base is not None and r is base
        r["improvement_pct"] = (v - b) / abs(b) * 100.0 if b and v is not None else None
    return rows


def total_format(value: float | None) -> str:
    """Two decimals as the paper prints totals (561.79); four for the small totals of short runs."""
    return ".2f" if value is not None and abs(value) >= 10 else ".4f"


def format_results(rows: list[dict[str, Any]], baseline: str) -> str:
    head = ["config", "I", "J", "seeds", "total reward (mean)", "min", "max", f"vs {baseline}",
            "first 1/5", "last 1/5", "change"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|"]

    def num(v: float | None, fmt: str | None = None) -> str:
        return "-" if v is None else format(v, fmt or total_format(v))
    for r in rows:
        pct = "-" if r["improvement_pct"] is None else f"{r['improvement_pct']:+.1f} %"
        cells = [r["config"], r["I"], r["J"], len(r["seeds"]), num(r["total_reward_mean"]),
                 num(r["total_reward_min"]), num(r["total_reward_max"]), pct, num(r["first_fifth_reward"], ".4f"),
                 num(r["last_fifth_reward"], ".4f"), num(r["learning_change"], "+.4f")]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


# -- figures ----------------------------------------------------------------------

def _figure(title: str, ylabel: str) -> tuple[Any, Any]:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(9, 5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    return fig, ax


def _save(fig: Any, ax: Any, path: Path, n_lines: int) -> Path:
    if 0 < n_lines <= MAX_LEGEND:
        ax.legend(fontsize="small")
    fig.savefig(path)
    return path


def plot_reward(exp: Experiment, path: Path, window: int) -> Path:
    w = max(1, min(window, len(exp.rounds)))
    fig, ax = _figure(f"{exp.label}: reward per round (moving average over {w} rounds)", "reward (mean per round)")
    for i, (node, rows) in enumerate(sorted(exp.rows.items())):
        x, y = [r["round"] for r in rows], [r["reward_mean"] for r in rows]
        color = f"C{i % 10}"
        ax.plot(x, y, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(x, moving_average(y, w), color=color, linewidth=1.6, label=node)
    if len(exp.rows) > 1:
        x, y = _mean_by_round(exp, "reward_mean")
        ax.plot(x, moving_average(y, w), color="black", linewidth=2.4, label="mean of nodes")
    return _save(fig, ax, path, len(exp.rows) + 1)


def plot_cumulative(exp: Experiment, path: Path) -> Path:
    fig, ax = _figure(f"{exp.label}: cumulative reward per node", "cumulative reward")
    for i, (node, rows) in enumerate(sorted(exp.rows.items())):
        running, y = 0.0, []
        for r in rows:
            running += r["reward_mean"]
            # The node's own running total survives restarts; fall back to our sum without it.
            y.append(float(r["cumulative_reward"]) if finite(r.get("cumulative_reward")) else running)
        ax.plot([r["round"] for r in rows], y, color=f"C{i % 10}", label=node)
    return _save(fig, ax, path, len(exp.rows))


def plot_timing(exp: Experiment, path: Path) -> Path:
    fig, ax = _figure(f"{exp.label}: time per round by phase (mean over {len(exp.rows)} nodes)", "seconds")
    x, total = _mean_by_round(exp, "t_round")
    stacks, labels = [], []
    for key, label in PHASES:
        stacks.append(_mean_by_round(exp, key)[1])
        labels.append(label)
    # "other" is what t_round does not attribute to a phase: bookkeeping, waiting for the state to move.
    stacks.append([max(0.0, t - sum(s[i] for s in stacks)) for i, t in enumerate(total)])
    labels.append("other")
    if len(x) == 1:  # stackplot needs two points to draw an area
        x, stacks = [x[0] - 0.5, x[0] + 0.5], [s * 2 for s in stacks]
    ax.stackplot(x, stacks, labels=labels, alpha=0.85)
    return _save(fig, ax, path, len(labels))


def plot_comparison(experiments: list[Experiment], path: Path, window: int) -> Path:
    longest = max(len(e.rounds) for e in experiments)
    w = max(1, min(window, longest))
    fig, ax = _figure(f"reward per round, mean of nodes (moving average over {w} rounds)", "reward")
    for i, exp in enumerate(experiments):
        x, y = _mean_by_round(exp, "reward_mean")
        ax.plot(x, moving_average(y, max(1, min(w, len(y)))), color=f"C{i % 10}", linewidth=1.8, label=exp.label)
    return _save(fig, ax, path, len(experiments))


def plot_cumulative_comparison(experiments: list[Experiment], path: Path) -> Path:
    """Running total of each experiment's mean-of-nodes reward: the paper's cumulative-reward view."""
    fig, ax = _figure("cumulative reward, mean of nodes", "cumulative reward")
    for i, exp in enumerate(experiments):
        x, y = _mean_by_round(exp, "reward_mean")
        ax.plot(x, list(itertools.accumulate(y)), color=f"C{i % 10}", linewidth=1.8, label=exp.label)
    return _save(fig, ax, path, len(experiments))


def _mean_by_round(exp: Experiment, key: str) -> tuple[list[int], list[float]]:
    sums: dict[int, list[float]] = {}
    for rows in exp.rows.values():
        for r in rows:
            sums.setdefault(r["round"], []).append(float(r[key]) if finite(r.get(key)) else 0.0)
    rounds = sorted(sums)
    return rounds, [sum(sums[r]) / len(sums[r]) for r in rounds]


# -- the command ------------------------------------------------------------------

def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "experiment"


def write_report(experiments: list[Experiment], out: Path, window: int) -> tuple[str, list[Path]]:
    """Draws every figure and report.md under ``out``; returns the table and the files written."""
    out.mkdir(parents=True, exist_ok=True)
    table = format_table(summary_rows(experiments))
    written: list[Path] = []
    md = ["# sapod report", "", table, "",
          f"Baseline: {experiments[0].label}. Total reward = sum of reward_mean over all node-rounds; "
          f"moving averages over {window} rounds (fewer when an experiment has fewer).", ""]
    if len(experiments) > 1 and any(e.rows for e in experiments):
        p = plot_comparison([e for e in experiments if e.rows], out / "comparison.png", window)
        written.append(p)
        md += ["## Comparison", "", f"![reward, all experiments]({p.name})", ""]
    for exp in experiments:
        md += [f"## {exp.label}", "", f"`{exp.root}`", ""]
        if not exp.rows:
            md += ["No metrics rows yet.", ""]
            continue
        slug = _slug(exp.label)
        figures = [("reward per round", plot_reward(exp, out / f"{slug}-reward.png", window)),
                   ("cumulative reward", plot_cumulative(exp, out / f"{slug}-cumulative.png")),
                   ("time per round by phase", plot_timing(exp, out / f"{slug}-timing.png"))]
        for title, p in figures:
            written.append(p)
            md += [f"![{title}]({p.name})", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))
    written.append(report)
    return table, written


def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def report_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sapod report", description=(
        "Plot reward per round, cumulative reward and time per phase for each experiment, and compare "
        "experiments in a table (the first one given is the baseline)."))
    parser.add_argument("experiments", nargs="+", metavar="EXPERIMENT",
                        help="a name under {GDRIVE_PATH}/experiments/ or a path to an experiment folder")
    parser.add_argument("--out", type=Path, default=Path("sapod-report"),
                        help="output folder [default: ./sapod-report]")
    parser.add_argument("--window", type=int, default=100, help="moving-average window in rounds [default: 100]")
    add_arguments(parser, only=("shared",))
    args = parser.parse_args(argv)
    if args.window < 1:
        parser.error("--window must be at least 1")
    configure_logging("auto", "warning", stream=sys.stderr)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        print("sapod report: matplotlib is not installed: install sapod[plot] (pip install 'sapod[plot]')",
              file=sys.stderr)
        return 2
    roots = [resolve(a, vars(args)) for a in args.experiments]
    for arg, root in zip(args.experiments, roots):
        if not root.is_dir():
            print(f"sapod report: no experiment folder for {arg!r} at {root}", file=sys.stderr)
            return 1
    try:
        experiments = [load_experiment(r, label) for r, label in zip(roots, _labels(roots))]
    except OSError as exc:  # a folder that cannot be listed (EIO on a network mount): no half report
        print(f"sapod report: cannot read {exc.filename or 'the experiment folder'}: {_reason(exc)}",
              file=sys.stderr)
        return 1
    try:
        table, written = write_report(experiments, args.out, args.window)
    except OSError as exc:
        print(f"sapod report: cannot write {exc.filename or args.out}: {_reason(exc)}", file=sys.stderr)
        return 1
    print(table)
    print()
    print(f"wrote {len(written)} files to {args.out.resolve()}")
    return 0
