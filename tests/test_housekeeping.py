"""Housekeeping of old rounds: keep the last N, archive before removing, never touch anything else."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from conftest import read_rows, run_nodes
from sapod import paths
from sapod.coordinator import Coordinator
from sapod.housekeeping import should_tidy, tidy_for, tidy_rounds
from sapod.state import StateReader
from sapod.worker import Worker

ROUNDS = 8


def round_names(root: Path, tree: str) -> set[str]:
    folder = root / tree
    return {p.name for p in folder.iterdir()} if folder.exists() else set()


def run_swarm_while_tidying(make_cfg, archive: bool) -> tuple[list, list[dict], Path]:
    """Coordinator + 2 workers for ROUNDS rounds, with tidy_rounds every 50 ms from another task."""
    nodes = [Coordinator(make_cfg("coordinator", "coord", max_rounds=ROUNDS))]
    nodes += [Worker(make_cfg("worker", f"w{i}", max_rounds=ROUNDS)) for i in (1, 2)]
    root = nodes[0].root
    archives = paths.archives_dir(root.parent.parent)
    counts: list[dict] = []

    def tidy_now() -> None:
        state = StateReader(root).read()
        if state is not None:
            counts.append(tidy_rounds(root, archives, state.round, 2, archive))

    async def tidier(done: asyncio.Event) -> None:
        while not done.is_set():
            await asyncio.to_thread(tidy_now)  # a thread, as the coordinator will, so it truly races
            await asyncio.sleep(0.05)

    async def go():
        done = asyncio.Event()
        tidy_task = asyncio.create_task(tidier(done))
        results = await asyncio.wait_for(asyncio.gather(*(n.run() for n in nodes), return_exceptions=True), 60)
        done.set()
        await tidy_task
        assert sum(c["rounds_removed"] for c in counts) > 0, "no tidy ran while the swarm did"
        tidy_now()  # the coordinator's call when it opened the last round, in case we missed it
        return results

    return asyncio.run(go()), counts, root


def check_swarm_finished(results: list, root: Path) -> None:
    assert results == [None, None, None]
    for w in ("w1", "w2"):
        assert [r["round"] for r in read_rows(paths.metrics_file(root, w))] == list(range(ROUNDS))
    done = [e for e in read_rows(paths.progress_file(root, "coord")) if e["event"] == "round_complete"]
    assert [e["round"] for e in done] == list(range(ROUNDS))
    assert all(e["submitted"] == ["w1", "w2"] and not e["timed_out"] for e in done)
    kept = {f"round_{ROUNDS - 2}", f"round_{ROUNDS - 1}"}
    assert round_names(root, "rollouts") == kept and round_names(root, "rewards") == kept


def test_tidy_while_swarm_runs(make_cfg):
    """Tidying every 50 ms during a live swarm leaves it unharmed and keeps exactly the last 2 rounds."""
    results, counts, root = run_swarm_while_tidying(make_cfg, archive=False)
    check_swarm_finished(results, root)
    assert sum(c["rounds_removed"] for c in counts) >= ROUNDS - 2
    assert sum(c["errors"] for c in counts) == 0
    assert not paths.archives_dir(root.parent.parent).exists()


def test_tidy_with_archive_while_swarm_runs(make_cfg):
    """With archive=True every removed round has one complete tar.gz holding both workers' files."""
    results, counts, root = run_swarm_while_tidying(make_cfg, archive=True)
    check_swarm_finished(results, root)
    folder = paths.archives_dir(root.parent.parent) / "t"
    assert sorted(os.listdir(folder)) == sorted(f"round_{r}.tar.gz" for r in range(ROUNDS - 2))  # no temp files
    assert sum(c["rounds_archived"] for c in counts) == ROUNDS - 2
    assert sum(c["errors"] for c in counts) == 0
    for r in range(ROUNDS - 2):
        with tarfile.open(folder / f"round_{r}.tar.gz") as tar:
            names = set(tar.getnames())
            for w in ("w1", "w2"):
                for tree in ("rollouts", "rewards"):
                    member = f"{tree}/round_{r}/stage_0/{w}.json"
                    assert member in names
                    assert tar.extractfile(member).read().startswith(b"{")
    assert not [p for p in root.rglob("*") if ".tmp-" in p.name]


def make_rounds(root: Path, rounds: range) -> None:
    for r in rounds:
        for tree in ("rollouts", "rewards"):
            folder = root / tree / f"round_{r}" / "stage_0"
            folder.mkdir(parents=True)
            (folder / "w1.json").write_text('{"r": %d}' % r)


