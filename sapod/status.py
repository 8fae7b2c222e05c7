"""``sapod status``: the experiment's state and one row per node, read from the shared folder.

Liveness is judged the way nodes judge each other: by watching heartbeat counters
move on *this* machine's monotonic clock, never by comparing timestamps written on
other boxes. Only peers/, the state pointer, experiment.json and the tail of each
node's metrics.jsonl are read, so it stays cheap on a Drive folder with thousands of
rollout files.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sapod import paths
from sapod.config import Config, add_arguments, build_config
from sapod.logs import configure_logging
from sapod.peers import GONE, PeerTable
from sapod.progress import finite, metrics_row_ok, read_tail
from sapod.state import StateReader, read_experiment

MAX_WINDOW = 30.0  # a one-shot status never blocks longer than this on heartbeats


# -- heartbeats -------------------------------------------------------------------

class HeartbeatWatch:
    """What we saw of each peer's beat counter, accumulated across refreshes.

    PeerTable marks a peer as changed the first time it sees it, which says nothing
    about liveness; a peer counts as moving only once its (instance, beat) differs
    from what we saw first.
    """

    def __init__(self, root: Path, peer_timeout: float, clock: Callable[[], float] = time.monotonic):
        self.table = PeerTable(root, peer_timeout, clock)
        self.clock = clock
        self._first: dict[str, tuple[str, int]] = {}
        self._first_at: dict[str, float] = {}
        self.refreshes = 0
        # Why the last refresh could not read peers/ (what it saw before stays), None when it could.
        self.error: str | None = None

    def refresh(self) -> None:
        self.refreshes += 1
        try:
            self.table.refresh()
        except OSError as exc:  # EIO and the like on a network mount: often gone on the next try
            self.error = f"peers/: cannot list: {_reason(exc)}"
            return
        self.error = None
        now = self.clock()
        for node_id, peer in self.table.peers().items():
            if node_id not in self._first:
                self._first[node_id] = (peer.instance, peer.beat)
                self._first_at[node_id] = now

    def moved(self, node_id: str) -> bool:
        peer = self.table.peers().get(node_id)
        return peer is not None and (peer.instance, peer.beat) != self._first.get(node_id)

    def observe(self, window: float, step: float, sleep: Callable[[float], None] = time.sleep) -> None:
        """Refresh until every running peer has moved or ``window`` seconds pass; a refresh that
        could not read peers/ is retried within the window too."""
        deadline = self.clock() + window
        self.refresh()
        while self.clock() < deadline and (self.error is not None or any(
                p.status not in GONE and not self.moved(n) for n, p in self.table.peers().items())):
            sleep(max(0.0, min(step, deadline - self.clock())))
            self.refresh()

    def view(self, node_id: str) -> dict[str, Any]:
        peer = self.table.peers()[node_id]
        moved = self.moved(node_id)
        watched = self.clock() - self._first_at[node_id]
        alive = moved and self.table.alive(node_id)
        if peer.status in GONE:
            liveness = peer.status
        elif not alive:
            liveness = "dead"
        else:
            liveness = "degraded" if peer.status == "degraded" else "alive"
        return {"alive": alive, "liveness": liveness, "watched_s": watched,
                "heartbeat_age_s": self.table.age(node_id) if moved else None}


# -- metrics tail -----------------------------------------------------------------

def _number(row: dict[str, Any], key: str) -> float | None:
    value = row.get(key)
    return float(value) if finite(value) else None


def metrics_tail_summary(root: Path, node_id: str) -> dict[str, Any]:
    """Rounds done, cumulative and last reward, rounds per hour, from the well-formed rows
    (``metrics_row_ok``) in the tail of the node's metrics.jsonl."""
    rows = [r for r in read_tail(paths.metrics_file(root, node_id)) if metrics_row_ok(r)]
    if not rows:
        return {"rounds_done": None, "cumulative_reward": None, "last_reward": None, "rounds_per_hour": None}
    last = rows[-1]
    rate = None
    timed = [r for r in rows if _number(r, "ts") is not None]
    if len(timed) >= 2:
        # Both timestamps come from the same node's clock, so their difference is meaningful.
        dt = _number(timed[-1], "ts") - _number(timed[0], "ts")
        dr = timed[-1]["round"] - timed[0]["round"]
        if dt > 0 and dr > 0:
            rate = dr / dt * 3600.0
    return {"rounds_done": last["round"] + 1, "cumulative_reward": _number(last, "cumulative_reward"),
            "last_reward": _number(last, "reward_mean"), "rounds_per_hour": rate}


