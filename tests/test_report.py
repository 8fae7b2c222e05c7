"""`sapod report`: PNG figures, report.md and the comparison table against a baseline."""

from __future__ import annotations

import re
import sys

import pytest

from sapod import paths
from sapod.cli import main
from sapod.report import load_experiment, moving_average, summary_rows

from conftest import read_rows

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
