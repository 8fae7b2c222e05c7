"""`sapod experiment`: real scripted-policy runs; every number is recomputed from metrics.jsonl here."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import time

import pytest

from sapod import experiment, paths
from sapod.report import config_numbers, total_format
from sapod.cli import main
from sapod.policy.scripted import ScriptedPolicy
from sapod.state import StateReader

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
FAST = ["--model", "sapod:scripted", "--nodes", "2", "--poll-interval", "0.1", "--heartbeat-interval", "0.2"]
ARGS = FAST + ["--configs", "2/0,1/1", "--seeds", "2", "--rounds", "5"]
WORKERS = ("worker-1", "worker-2")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def run(argv: list[str], tty: bool = False) -> tuple[int, str, str]:
    out, err = (_Terminal() if tty else io.StringIO()), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["experiment", *argv])
    return code, out.getvalue(), err.getvalue()


def root_of(out, name):
    return paths.experiment_root(out / "runs" / name, name)


def rows_by_round(root, worker) -> dict[int, float]:
    """Each round's reward_mean (a round repeated after a resume counts once, its last row)."""
    got: dict[int, float] = {}
    for line in paths.metrics_file(root, worker).read_text().splitlines():
        row = json.loads(line)
        got[row["round"]] = row["reward_mean"]
    return got


def expected(out) -> dict[str, dict]:
    """The table's numbers, straight from the metrics files."""
    per_run = {}
    for name in ("i2j0-seed1", "i2j0-seed2", "i1j1-seed1", "i1j1-seed2"):
        rows = [rows_by_round(root_of(out, name), w) for w in WORKERS]
        assert all(sorted(r) == [0, 1, 2, 3, 4] for r in rows)
        per_run[name] = {"total": sum(sum(r.values()) for r in rows),
                         "first": sum(r[0] for r in rows) / 2, "last": sum(r[4] for r in rows) / 2}
    configs = {}
    for config in ("i2j0", "i1j1"):
        mine = [v for k, v in per_run.items() if k.startswith(config)]
        totals = [v["total"] for v in mine]
        configs[config] = {"mean": sum(totals) / 2, "min": min(totals), "max": max(totals),
                           "first": sum(v["first"] for v in mine) / 2, "last": sum(v["last"] for v in mine) / 2}
    base = configs["i2j0"]["mean"]
    for c in configs.values():
        c["pct"] = (c["mean"] - base) / abs(base) * 100
    return {"runs": per_run, "configs": configs}


@pytest.fixture(scope="module")
def done(tmp_path_factory):
    out = tmp_path_factory.mktemp("experiment")
    code, printed, err = run(ARGS + ["--out", str(out)])
    assert code == 0, printed + err
    return out, printed


def test_table_agrees_with_metrics(done):
    """Each config's row: mean/min/max total reward over seeds, % vs J=0, first and last fifth."""
    out, printed = done
    want = expected(out)
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in printed.splitlines() if line.startswith("| i")}
    assert list(rows) == ["i2j0", "i1j1"]
    assert "| config | I | J | seeds | total reward (mean) | min | max | vs i2j0 |" in printed
    for config, (i, j) in (("i2j0", ("2", "0")), ("i1j1", ("1", "1"))):
        c = want["configs"][config]
        f = total_format  # two decimals from 10 up, four below
        assert rows[config] == [config, i, j, "2", format(c["mean"], f(c["mean"])), format(c["min"], f(c["min"])),
                                format(c["max"], f(c["max"])),
                                f"{c['pct']:+.1f} %", f"{c['first']:.4f}", f"{c['last']:.4f}",
                                f"{c['last'] - c['first']:+.4f}"]
    assert rows["i2j0"][7] == "+0.0 %"
    for name, r in want["runs"].items():
        assert f"{name}: total reward {r['total']:.4f} (2 nodes x 5 rounds" in printed
    assert "experiment 100%" in printed and "ETA" in printed