def test_only_round_folders_are_touched(tmp_path):
    """Stray files, round_x folders and symlinks (even named round_N) are left alone; link targets survive."""
    root, archives = tmp_path / "experiments" / "e", tmp_path / "archives"
    make_rounds(root, range(4))
    outside = tmp_path / "outside"
    (outside / "stage_0").mkdir(parents=True)
    (outside / "stage_0" / "keep.json").write_text("{}")
    (root / "rollouts" / "notes.txt").write_text("keep")
    (root / "rollouts" / "round_x").mkdir()
    (root / "rollouts" / "round_1.json").write_text("{}")
    (root / "rewards" / "round_0 (1)").mkdir()
    os.symlink(outside, root / "rollouts" / "round_0_link")
    os.symlink(outside, root / "rewards" / "round_7")  # a link with a round's name: still not ours
    counts = tidy_rounds(root, archives, open_round=3, keep_last=2, archive=True)
    assert counts["rounds_removed"] == 2 and counts["rounds_archived"] == 2 and counts["errors"] == 0
    assert counts["bytes_archived"] == sum(p.stat().st_size for p in (archives / "e").iterdir())
    assert round_names(root, "rollouts") == {"round_2", "round_3", "notes.txt", "round_x", "round_1.json",
                                             "round_0_link"}
    assert round_names(root, "rewards") == {"round_2", "round_3", "round_0 (1)", "round_7"}
    assert (outside / "stage_0" / "keep.json").is_file()


def test_symlinked_tree_is_never_followed(tmp_path):
    """A rollouts/ that is itself a symlink out of the experiment is not listed or emptied."""
    root, outside = tmp_path / "exp", tmp_path / "outside"
    make_rounds(outside, range(3))
    root.mkdir()
    os.symlink(outside / "rollouts", root / "rollouts")
    counts = tidy_rounds(root, tmp_path / "archives", open_round=5, keep_last=2, archive=False)
    assert counts["errors"] == 0
    assert round_names(outside, "rollouts") == {"round_0", "round_1", "round_2"}


def test_existing_archive_is_not_rewritten(tmp_path):
    """An archive already written for a round stays as it is; the round is still removed."""
    root, archives = tmp_path / "experiments" / "e", tmp_path / "archives"
    make_rounds(root, range(3))
    (archives / "e").mkdir(parents=True)
    (archives / "e" / "round_0.tar.gz").write_bytes(b"earlier")
    counts = tidy_rounds(root, archives, open_round=2, keep_last=2, archive=True)
    assert counts == {"rounds_removed": 1, "rounds_archived": 0, "bytes_archived": 0, "errors": 0}
    assert (archives / "e" / "round_0.tar.gz").read_bytes() == b"earlier"
    assert round_names(root, "rollouts") == {"round_1", "round_2"}


def test_keeps_the_open_round_and_keep_last_minus_one_before(tmp_path):
    """keep_last=3 with round 5 open keeps rounds 3, 4, 5; nothing to do while too few rounds exist."""
    root = tmp_path / "e"
    make_rounds(root, range(6))
    assert not should_tidy(2, 3) and should_tidy(3, 3)
    assert tidy_rounds(root, tmp_path / "a", 1, 3, False)["rounds_removed"] == 0
    assert tidy_rounds(root, tmp_path / "a", 5, 3, False)["rounds_removed"] == 3
    assert round_names(root, "rewards") == {"round_3", "round_4", "round_5"}


def test_removal_errors_are_counted_not_raised(tmp_path, monkeypatch):
    """An OSError from rmtree is logged and counted per round; the call returns normally."""
    root = tmp_path / "e"
    make_rounds(root, range(4))

    def broken(*args, **kwargs):
        raise OSError(5, "Input/output error", str(args[0]))

    monkeypatch.setattr(shutil, "rmtree", broken)
    counts = tidy_rounds(root, tmp_path / "a", 3, 2, False)
    assert counts["errors"] == 2 and counts["rounds_removed"] == 0
    assert round_names(root, "rollouts") == {f"round_{r}" for r in range(4)}


