"""``sapod doctor``: checks a shared folder, prints a verdict table, exits 0/1/2."""

from __future__ import annotations

import os

import pytest

from sapod.cli import main
from sapod.doctor import Check, doctor_main, run_checks


def test_local_folder_passes(tmp_path):
    """On a local tmp folder no check fails and every expected check is reported."""
    checks = run_checks(tmp_path)
    assert all(isinstance(c, Check) for c in checks)
    assert [c.name for c in checks] == ["folder writable", "atomic replace", "fsync file", "fsync folder",
                                        "inotify", "mount type", "write-read latency", "free space",
                                        "conflict copy names"]
    assert all(c.result in ("ok", "warn") for c in checks)
    by_name = {c.name: c for c in checks}
    assert by_name["atomic replace"].result == "ok" and by_name["fsync file"].result == "ok"
    assert "WATCH_MODE=auto picks" in by_name["mount type"].detail
    assert "median" in by_name["write-read latency"].detail


def test_table_printed_exit_zero_scratch_removed(tmp_path, capsys):
    """`sapod doctor --shared DIR` prints the table and verdict, exits 0 and leaves the folder as it was."""
    (tmp_path / "existing.json").write_text("{}")
    assert main(["doctor", "--shared", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split() == ["check", "result", "detail"]
    assert "atomic replace" in out and "verdict: ok" in out
    assert os.listdir(tmp_path) == ["existing.json"]


def test_gdrive_path_env_is_used(tmp_path, monkeypatch, capsys):
    """Without --shared the doctor checks GDRIVE_PATH."""
    monkeypatch.setenv("GDRIVE_PATH", str(tmp_path))
    assert doctor_main([]) == 0
    assert str(tmp_path) in capsys.readouterr().out


def test_missing_folder_fails(tmp_path, capsys):
    """A path that does not exist gives a fail row and exit 1."""
    assert doctor_main(["--shared", str(tmp_path / "nope")]) == 1
    out = capsys.readouterr().out
    assert "fail" in out and "does not exist" in out


def test_file_instead_of_folder_fails(tmp_path):
    """A path that is a file, not a folder, fails the first check."""
    f = tmp_path / "file"
    f.write_text("x")
    checks = run_checks(f)
    assert [(c.name, c.result) for c in checks] == [("folder writable", "fail")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder_fails(tmp_path):
    """A folder that cannot be written fails with exit 1."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        assert doctor_main(["--shared", str(ro)]) == 1
        assert os.listdir(ro) == []
    finally:
        ro.chmod(0o755)


def test_bad_usage_exits_two(capsys, monkeypatch):
    """An unknown flag, or no folder at all, is bad usage: exit 2."""
    monkeypatch.delenv("GDRIVE_PATH", raising=False)
    assert doctor_main(["--bogus"]) == 2
    assert doctor_main([]) == 2
    assert "GDRIVE_PATH" in capsys.readouterr().err
