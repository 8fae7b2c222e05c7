"""The chaos harness's verdict: invariants checked from the files and the process
logs after a run, and the figures it reports. See chaos.py."""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from pathlib import Path
from typing import Any

from chaos_payloads import rejected

from sapod import paths
from sapod.checkpoint import latest_checkpoint, read_counters
from sapod.errors import Rejected
from sapod.progress import read_jsonl
from sapod.schema import Tally, parse_submission, parse_tally
from sapod.store import read_json

FAKE_ID = re.compile(r"^x\d{5}$")
# A file's ctime comes from the kernel's coarse clock (one tick: up to 10 ms at HZ=100)
# unless someone looked at the old one, so a file renamed just after a moment can carry
# a ctime just before it. "There before the last look" allows for that much.
CTIME_SLACK_S = 0.02


def _logs(base: Path) -> tuple[list[dict[str, Any]], int]:
    """Every JSON line every process wrote, and the count of lines that were not JSON."""
    rows, other = [], 0
    for path in sorted((base / "logs").glob("*.log")):
        mine, bad = _file_rows(path)
        rows += mine
        other += bad
    return rows, other


def _ts(e: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(e["timestamp"].replace("Z", "+00:00")).timestamp()


def check_run(h: Any, payloads: list, wall: float, ckpt_disk: str) -> dict[str, Any]:
    a, v = h.args, list(h.violations)
    workers = [f"w{i + 1}" for i in range(a.workers)]
    coord_root = h.root(h.coord.node_id if h.coord else "coord")
    logged, non_json = _logs(h.base)
    events = Counter(e.get("event") for e in logged)

    # -- the swarm finished, and every round left a tally ------------------------------
    state = h.state()
    if state is None or state.status != "finished" or state.round != a.rounds - 1:
        v.append(f"swarm did not finish: state {state}")
    tallies: dict[int, Tally] = {}
    for r in range(a.rounds):
        try:
            doc = read_json(paths.tally_file(coord_root, r, 0))
            if doc is None:
                v.append(f"round {r}: no tally")
                continue
            tallies[r] = parse_tally(doc, r, 0)
        except Rejected as exc:
            v.append(f"round {r}: tally rejected: {exc.reason}")

    # -- nothing acknowledged lost, nothing late counted, nothing counted twice ---------
    lost = late = 0
    for r, t in tallies.items():
        view = h.root(t.coordinator)  # the folder as the coordinator that closed the round saw it
        for w in workers:
            path = paths.reward_file(view, r, 0, w)
            try:
                st = os.stat(path)
                sub = parse_submission(read_json(path), w, r, 0)
            except (OSError, Rejected, TypeError):
                if w in t.counted:
                    v.append(f"round {r}: {w} counted but its submission is gone or bad")
                continue
            # ctime: when the file was renamed into this folder (a replica's copy included).
            if st.st_ctime < t.collected_at - CTIME_SLACK_S and w not in t.counted:
                lost += 1
                v.append(f"round {r}: {w}'s submission was there before the last look but not counted")
            if w in t.counted and st.st_ctime > t.closed_at:
                late += 1
                v.append(f"round {r}: {w}'s submission arrived after the round closed but counted")
            if w in t.counted and abs(t.counted[w] - sub.reward_mean) > 1e-12:
                v.append(f"round {r}: {w}'s counted reward differs from its file")
        if any(FAKE_ID.match(n) for n in t.counted):
            v.append(f"round {r}: a hostile submission was counted")

    rows: dict[str, list[dict[str, Any]]] = {}
    for w in workers:
        rows[w] = [x for x in read_jsonl(paths.metrics_file(h.root(w), w)) if isinstance(x.get("round"), int)]
    seen = Counter((w, x["round"]) for w, rs in rows.items() for x in rs)
    twice = sum(1 for n in seen.values() if n > 1)
    if twice:
        v.append(f"{twice} (node, round) pairs trained and counted more than once")
    unacked = 0
    for w, rs in rows.items():
        if [x["round"] for x in rs] != sorted({x["round"] for x in rs}):
            v.append(f"{w}: metrics rounds not strictly increasing")
        for x in rs:
            if any(FAKE_ID.match(str(s)) for s in x.get("external_from", [])):
                v.append(f"{w} round {x['round']}: trained on a hostile peer's group")
            if x.get("submitted"):
                doc = read_json(paths.reward_file(h.root(w), x["round"], 0, w))
                if doc is None or doc.get("instance") != x.get("instance"):
                    unacked += 1
                    v.append(f"{w} round {x['round']}: acknowledged submission missing or replaced")

    # -- no node saw the state go backwards -------------------------------------------
    backwards = 0
    for w in workers:
        last: dict[str, int] = {}
        for e in read_jsonl(paths.events_file(h.root(w), w)):
            inst, rnd = e.get("instance"), e.get("round")
            if isinstance(rnd, int) and inst is not None:
                if rnd < last.get(inst, -1):
                    backwards += 1
                last[inst] = max(rnd, last.get(inst, -1))
    if backwards:
        v.append(f"state observed going backwards {backwards} time(s)")

    # -- hostile payloads --------------------------------------------------------------
    kinds: Counter[str] = Counter(p.kind for p in payloads)
    refused, refused_when_read, unsampled, late_payloads = 0, 0, 0, 0
    for p in payloads:
        if rejected(p, logged):
            refused += 1
            refused_when_read += p.examined_only_if_sampled
        elif p.examined_only_if_sampled:
            unsampled += 1
        elif p.landed_late:
            late_payloads += 1
        else:
            v.append(f"hostile payload {p.kind} at {p.path} has no logged rejection")

    # -- checkpoints -------------------------------------------------------------------
    loadable = 0
    for w in workers:
        found = latest_checkpoint(h.root(w), w)
        if found is None:
            v.append(f"{w}: no complete checkpoint")
            continue
        try:
            read_counters(found[1], w)
            if a.model == "sapod:scripted":
                from sapod.policy.scripted import ScriptedPolicy

                ScriptedPolicy().load(found[1])
            loadable += 1
        except (Rejected, ValueError, OSError) as exc:
            v.append(f"{w}: latest checkpoint {found[1]} does not load: {exc}")
    leftovers = sum(1 for w in workers for p in paths.checkpoints_dir(h.root(w)).glob("round_*/.*tmp-*"))

    # -- dead worker: later rounds close within ROUND_TIMEOUT + 2 POLL_INTERVAL -------------
    env = h.env("coord", "coordinator")
    bound = float(env["ROUND_TIMEOUT"]) + 2 * float(env["POLL_INTERVAL"])
    dead = []
    if "dead_phase_start" in h.notes:
        after = sorted((t for t in tallies.values() if t.collected_at > h.notes["dead_phase_start"]),
                       key=lambda t: t.round)[1:]  # the first was opened by the coordinator before
        dead = [t.seconds + (t.closed_at - t.collected_at) for t in after]  # open to tally
        if any(s > bound for s in dead):
            v.append(f"with a dead worker a round took {max(dead):.2f} s > bound {bound:.2f} s")

    # -- twins: the later daemon steps down within two heartbeats -------------------------
    hb = float(env["HEARTBEAT_INTERVAL"])
    twin_s = []
    for p in h.procs:
        if p.tag != "-twin":
            continue
        mine, _ = _file_rows(p.log)
        start = next((_ts(e) for e in mine if e.get("event") == "node_starting"), None)
        out = next((_ts(e) for e in mine if e.get("event") == "displaced"), None)
        if start is not None and out is not None:
            twin_s.append(out - start)
    # A twin watches the owner's beat for two heartbeats (+0.5 s) before registering.
    limit = 2 * hb + 0.5 + 0.25
    if any(s > limit for s in twin_s):
        v.append(f"a duplicate NODE_ID stepped down after {max(twin_s):.2f} s > {limit:.2f} s")

    external = {w: round(sum(1 for x in rs if x.get("n_external", 0) > 0) / max(1, len(rs)), 3)
                for w, rs in rows.items()}
    worker_rss = max((p.peak_rss for p in h.procs if p.role == "worker"), default=0.0)
    coord_rss = max((p.peak_rss for p in h.procs if p.role == "coordinator"), default=0.0)
    figures = {
        "rounds": len(tallies), "wall_s": round(wall, 1), "faults_injected": dict(sorted(h.counts.items())),
        "processes_started": len(h.procs),
        "unplanned_exits": sum(1 for x in v if x.startswith("unplanned exit")),
        "submissions_lost": lost + unacked, "counted_twice": twice, "late_counted": late,
        "state_went_backwards": backwards,
        "hostile_payloads": len(payloads), "hostile_rejected_with_reason": refused,
        "hostile_rejected_when_read": refused_when_read, "hostile_never_sampled": unsampled,
        "hostile_landed_late": late_payloads,
        "payload_kinds": dict(sorted(kinds.items())),
        "peak_rss_worker_mb": round(worker_rss, 1), "peak_rss_coordinator_mb": round(coord_rss, 1),
        "dead_worker_rounds": len(dead), "dead_worker_max_round_s": round(max(dead), 3) if dead else None,
        "dead_worker_bound_s": bound,
        "twin_exit_s_max": round(max(twin_s), 3) if twin_s else None, "twins": len(twin_s),
        "io_errors_logged": events["io_error"], "recoveries": events["recovered"],
        "checkpoint_failed": events["checkpoint_failed"],
        "checkpoint_skipped_low_space": events["checkpoint_skipped_low_space"], "checkpoint_disk": ckpt_disk,
        "checkpoints_loadable": f"{loadable}/{len(workers)}", "checkpoint_tmp_leftovers": leftovers,
        "coordinator_takeovers": events["coordinating"], "displaced": events["displaced"],
        "inotify_restarts": events["inotify_restarted"], "entries_ignored": events["entry_ignored"],
        "rounds_with_external_groups": external, "non_json_log_lines": non_json,
    }
    if h.replicator is not None:
        figures["replication"] = {k: h.replicator.stats()[k] for k in
                                  ("deliveries", "mean_delay_s", "max_delay_s", "missing_gaps", "conflict_copies")}
    return {"figures": figures, "violations": v}


def _file_rows(path: Path) -> tuple[list[dict[str, Any]], int]:
    """One process's JSON log lines, and how many lines were not JSON."""
    out, bad = [], 0
    for line in path.read_text(errors="replace").splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(obj, dict):
            out.append(obj)
    return out, bad
