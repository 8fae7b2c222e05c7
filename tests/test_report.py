"""`sapod report`: PNG figures, report.md and the comparison table against a baseline."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import sys
from pathlib import Path

import pytest

from sapod import paths, report
from sapod.cli import main
from sapod.progress import get_experiment_progress, metrics_summary
from sapod.report import format_table, load_experiment, moving_average, summary_rows

from conftest import read_rows, write_peer

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One shared folder with two finished demos: `demo` (SAPO, J=2) and `grpo` (J=0)."""
    folder = tmp_path_factory.mktemp("report")
    base = ["demo", "--model", "sapod:scripted", "--workers", "2", "--rounds", "6", "--shared", str(folder)]
    assert main(base) == 0
    assert main(base + ["--experiment", "grpo", "--num-transplant-trees", "0"]) == 0
    return folder


def total_reward(root):
    return sum(r["reward_mean"] for w in ("worker-1", "worker-2") for r in read_rows(paths.metrics_file(root, w)))


def assert_png(path):
    from matplotlib.image import imread

    assert path.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(path)
    assert image.shape[0] > 0 and image.shape[1] > 0


def test_one_experiment_writes_pngs_and_markdown(shared, tmp_path, capsys):
    """One experiment by path gives three valid PNGs and a report.md holding the table and links."""
    root = paths.experiment_root(shared, "demo")
    out = tmp_path / "out"
    assert main(["report", str(root), "--out", str(out)]) == 0
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["demo-cumulative.png", "demo-reward.png", "demo-timing.png"]
    for name in pngs:
        assert_png(out / name)
    md = (out / "report.md").read_text()
    assert "| experiment | nodes | rounds | I | J | G |" in md
    assert f"| demo | 2 | 6 | 2 | 2 | 4 | {total_reward(root):.2f} |" in md
    assert all(f"]({name})" in md for name in pngs)
    printed = capsys.readouterr().out
    assert "| demo | 2 | 6 |" in printed and str(out.resolve()) in printed


def test_two_experiments_compare_against_the_first(shared, tmp_path, capsys):
    """Two experiments by name: the first is the 0 % baseline, the second's improvement is relative to it."""
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["report", "demo", "grpo", "--shared", str(shared), "--out", str(out), "--window", "3"]) == 0
    assert_png(out / "comparison.png")
    assert_png(out / "grpo-reward.png")
    base = total_reward(paths.experiment_root(shared, "demo"))
    other = total_reward(paths.experiment_root(shared, "grpo"))
    md = (out / "report.md").read_text()
    assert re.search(r"\| demo \| 2 \| 6 \| 2 \| 2 \| 4 \| [\d.]+ \| [\d.]+ \| \+0\.0 % \|", md)
    assert f"| grpo | 2 | 6 | 2 | 0 | 4 | {other:.2f} |" in md
    assert f"{(other - base) / base * 100:+.1f} %" in md
    assert "comparison.png" in md


def test_summary_rows_sum_reward_mean_over_node_rounds(shared):
    """Total reward is the sum of reward_mean over every node-round; the baseline's improvement is 0."""
    root = paths.experiment_root(shared, "demo")
    row = summary_rows([load_experiment(root, "demo")])[0]
    assert row["total_reward"] == pytest.approx(total_reward(root))
    assert row["mean_reward"] == pytest.approx(total_reward(root) / 12)
    assert row["improvement_pct"] == 0.0


def test_moving_average_is_trailing_and_clipped():
    """The moving average averages what exists at the start, then a trailing window."""
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0, 4.0], 100) == [2.0, 3.0]


def test_missing_matplotlib_exits_2(shared, tmp_path, monkeypatch, capsys):
    """Without matplotlib the command exits 2 and names the sapod[plot] extra."""
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["report", str(paths.experiment_root(shared, "demo")), "--out", str(tmp_path / "o")]) == 2
    assert "sapod[plot]" in capsys.readouterr().err


def test_missing_experiment_exits_1(shared, tmp_path, capsys):
    """An experiment name with no folder exits 1 with a one-line message."""
    assert main(["report", "nope", "--shared", str(shared), "--out", str(tmp_path / "o")]) == 1
    assert "no experiment folder for 'nope'" in capsys.readouterr().err


# -- a shared folder that misbehaves --------------------------------------------------

def _small_experiment(shared: Path, name: str = "e") -> Path:
    """An experiment folder with one worker's heartbeat, progress and two good metrics rows."""
    root = paths.experiment_root(shared, name)
    write_peer(root, "w1", 3)
    paths.progress_file(root, "w1").write_text(json.dumps({"event": "round_complete", "role": "worker"}) + "\n")
    metrics = paths.metrics_file(root, "w1")
    metrics.parent.mkdir(parents=True)
    metrics.write_text("".join(json.dumps({"round": r, "reward_mean": 0.5, "n_external": 1,
                                           "cumulative_reward": 0.5 * (r + 1), "ts": 100.0 + r}) + "\n"
                               for r in range(2)))
    return root