def test_results_json_holds_every_number(done):
    """results.json: settings, the baseline, per-config and per-run numbers, the command line."""
    out, _ = done
    want = expected(out)
    doc = json.loads((out / "results.json").read_text())
    assert doc["baseline"] == "i2j0"
    assert doc["command"].startswith("sapod experiment --model sapod:scripted")
    assert doc["settings"]["nodes"] == 2 and doc["settings"]["rounds"] == 5
    assert [r["name"] for r in doc["runs"]] == list(want["runs"])
    for r in doc["runs"]:
        w = want["runs"][r["name"]]
        assert r["total_reward"] == pytest.approx(w["total"])
        assert r["first_fifth_reward"] == pytest.approx(w["first"])
        assert r["last_fifth_reward"] == pytest.approx(w["last"])
        assert sum(r["per_node_total"].values()) == pytest.approx(w["total"])
        assert (r["nodes"], r["rounds"]) == (2, 5)
    for c in doc["configs"]:
        w = want["configs"][c["config"]]
        assert c["seeds"] == [1, 2]
        assert c["total_reward_mean"] == pytest.approx(w["mean"])
        assert (c["total_reward_min"], c["total_reward_max"]) == pytest.approx((w["min"], w["max"]))
        assert c["improvement_pct"] == pytest.approx(w["pct"])
        assert c["learning_change"] == pytest.approx(w["last"] - w["first"])
    assert [c["baseline"] for c in doc["configs"]] == [True, False]