def test_failed_archive_keeps_the_round(tmp_path, monkeypatch):
    """When packing fails the round is not removed and no temp file is left in archives/."""
    root, archives = tmp_path / "e", tmp_path / "archives"
    make_rounds(root, range(3))

    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "addfile", broken)
    counts = tidy_rounds(root, archives, 2, 2, True)
    assert counts["errors"] == 1 and counts["rounds_removed"] == 0 and counts["rounds_archived"] == 0
    assert round_names(root, "rollouts") == {"round_0", "round_1", "round_2"}
    assert os.listdir(archives / "e") == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_unreadable_round_is_counted_not_raised(tmp_path):
    """A round folder that cannot be read is an error for that round only; later rounds still go."""
    root = tmp_path / "e"
    make_rounds(root, range(4))
    bad = root / "rollouts" / "round_0"
    bad.chmod(0)
    try:
        counts = tidy_rounds(root, tmp_path / "a", 3, 2, True)
    finally:
        bad.chmod(0o755)
    assert counts["errors"] == 1 and counts["rounds_removed"] == 1
    assert round_names(root, "rollouts") == {"round_0", "round_2", "round_3"}


def test_keep_last_below_two_is_refused(tmp_path):
    """keep_last < 2 would remove the round a slow worker still reads: ValueError."""
    with pytest.raises(ValueError, match="keep_last"):
        tidy_rounds(tmp_path, tmp_path / "a", 5, 1, False)


def test_tidy_for_follows_the_config(make_cfg):
    """tidy_for does nothing with cleanup off, and uses keep-last and archive from the config when on."""
    off = make_cfg("coordinator", "c")
    make_rounds(off.root, range(12))
    assert tidy_for(off, 11) is None
    on = make_cfg("coordinator", "c", rollout_cleanup_enabled="true", rollout_keep_last_n_rounds=3,
                  rollout_archive_old="true")
    counts = tidy_for(on, 11)
    assert counts["rounds_removed"] == 9 and counts["rounds_archived"] == 9
    assert (paths.archives_dir(on.shared) / "t" / "round_8.tar.gz").is_file()


def test_a_new_run_under_a_reused_name_archives_its_own_rounds(make_cfg):
    """The experiment folder was deleted and the name reused: the earlier run's archives
    are moved aside, so the new run's rounds are archived too (they were found "archived
    already" and removed unarchived), and neither run's archives are mixed or lost."""
    over = dict(max_rounds=5, rollout_cleanup_enabled="true", rollout_archive_old="true", rollout_keep_last_n_rounds=2)

    def run_once() -> tuple[Path, str]:
        coord = Coordinator(make_cfg("coordinator", "coord", **over))
        assert run_nodes(coord, Worker(make_cfg("worker", "w1", **over))) == [None, None]
        return coord.root, coord.instance

    root, first = run_once()
    archives = paths.archives_dir(root.parent.parent)
    shutil.rmtree(root)
    root, second = run_once()

    def tally_instance(archive: Path, r: int) -> str:
        with tarfile.open(archive) as tar:
            return json.loads(tar.extractfile(f"rewards/round_{r}/stage_0/_tally.json").read())["instance"]

    aside = [p for p in archives.iterdir() if p.name.startswith("t.before-")]
    assert len(aside) == 1
    for folder, instance in ((aside[0], first), (archives / "t", second)):
        assert sorted(os.listdir(folder)) == [f"round_{r}.tar.gz" for r in range(3)]
        assert all(tally_instance(folder / f"round_{r}.tar.gz", r) == instance for r in range(3))


def test_a_partial_archive_left_by_a_killed_packer_is_removed_when_the_round_is_packed_again(tmp_path):
    """What a coordinator killed mid-pack left of a round's archive goes when that round is archived."""
    root, archives = tmp_path / "e", tmp_path / "archives"
    make_rounds(root, range(3))
    partial = archives / "e" / ".partial"
    partial.mkdir(parents=True)
    leftover = partial / "round_0.tar.gz.tmp-999-deadbeef"
    other = partial / "round_7.tar.gz.tmp-999-deadbeef"  # another round's, maybe being written: not touched
    leftover.write_bytes(b"half an archive")
    other.write_bytes(b"half an archive")
    tidy_rounds(root, archives, 2, 2, True)
    assert sorted(os.listdir(archives / "e")) == [".partial", "round_0.tar.gz"]
    assert os.listdir(partial) == [other.name]
    other.unlink()
    tidy_rounds(root, archives, 3, 2, True)
    assert sorted(os.listdir(archives / "e")) == ["round_0.tar.gz", "round_1.tar.gz"]  # no temp folder left