def test_report_exits_1_when_peers_cannot_be_listed(tmp_path, capsys, monkeypatch):
    """An EIO listing peers/ ends the report with one line naming the folder and the error, exit 1."""
    root = _small_experiment(tmp_path)

    def listing(directory):
        raise OSError(errno.EIO, "Input/output error", str(directory))

    monkeypatch.setattr(report, "list_node_files", listing)
    capsys.readouterr()
    assert main(["report", str(root), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("sapod report: ")
    assert str(paths.peers_dir(root)) in err[0] and "Input/output error" in err[0]
    assert not (tmp_path / "o" / "report.md").exists()


def test_report_exits_1_when_the_experiment_folder_cannot_be_listed(tmp_path, capsys, monkeypatch):
    """An EIO listing the experiment folder (for progress_*.jsonl) is an error too, not a report
    that silently has no nodes."""
    root = _small_experiment(tmp_path)
    real = os.listdir

    def listdir(path="."):
        if Path(path) == root:
            raise OSError(errno.EIO, "Input/output error", str(path))
        return real(path)

    monkeypatch.setattr(os, "listdir", listdir)
    capsys.readouterr()
    assert main(["report", str(root), "--out", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(root) in err[0] and "Input/output error" in err[0]


ODD_ROWS = [  # (name, odd row as JSONL text, whether it is still a usable row)
    ("reward_mean null", '{"round": 2, "reward_mean": null}', False),
    ("reward_mean string", '{"round": 2, "reward_mean": "0.5"}', False),
    ("reward_mean NaN", '{"round": 2, "reward_mean": NaN}', False),
    ("reward_mean huge int", '{"round": 2, "reward_mean": 1%s}' % ("0" * 400), False),
    ("round null", '{"round": null, "reward_mean": 0.5}', False),
    ("round string", '{"round": "x", "reward_mean": 0.5}', False),
    ("round bool", '{"round": true, "reward_mean": 0.5}', False),
    ("round negative", '{"round": -1, "reward_mean": 0.5}', False),
    ("round huge int", '{"round": 1%s, "reward_mean": 0.5}' % ("0" * 400), False),
    ("n_external null", '{"round": 2, "reward_mean": 0.5, "n_external": null}', True),
    ("n_external float string", '{"round": 2, "reward_mean": 0.5, "n_external": "1.5"}', True),
    ("cumulative dict", '{"round": 2, "reward_mean": 0.5, "cumulative_reward": {}}', True),
    ("cumulative huge int", '{"round": 2, "reward_mean": 0.5, "cumulative_reward": 1%s}' % ("0" * 400), True),
    ("ts huge int", '{"round": 2, "reward_mean": 0.5, "ts": 1%s}' % ("0" * 400), True),
]


@pytest.mark.parametrize("odd,kept", [c[1:] for c in ODD_ROWS], ids=[c[0] for c in ODD_ROWS])
def test_progress_and_report_skip_odd_metrics_rows(tmp_path, odd, kept):
    """get_experiment_progress and the report skip a metrics row without an integer round and a finite
    reward_mean (as report.load_rows always did); an odd n_external or cumulative_reward in a good row
    counts as none. Nothing raises."""
    root = _small_experiment(tmp_path)
    with paths.metrics_file(root, "w1").open("a") as fh:
        fh.write(odd + "\n")
    summary = get_experiment_progress(tmp_path, "e")["nodes"]["w1"]["metrics"]
    assert summary["rounds"] == (3 if kept else 2)
    assert summary["last_round"] == (2 if kept else 1)
    assert summary["mean_reward"] == 0.5
    assert summary["external_used"] == 2
    assert summary["cumulative_reward"] == (0.0 if kept else 1.0)
    assert metrics_summary(root, "w1") == summary
    exp = load_experiment(root, "e")
    assert exp.rounds == ([0, 1, 2] if kept else [0, 1])
    rows = summary_rows([exp])
    assert rows[0]["total_reward"] == pytest.approx(1.5 if kept else 1.0)
    assert "| e | 1 |" in format_table(rows)


def test_finite_takes_json_numbers_a_float_can_hold():
    """finite(): ints and floats a float holds; not bools, strings, NaN, infinities or ints past float range."""
    from sapod.progress import finite

    assert finite(0) and finite(-2.5) and finite(10**300)
    assert not any(finite(v) for v in (True, None, "1", {}, math.nan, math.inf, -math.inf, 10**400, -10**400))