def test_plots_and_report_md(done):
    """Three valid PNGs, linked from report.md with the table and the exact command line."""
    from matplotlib.image import imread

    out, _ = done
    md = (out / "report.md").read_text()
    for name in ("reward-by-config.png", "cumulative-by-config.png", "reward-by-run.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
        assert imread(out / name).shape[0] > 0
        assert f"]({name})" in md
    assert "`sapod experiment " + " ".join(ARGS) in md
    assert "| i1j1 | 1 | 1 | 2 |" in md and "| i2j0-seed1 | 2 | 5 |" in md


def test_rerun_skips_finished_runs(done):
    """The same command again runs nothing: every run says skipped, metrics untouched, same table."""
    out, printed = done
    names = ("i2j0-seed1", "i1j1-seed2")
    before = {n: paths.metrics_file(root_of(out, n), "worker-1").stat().st_mtime_ns for n in names}
    code, again, _ = run(ARGS + ["--out", str(out)])
    assert code == 0
    assert again.count(": skipped, already finished") == 4
    table = [line for line in printed.splitlines() if line.startswith("|")]
    assert table == [line for line in again.splitlines() if line.startswith("|")]
    assert before == {n: paths.metrics_file(root_of(out, n), "worker-1").stat().st_mtime_ns for n in before}


def test_other_settings_in_the_same_out_exit_2(done):
    """A rerun with other swarm settings (here --rounds) into the same OUT would mix runs: exit 2."""
    out, _ = done
    code, _, err = run(FAST + ["--configs", "2/0,1/1", "--seeds", "2", "--rounds", "6", "--out", str(out)])
    assert code == 2
    assert "rounds 5 -> 6" in err and "use another --out" in err


@pytest.mark.parametrize("configs, message", [
    ("4/0,1/1", "I+J must be the same for every config (got 4/0=4, 1/1=2)"),
    ("2-0,1/1", "'2-0' is not I/J"),
    ("a/b", "'a/b' is not I/J"),
    ("0/2,1/1", "I >= 1"),
    ("1/1,1/1", "names a config twice"),
    ("\u00b2/0", "is not I/J"),  # a superscript two passes str.isdigit, not int()
])
def test_bad_configs_exit_2(tmp_path, configs, message):
    """A bad --configs is one line on stderr and exit 2, before anything runs."""
    code, printed, err = run(FAST + ["--configs", configs, "--out", str(tmp_path / "o")])
    assert code == 2 and printed == ""
    assert err.startswith("sapod experiment: error: --configs") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("seeds", ["x", "\u00b2"])
def test_bad_seeds_exit_2(tmp_path, seeds):
    code, _, err = run(FAST + ["--seeds", seeds, "--out", str(tmp_path / "o")])
    assert code == 2 and f"--seeds: {seeds!r} is not a count" in err


def test_seeds_count_starts_at_seed():
    """--seeds N is N seeds from --seed; a list is taken as given."""
    assert experiment.parse_seeds("3", 7) == [7, 8, 9]
    assert experiment.parse_seeds("1,5", 7) == [1, 5]


def test_improvement_is_against_the_j0_config_wherever_it_is_listed():
    """The J=0 config is the baseline even when not first; without one, the first config is."""
    def runs(totals):
        return [{"I": i, "J": j, "seed": 1, "total_reward": t, "first_fifth_reward": 0.1, "last_fifth_reward": 0.3}
                for (i, j), t in totals.items()]

    rows = config_numbers([(2, 2), (4, 0)], runs({(2, 2): 15.0, (4, 0): 10.0}))
    assert [(r["config"], r["baseline"], r["improvement_pct"]) for r in rows] == [("i2j2", False, 50.0),
                                                                                 ("i4j0", True, 0.0)]
    rows = config_numbers([(2, 2), (1, 3)], runs({(2, 2): 8.0, (1, 3): 6.0}))
    assert [r["improvement_pct"] for r in rows] == [0.0, -25.0]
    assert rows[0]["learning_change"] == pytest.approx(0.2)


def test_no_j0_config_warns(tmp_path):
    code, printed, _ = run(FAST + ["--configs", "1/1", "--seeds", "1", "--rounds", "2", "--nodes", "1",
                                   "--out", str(tmp_path)])
    assert code == 0
    assert "warning: no J=0 config: improvements are relative to the first config, i1j1" in printed


def _stop_i1j1_at_round_3(out, monkeypatch, args):
    """Runs ``args`` with a SIGINT once i1j1-seed1 reaches round 3: i2j0 finished, i1j1 stopped.
    Returns what it printed and the stopped run's state."""
    real = experiment.run_swarm

    def interrupting(cfg, n, on_poll):
        reader, sent = StateReader(cfg.root), []

        def poll():
            on_poll()
            state = reader.read()
            if cfg.experiment == "i1j1-seed1" and state is not None and state.round >= 3 and not sent:
                sent.append(1)
                os.kill(os.getpid(), signal.SIGINT)
        return real(cfg, n, poll)

    monkeypatch.setattr(experiment, "run_swarm", interrupting)
    code, printed, err = run(args)
    monkeypatch.setattr(experiment, "run_swarm", real)
    assert code == 0 and "i1j1-seed1: interrupted" in printed, printed + err
    return printed, StateReader(root_of(out, "i1j1-seed1")).read()


def test_ctrl_c_keeps_finished_runs_and_a_rerun_resumes(tmp_path, monkeypatch):
    """SIGINT mid-run stops cleanly (exit 0, 'interrupted'); the rerun skips the finished run,
    resumes the stopped one from its checkpoints and ends with every round recorded once and the
    same rewards as a run never stopped (every random choice derives from seed, node and round)."""
    args = FAST + ["--configs", "2/0,1/1", "--seeds", "1", "--rounds", "40", "--out", str(tmp_path)]
    printed, stopped = _stop_i1j1_at_round_3(tmp_path, monkeypatch, args)
    assert "rerun the same command to resume" in printed
    assert stopped.status == "open" and 3 <= stopped.round < 39
    assert "| i2j0 | 2 | 0 | 1 |" in printed  # the finished run is in the table already

    code, printed, err = run(args)
    assert code == 0, printed + err
    assert "i2j0-seed1: skipped" in printed and f"i1j1-seed1: resuming after round {stopped.round}" in printed
    root = root_of(tmp_path, "i1j1-seed1")
    assert StateReader(root).read().status == "finished"
    rows = [rows_by_round(root, w) for w in WORKERS]
    assert all(sorted(r) == list(range(40)) for r in rows)
    doc = json.loads((tmp_path / "results.json").read_text())
    assert doc["runs"][1]["total_reward"] == pytest.approx(sum(sum(r.values()) for r in rows))

    whole = tmp_path / "whole"
    assert run(FAST + ["--configs", "1/1", "--seeds", "1", "--rounds", "40", "--out", str(whole)])[0] == 0
    assert json.loads((whole / "results.json").read_text())["runs"][0]["per_node_total"] == pytest.approx(
        doc["runs"][1]["per_node_total"])


def test_clean_stop_keeps_runs_finished_later_in_the_order(tmp_path, monkeypatch):
    """A clean stop keeps every finished run in the table and results.json, including one later in
    the order than the stopped run: here i2j0 failed on the first try (so i1j1 finished after it),
    and the rerun is stopped cleanly while retrying i2j0."""
    real = experiment.run_swarm
    args = FAST + ["--configs", "2/0,1/1", "--seeds", "1", "--rounds", "3", "--out", str(tmp_path)]

    def first_fails(cfg, n, on_poll):
        return 1 if cfg.experiment == "i2j0-seed1" else real(cfg, n, on_poll)

    monkeypatch.setattr(experiment, "run_swarm", first_fails)
    code, printed, err = run(args)
    assert code == 1 and "i2j0-seed1: FAILED" in printed, printed + err
    assert [r["name"] for r in json.loads((tmp_path / "results.json").read_text())["runs"]] == ["i1j1-seed1"]

    def stopped_cleanly(cfg, n, on_poll):  # what run_swarm returns when SIGINT stops the swarm
        assert cfg.experiment == "i2j0-seed1", "the rerun must stop at i2j0, before reaching i1j1"
        return 0

    monkeypatch.setattr(experiment, "run_swarm", stopped_cleanly)
    code, printed, err = run(args)
    assert code == 0, printed + err
    assert "i2j0-seed1: interrupted" in printed
    doc = json.loads((tmp_path / "results.json").read_text())
    assert [r["name"] for r in doc["runs"]] == ["i1j1-seed1"]
    assert "| i1j1 | 1 | 1 | 1 |" in printed and "| i1j1-seed1 | 2 | 3 |" in (tmp_path / "report.md").read_text()


@pytest.mark.parametrize("restart", [False, True], ids=["resumed", "started-again"])
def test_progress_counts_the_whole_experiment_on_a_rerun(tmp_path, monkeypatch, restart):
    """On a rerun the experiment's progress counts the rounds done before it: with i2j0 (R rounds)
    finished, i1j1 at round d is (R + d)/2R of the experiment, whether i1j1 resumed or (its
    checkpoints gone, as after a hard kill) started again; it never passes 100 %."""
    R = 40
    # Scripted rounds take milliseconds: slowed, the SIGINT lands mid-run and several polls see the rerun.
    real_generate = ScriptedPolicy.generate

    def slow_generate(self, *a, **k):
        time.sleep(0.02)
        return real_generate(self, *a, **k)

    monkeypatch.setattr(ScriptedPolicy, "generate", slow_generate)
    args = FAST + ["--configs", "2/0,1/1", "--seeds", "1", "--rounds", str(R), "--out", str(tmp_path)]
    stopped_at = _stop_i1j1_at_round_3(tmp_path, monkeypatch, args)[1].round
    if restart:
        import shutil
        shutil.rmtree(paths.checkpoints_dir(root_of(tmp_path, "i1j1-seed1")))
    code, printed, err = run(args, tty=True)  # a terminal: every poll that sees a new round draws the bar
    assert code == 0, printed + err
    assert ("starting again" in printed) == restart
    assert (f"resuming after round {stopped_at}" in printed) == (not restart)
    lines = re.findall(rf"i1j1-seed1 round (\d+)/{R} reward \S+ +experiment +(\d+)%", printed)
    assert len(lines) >= 2 and lines[-1] == (str(R), "100")
    assert [int(pct) for _, pct in lines] == [100 * (R + int(d)) // (2 * R) for d, _ in lines]