# -- gathering --------------------------------------------------------------------

def _target(cfg_or_root: Config | Path | str) -> tuple[Path, float | None, float | None]:
    if isinstance(cfg_or_root, Config):
        return cfg_or_root.root, cfg_or_root.heartbeat_interval, cfg_or_root.peer_timeout
    return Path(cfg_or_root), None, None


def collect_status(cfg_or_root: Config | Path | str, *, watch: HeartbeatWatch | None = None,
                   window: float | None = None, heartbeat_interval: float | None = None,
                   peer_timeout: float | None = None, sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Everything ``sapod status`` shows, as plain data.

    With a fresh ``watch`` (or none) the heartbeats are watched for ``window``
    seconds (default HEARTBEAT_INTERVAL + 0.5, at most MAX_WINDOW), stopping early
    once every running peer has moved; a watch that has been refreshed before is
    refreshed once, so ``--watch`` accumulates what it saw.
    """
    root, hb, timeout = _target(cfg_or_root)
    hb = heartbeat_interval or hb or 5.0
    timeout = peer_timeout or timeout or 60.0
    if not root.is_dir():
        raise FileNotFoundError(f"no experiment folder at {root}")
    watch = watch or HeartbeatWatch(root, timeout)
    if watch.refreshes == 0:
        window = min(hb + 0.5, MAX_WINDOW) if window is None else window
        watch.observe(window, step=min(1.0, max(0.1, window / 10)), sleep=sleep)
    else:
        watch.refresh()
    settings = read_experiment(root) or {}
    max_rounds = settings.get("max_rounds") if isinstance(settings.get("max_rounds"), int) else None
    state = StateReader(root).read()
    state_out = None
    if state is not None:
        done = state.round + 1 if state.status == "finished" else state.round
        state_out = {"round": state.round, "stage": state.stage, "status": state.status, "epoch": state.epoch,
                     "seq": state.seq, "coordinator": state.coordinator, "rounds_done": done}
    nodes = []
    peers = watch.table.peers()
    for node_id in sorted(peers, key=lambda n: (peers[n].role != "coordinator", n)):
        peer = peers[node_id]
        row: dict[str, Any] = {"node": node_id, "role": peer.role, "round": peer.round, "phase": peer.phase,
                               "status": peer.status, "beat": peer.beat, "host": peer.host, "model": peer.model}
        row.update(watch.view(node_id))
        if peer.role == "worker":
            row.update(metrics_tail_summary(root, node_id))
        else:
            row.update(rounds_done=state_out["rounds_done"] if state_out else None, cumulative_reward=None,
                       last_reward=None, rounds_per_hour=None)
        row["eta_s"] = _eta(row, max_rounds)
        nodes.append(row)
    return {"experiment": root.name, "root": str(root), "max_rounds": max_rounds, "settings": settings,
            "state": state_out, "observed_s": max((n["watched_s"] for n in nodes), default=0.0), "nodes": nodes,
            "error": watch.error}


def _eta(row: dict[str, Any], max_rounds: int | None) -> float | None:
    """Seconds until the node has done ``max_rounds``: 0.0 once it has (or finished), None when it
    cannot be told, and None for a node that is not alive (stopped or dead): it is not training."""
    if max_rounds is None or row["rounds_done"] is None:
        return None
    left = max_rounds - row["rounds_done"]
    if left <= 0 or row["status"] == "finished":
        return 0.0
    if not row["alive"] or not row["rounds_per_hour"]:
        return None
    return left / row["rounds_per_hour"] * 3600.0


# -- output -----------------------------------------------------------------------

def _reason(exc: OSError) -> str:
    return exc.strerror or str(exc) or type(exc).__name__


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds <= 0:
        return "done"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def _age(node: dict[str, Any]) -> str:
    if node["heartbeat_age_s"] is not None:
        return f"{node['heartbeat_age_s']:.1f}s"
    return "-" if node["status"] in GONE else f">{node['watched_s']:.0f}s"


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


COLUMNS = (("node", 16, "<"), ("role", 11, "<"), ("round", 6, ">"), ("phase", 12, "<"), ("beat age", 9, ">"),
           ("state", 9, "<"), ("cum.reward", 11, ">"), ("rounds/h", 9, ">"), ("ETA", 8, ">"))


def format_status(status: dict[str, Any]) -> str:
    lines = [f"experiment {status['experiment']}  {status['root']}"]
    if status.get("error"):
        lines.append(f"{status['error']}, retrying (rows as last read)")
    st, max_rounds = status["state"], status["max_rounds"]
    target = "?" if max_rounds is None else str(max_rounds)
    if st is None:
        lines.append(f"state: none yet (no readable state file)  MAX_ROUNDS {target}")
    else:
        lines.append(f"state: {st['status']}  round {st['round']} ({st['rounds_done']}/{target} done)  "
                     f"epoch {st['epoch']}  coordinator {st['coordinator']}")
    lines.append(f"heartbeats watched for {status['observed_s']:.1f}s on this machine's clock")
    lines.append("")
    lines.append(" ".join(f"{name:{align}{width}}" for name, width, align in COLUMNS))
    for n in status["nodes"]:
        cells = (n["node"][:16], n["role"], str(n["round"]), n["phase"][:12], _age(n), n["liveness"],
                 _num(n["cumulative_reward"], ".4f"), _num(n["rounds_per_hour"], ".1f"), _duration(n["eta_s"]))
        lines.append(" ".join(f"{c:{align}{width}}" for c, (_, width, align) in zip(cells, COLUMNS)))
    if not status["nodes"]:
        lines.append("(no peer files yet)")
    return "\n".join(lines)


def _show(status: dict[str, Any], as_json: bool, clear: bool) -> None:
    text = json.dumps(status, sort_keys=True) if as_json else format_status(status)
    _write(text, clear)


def _write(text: str, clear: bool) -> None:
    if clear:
        sys.stdout.write("\x1b[H\x1b[2J")
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def status_main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sapod status", description=(
        "Show the experiment's state and one row per node: round, phase, heartbeat liveness "
        "(watched on this machine's clock), cumulative reward, rounds per hour and ETA."))
    parser.add_argument("--watch", nargs="?", type=float, const=5.0, default=None, metavar="SECONDS",
                        help="redraw every SECONDS (default 5) until Ctrl-C")
    parser.add_argument("--json", action="store_true", help="print one JSON object (one per redraw with --watch)")
    add_arguments(parser, only=("shared", "experiment", "heartbeat_interval", "peer_timeout"))
    args = parser.parse_args(argv)
    if args.watch is not None and args.watch <= 0:
        parser.error("--watch SECONDS must be > 0")
    cfg = build_config(vars(args))
    # Rejected peer files are logged; keep stdout for the table or the JSON.
    configure_logging(cfg.log_format, "warning", stream=sys.stderr)
    try:
        found = cfg.root.is_dir()
    except OSError as exc:  # is_dir() returns False only for a missing folder; EIO raises
        print(f"sapod status: cannot read {cfg.root}: {_reason(exc)}", file=sys.stderr)
        return 1
    if not found:
        print(f"sapod status: no experiment folder at {cfg.root} (check --shared/GDRIVE_PATH and "
              f"--experiment/EXPERIMENT_NAME)", file=sys.stderr)
        return 1
    watch = HeartbeatWatch(cfg.root, cfg.peer_timeout)
    clear = args.watch is not None and not args.json and sys.stdout.isatty()
    try:
        while True:
            try:
                status = collect_status(cfg, watch=watch)
            except FileNotFoundError as exc:  # the folder went away while watching
                print(f"sapod status: {exc}", file=sys.stderr)
                return 1
            except OSError as exc:  # a read the shared folder refused (EIO): one line, not a traceback
                problem = f"cannot read {exc.filename or cfg.root}: {_reason(exc)}"
                if args.watch is None:
                    print(f"sapod status: {problem}", file=sys.stderr)
                    return 1
                if args.json:
                    print(f"sapod status: {problem}, retrying", file=sys.stderr)
                else:
                    _write(f"experiment {cfg.root.name}  {cfg.root}\n{problem}, retrying", clear)
            else:
                if args.watch is None and status["error"]:
                    # The window's retries did not get through: no table of stale or missing rows.
                    print(f"sapod status: {cfg.root}/{status['error']}", file=sys.stderr)
                    return 1
                _show(status, args.json, clear)
            if args.watch is None:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0
