"""scripts/chaos_lag.py: Drive-like lag, reordering, gaps, conflict copies and deletions between replicas."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).resolve().parent.parent / "scripts"
sys.path.insert(0, str(SCRIPTS))

from chaos_lag import Replicator, conflict_name  # noqa: E402

from sapod.store import atomic_write_bytes, atomic_write_json  # noqa: E402

QUIET = {"p_missing": 0.0, "p_conflict": 0.0, "scan_interval": 0.01}


@pytest.fixture
def make(tmp_path):
    """Replicators over replicas a, b, c under tmp_path, started, and stopped after the test."""
    made: list[Replicator] = []

    def build(names: str = "abc", start: bool = True, **kw) -> tuple[Replicator, dict[str, Path]]:
        roots = {n: tmp_path / n for n in names}
        rep = Replicator(roots, **{"seed": 1, **QUIET, **kw})
        made.append(rep)
        if start:
            rep.start()
        return rep, roots

    yield build
    for rep in made:
        rep.stop()


def wait_for(cond, timeout: float = 5.0, step: float = 0.005):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(step)
    raise AssertionError("condition not met in time")


def listing(root: Path) -> set[str]:
    """Every file below root (hidden ones too), as relative posix paths."""
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def read(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return None


def test_conflict_names():
    assert conflict_name("w1.json", []) == "w1 (1).json"
    assert conflict_name("w1.json", ["w1 (1).json", "w1 (2).json"]) == "w1 (3).json"
    assert conflict_name("COMPLETE", []) == "COMPLETE (1)"


def test_a_write_arrives_late_everywhere(make):
    rep, roots = make(min_delay=0.3, max_delay=0.5)
    t0 = time.monotonic()
    atomic_write_json(roots["a"] / "rollouts" / "round_0" / "w1.json", {"x": 1})
    for dest in "bc":
        wait_for(lambda: (roots[dest] / "rollouts" / "round_0" / "w1.json").exists())
        assert time.monotonic() - t0 >= 0.3
        assert json.loads((roots[dest] / "rollouts/round_0/w1.json").read_text()) == {"x": 1}
    s = rep.stats()
    assert s["deliveries"] == 2 and s["local_writes"] == 1 and s["files_seen"] == 1
    assert 0.3 <= s["mean_delay_s"] <= s["max_delay_s"] < 1.0 and s["errors"] == 0


def test_no_echo_and_it_settles(make):
    rep, roots = make(max_delay=0.2)
    for i in range(5):
        atomic_write_json(roots["a"] / "peers" / f"a{i}.json", {"i": i})
        atomic_write_json(roots["b"] / "rewards" / f"b{i}.json", {"i": i})
    atomic_write_json(roots["c"] / "state.json", {"s": 1})
    assert rep.flush(5)
    expected = {f"peers/a{i}.json" for i in range(5)} | {f"rewards/b{i}.json" for i in range(5)} | {"state.json"}
    for root in roots.values():
        assert listing(root) == expected
    before = rep.stats()
    time.sleep(0.4)
    after = rep.stats()
    assert after["local_writes"] == before["local_writes"] == 11
    assert after["deliveries"] == before["deliveries"] == 22 and after["pending"] == 0


def test_deliveries_arrive_out_of_order(make):
    rep, roots = make("ab", min_delay=0.05, max_delay=0.6, seed=3)
    names = [f"f{i:02d}.json" for i in range(20)]
    for name in names:
        atomic_write_json(roots["a"] / name, {"n": name})
        time.sleep(0.015)
    order: list[str] = []
    def arrived():
        for entry in os.scandir(roots["b"]):
            if not entry.name.startswith(".") and entry.name not in order:
                order.append(entry.name)
        return len(order) == len(names)
    wait_for(arrived, timeout=5, step=0.002)
    assert sorted(order) == names and order != names


def test_a_newer_version_is_never_overwritten_by_an_older(make):
    rep, roots = make("ab", min_delay=0.05, max_delay=0.6, seed=5)
    path_a, path_b = roots["a"] / "state.json", roots["b"] / "state.json"
    observed: list[int] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            data = read(path_b)
            if data is not None and (not observed or observed[-1] != json.loads(data)["v"]):
                observed.append(json.loads(data)["v"])
            time.sleep(0.002)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        for v in range(15):
            atomic_write_json(path_a, {"v": v})
            time.sleep(0.04)
        wait_for(lambda: read(path_b) == read(path_a))
        time.sleep(0.7)  # every older delivery has come due by now
    finally:
        stop.set()
        watcher.join()
    assert observed == sorted(observed) and observed[-1] == 14
    assert rep.stats()["stale_dropped"] > 0  # older versions did arrive late, and were dropped
    assert json.loads(path_b.read_text()) == {"v": 14}


def test_an_update_goes_missing_for_a_moment(make):
    rep, roots = make("ab", min_delay=0.05, max_delay=0.1, p_missing=1.0)
    src, dst = roots["a"] / "peers" / "w1.json", roots["b"] / "peers" / "w1.json"
    atomic_write_json(src, {"beat": 1})
    wait_for(lambda: read(dst) is not None)  # a first delivery: nothing to go missing from
    assert rep.stats()["missing_gaps"] == 0
    atomic_write_json(src, {"beat": 2})
    seen: list[bytes | None] = []
    def new_content():
        seen.append(read(dst))
        return seen[-1] is not None and json.loads(seen[-1]) == {"beat": 2}
    wait_for(new_content, timeout=3, step=0.001)
    assert None in seen and seen.index(None) > 0 and json.loads(seen[0]) == {"beat": 1}
    assert rep.stats()["missing_gaps"] == 1


def test_conflict_copies_stay_where_they_were_made(make):
    rep, roots = make(p_conflict=1.0, max_delay=0.1)
    atomic_write_json(roots["a"] / "w1.json", {"v": 1})
    assert rep.flush(5)
    atomic_write_json(roots["a"] / "w1.json", {"v": 2})
    assert rep.flush(5)
    time.sleep(0.2)
    assert listing(roots["a"]) == {"w1.json"}
    for dest in "bc":
        assert listing(roots[dest]) == {"w1.json", "w1 (1).json", "w1 (2).json"}
        assert json.loads((roots[dest] / "w1.json").read_text()) == {"v": 2}
    s = rep.stats()
    assert s["conflict_copies"] == 4 and s["local_writes"] == 2 and s["pending"] == 0


def test_deletions_travel_from_any_replica(make):
    rep, roots = make(max_delay=0.2)
    for name in ("x.json", "y.json"):
        atomic_write_json(roots["a"] / "d" / name, {})
    assert rep.flush(5)
    (roots["a"] / "d" / "x.json").unlink()
    (roots["c"] / "d" / "y.json").unlink()  # a replica that only received it deletes it
    for root in roots.values():
        wait_for(lambda: listing(root) == set())
    assert rep.flush(5)
    assert rep.stats()["local_deletes"] == 2 and rep.stats()["deletions"] == 4


def test_a_delivery_deleted_before_any_scan_is_a_local_delete(make):
    """A node that removes a file the instant it lands (housekeeping) still deletes it everywhere."""
    rep, roots = make("ab", start=False, min_delay=0.0, max_delay=0.0)
    atomic_write_json(roots["a"] / "x.json", {})
    rep._scan_all()
    while rep._queue:
        rep._run(rep._queue.pop()[2])
    (roots["b"] / "x.json").unlink()
    assert rep.flush(5)
    assert listing(roots["a"]) == set() and rep.stats()["local_deletes"] == 1


def test_hidden_and_temp_files_never_travel(make):
    rep, roots = make(max_delay=0.1)
    (roots["a"] / ".w1.json.tmp-1-abc").write_text("{}")
    (roots["a"] / ".nfs0001").write_text("x")
    (roots["a"] / ".hidden").mkdir()
    (roots["a"] / ".hidden" / "f.json").write_text("{}")
    atomic_write_bytes(roots["a"] / "peers" / "w1.json", b"{}")
    assert rep.flush(5)
    for dest in "bc":
        assert listing(roots[dest]) == {"peers/w1.json"}


def test_excluded_subtrees_stay_local(make):
    rep, roots = make(max_delay=0.1, exclude=("*/checkpoints/*", "*/logs/*"))
    exp = roots["a"] / "experiments" / "t"
    atomic_write_bytes(exp / "checkpoints" / "round_1" / "w1" / "COMPLETE", b"")
    atomic_write_bytes(exp / "logs" / "w1" / "stdout.log", b"hi")
    atomic_write_json(exp / "peers" / "w1.json", {})
    assert rep.flush(5)
    for dest in "bc":
        assert listing(roots[dest]) == {"experiments/t/peers/w1.json"}


def test_flush_delivers_at_once_and_a_local_write_wins(make):
    rep, roots = make("ab", min_delay=30, max_delay=60)
    atomic_write_json(roots["a"] / "s.json", {"v": "a"})
    time.sleep(0.1)
    atomic_write_json(roots["b"] / "s.json", {"v": "b"})  # the later writer
    t0 = time.monotonic()
    assert rep.flush(5) and time.monotonic() - t0 < 2
    for root in roots.values():
        assert json.loads((root / "s.json").read_text()) == {"v": "b"}
    assert rep.stats()["stale_dropped"] == 1 and rep.stats()["pending"] == 0


def test_flush_without_a_thread(make):
    rep, roots = make("ab", start=False)
    atomic_write_json(roots["a"] / "x.json", {})
    assert rep.flush(5) and (roots["b"] / "x.json").exists()


def test_survives_a_storm_of_changes(make):
    """Creates, in-place appends, replaces, deletes and folder removals race the replicator."""
    rep, roots = make(max_delay=0.3, p_missing=0.3, p_conflict=0.2, seed=7)
    deadline = time.monotonic() + 2.0
    i = 0
    while time.monotonic() < deadline:
        for n, root in roots.items():
            atomic_write_json(root / "r" / f"round_{i % 4}" / f"{n}.json", {"i": i})
            with open(root / f"progress_{n}.jsonl", "a") as fh:
                fh.write(f'{{"i": {i}}}\n')
            if i % 7 == 3:
                import shutil
                shutil.rmtree(root / "r" / f"round_{(i + 1) % 4}", ignore_errors=True)
        i += 1
        time.sleep(0.01)
    assert rep._thread is not None and rep._thread.is_alive()
    assert rep.flush(10)
    s = rep.stats()
    assert s["errors"] == 0, s["last_error"]
    assert s["missing_gaps"] > 0 and s["conflict_copies"] > 0 and s["stale_dropped"] >= 0
    real = [{p for p in listing(root) if " (" not in p} for root in roots.values()]
    assert real[0] == real[1] == real[2]
    for p in real[0]:
        assert len({(root / p).read_bytes() for root in roots.values()}) == 1


def test_cli_runs_until_a_signal_and_prints_stats(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    (a / "x.json").write_text("{}")
    proc = subprocess.Popen([sys.executable, str(SCRIPTS / "chaos_lag.py"), "--replica", f"a={a}",
                             "--replica", f"b={b}", "--seed", "2", "--max-delay", "0.1"],
                            stdout=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: (b / "x.json").exists(), timeout=10)
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=10)
    assert proc.returncode == 0
    stats = json.loads(out)
    assert stats["deliveries"] == 1 and stats["errors"] == 0


def test_cli_refuses_bad_replicas(tmp_path):
    res = subprocess.run([sys.executable, str(SCRIPTS / "chaos_lag.py"), "--replica", "nopath"],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "NAME=PATH" in res.stderr
