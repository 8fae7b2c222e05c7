"""Paths, atomic publish and suspicious reads of the shared folder."""

from __future__ import annotations

import os
import threading

import pytest

from sapod import paths
from sapod.errors import Rejected
from sapod.store import READ_CONCURRENCY, atomic_write_json, list_node_files, read_each, read_json, valid_node_id


def test_paths_follow_the_contract(tmp_path):
    """Every path matches DESIGN.md section 3."""
    root = paths.experiment_root(tmp_path, "exp")
    assert root == tmp_path / "experiments" / "exp"
    assert paths.state_file(root) == root / "state" / "current_state.json"
    assert paths.peer_file(root, "w1") == root / "peers" / "w1.json"
    assert paths.rollout_file(root, 3, 0, "w1") == root / "rollouts" / "round_3" / "stage_0" / "w1.json"
    assert paths.reward_file(root, 3, 0, "w1") == root / "rewards" / "round_3" / "stage_0" / "w1.json"
    assert paths.checkpoint_dir(root, 3, "w1") == root / "checkpoints" / "round_3" / "w1"
    assert paths.metrics_file(root, "w1") == root / "logs" / "w1" / "metrics.jsonl"
    assert paths.progress_file(root, "w1") == root / "progress_w1.jsonl"


def test_atomic_write_leaves_no_temp_files(tmp_path):
    """A publish leaves exactly the final file, whole."""
    target = tmp_path / "a" / "w1.json"
    atomic_write_json(target, {"x": 1})
    atomic_write_json(target, {"x": 2})
    assert os.listdir(target.parent) == ["w1.json"]
    assert read_json(target) == {"x": 2}


def test_atomic_write_refuses_nan(tmp_path):
    """NaN never reaches the shared folder."""
    with pytest.raises(ValueError):
        atomic_write_json(tmp_path / "x.json", {"x": float("nan")})
    assert not list(tmp_path.iterdir())


def test_missing_file_is_not_there(tmp_path):
    """A missing file reads as None, not an error."""
    assert read_json(tmp_path / "nope.json") is None


@pytest.mark.parametrize("content,reason", [
    (b'{"a": 1', "not valid JSON"),
    (b"", "empty file"),
    (b"[1, 2]", "expected a JSON object"),
    (b'{"a": NaN}', "not valid JSON"),
    (b'{"a": Infinity}', "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_bad_content_is_rejected_with_reason(tmp_path, content, reason):
    """Torn, empty, non-object, non-finite or non-UTF-8 files are rejected with a reason."""
    f = tmp_path / "w1.json"
    f.write_bytes(content)
    with pytest.raises(Rejected, match=reason):
        read_json(f)


def test_size_cap_checked_before_reading(tmp_path):
    """A file over its cap is rejected without being parsed."""
    f = tmp_path / "big.json"
    f.write_bytes(b'{"a": "' + b"x" * 5000 + b'"}')
    with pytest.raises(Rejected, match="too large"):
        read_json(f, max_bytes=1000)


def test_symlink_is_not_followed(tmp_path):
    """A symlink pointing out of the folder is not read."""
    secret = tmp_path / "secret.json"
    secret.write_text('{"x": 1}')
    link = tmp_path / "peers" / "w1.json"
    link.parent.mkdir()
    link.symlink_to(secret)
    with pytest.raises(Rejected):
        read_json(link)
    assert list_node_files(link.parent) == {}


def test_listing_matches_names_strictly(tmp_path):
    """Only exact {node_id}.json names count: conflict copies, temp and .nfs files are ignored."""
    for name in ("w1.json", "w1 (1).json", ".w1.json.tmp-1-abc", ".nfs000123", "w2.json.tmp", "node.b.json",
                 "-bad.json", "w3.JSON"):
        (tmp_path / name).write_text("{}")
    (tmp_path / "dir.json").mkdir()
    assert sorted(list_node_files(tmp_path)) == ["node.b", "w1"]
    assert list_node_files(tmp_path / "missing") == {}


@pytest.mark.parametrize("node_id,ok", [
    ("w1", True), ("node-01.gpu_a", True), ("a" * 64, True), ("a" * 65, False), ("../x", False),
    ("a/b", False), ("", False), (".hidden", False), ("w 1", False), ("x.json", False),
])
def test_node_id_rule(node_id, ok):
    """node_id matches [A-Za-z0-9][A-Za-z0-9_.-]{0,63}."""
    assert valid_node_id(node_id) is ok


def test_write_once_cache_reads_each_file_once_but_retries_rejections(tmp_path):
    """Parsed files are read once per (path, inode); a file rejected (still syncing in place) is read again."""
    from sapod.errors import Rejected
    from sapod.store import WriteOnceCache, list_node_entries, read_json_sized

    cache = WriteOnceCache()
    loads = []

    def load(p):
        loads.append(p)
        try:
            return read_json_sized(p)
        except Rejected as exc:
            return exc, 0

    good = tmp_path / "w1.json"
    atomic_write_json(good, {"x": 1})
    torn = tmp_path / "w2.json"
    torn.write_text('{"x": ')
    entries = list_node_entries(tmp_path)
    assert cache.get(*entries["w1"], load) == {"x": 1}
    assert cache.get(*entries["w1"], load) == {"x": 1}
    with pytest.raises(Rejected):
        cache.get(*entries["w2"], load)
    with open(torn, "r+") as fh:  # completed in place: same inode
        fh.write('{"x": 2}')
    assert cache.get(*list_node_entries(tmp_path)["w2"], load) == {"x": 2}
    assert loads.count(str(good)) == 1 and loads.count(str(torn)) == 2


def test_write_once_cache_keeps_only_the_newest_folders_and_its_byte_bound(tmp_path):
    """Only the files of the newest max_folders folders stay parsed (a long run does not
    keep every round's), a forgotten file is read again when asked for, and the byte
    bound still holds within those folders."""
    from sapod.store import WriteOnceCache, list_node_entries, read_json_sized

    cache = WriteOnceCache(max_folders=2)
    loads: list[str] = []

    def load(p):
        loads.append(p)
        return read_json_sized(p)

    rounds = []
    for r in range(4):
        folder = tmp_path / f"round_{r}"
        for node in ("w1", "w2"):
            atomic_write_json(folder / f"{node}.json", {"round": r, "node": node})
        rounds.append(list_node_entries(folder))
    for r, entries in enumerate(rounds):
        for node in ("w1", "w2"):
            assert cache.get(*entries[node], load) == {"round": r, "node": node}
    assert len(cache) == 4 and len(loads) == 8
    for r in (2, 3):  # the newest two folders: no new read
        assert cache.get(*rounds[r]["w1"], load) == {"round": r, "node": "w1"}
    assert len(loads) == 8
    assert cache.get(*rounds[0]["w2"], load) == {"round": 0, "node": "w2"}  # forgotten: read again
    assert len(loads) == 9 and len(cache) == 3  # round_0 is the newest folder now, round_2 went

    size = (tmp_path / "round_3" / "w1.json").stat().st_size
    small = WriteOnceCache(max_bytes=size, max_folders=8)
    for node in ("w1", "w2"):
        small.get(*rounds[3][node], load)
    assert len(small) == 1


def test_state_reader_trusts_stat_only_on_local_disks(tmp_path):
    """On a local disk an unchanged state file costs one stat; elsewhere every read opens the file."""
    from sapod import schema
    from sapod.state import StateReader
    from sapod.store import IO

    atomic_write_json(paths.state_file(tmp_path), schema.state_doc(schema.State(1, 0, 1, 1, "open", 0.0, "c", "i")))
    for trust, reads in ((True, 1), (False, 3)):
        reader = StateReader(tmp_path, trust_stat=trust)
        before = IO["reads"]
        for _ in range(3):
            assert reader.read().round == 1
        assert IO["reads"] - before == reads


def test_writes_and_appends_make_missing_folders(tmp_path):
    """A publish or an append into a folder that is not there yet creates it (and only then)."""
    from sapod.logs import append_jsonl

    atomic_write_json(tmp_path / "a" / "b" / "w1.json", {"x": 1})
    assert read_json(tmp_path / "a" / "b" / "w1.json") == {"x": 1}
    assert append_jsonl(tmp_path / "logs" / "w1" / "events.jsonl", [{"n": 1}, {"n": 2}])
    assert append_jsonl(tmp_path / "logs" / "w1" / "events.jsonl", [{"n": 3}])
    assert (tmp_path / "logs" / "w1" / "events.jsonl").read_text() == '{"n":1}\n{"n":2}\n{"n":3}\n'
    assert [p.name for p in (tmp_path / "a" / "b").iterdir()] == ["w1.json"]  # no temp file left


def test_records_that_fail_to_append_wait_for_the_next_flush_in_order(tmp_path):
    """Rows whose append fails stay held, ahead of rows added while it was being tried
    (a node's flush runs on the records thread); the next flush that works writes them
    all, in order."""
    from sapod.logs import RecordBuffer, write_records

    (tmp_path / "logs").write_text("a file where the folder should be")
    path = tmp_path / "logs" / "w1" / "events.jsonl"
    records = RecordBuffer()
    records.add(path, {"n": 1})
    records.add(path, {"n": 2})
    handed = records.take()
    records.add(path, {"n": 3})  # added while the append is in flight
    records.restore(write_records(handed))
    (tmp_path / "logs").unlink()
    records.flush()
    assert path.read_text() == '{"n":1}\n{"n":2}\n{"n":3}\n'
    records.flush()  # nothing pending: nothing written twice
    assert path.read_text().count("\n") == 3


def test_a_node_appends_its_records_in_the_background_in_order(make_cfg, tmp_path, monkeypatch):
    """flush_records returns before the append is made; while one batch is being written,
    what is added goes with the next one (no queue of appends), in order; records_written
    waits for all of it."""
    import asyncio

    from sapod import logs, node as node_module
    from sapod.worker import Worker

    w = Worker(make_cfg())
    path = tmp_path / "logs" / "w1" / "events.jsonl"
    gate, batches = threading.Event(), []

    def slow_write(pending):  # a folder that takes its time (on the records thread)
        gate.wait(10)
        batches.append([row["n"] for rows in pending.values() for row in rows])
        return logs.write_records(pending)

    monkeypatch.setattr(node_module, "write_records", slow_write)

    async def go() -> str:
        for n in range(5):
            w.records.add(path, {"n": n})
            w.flush_records()
            await asyncio.sleep(0.01)
        written_meanwhile = path.read_text() if path.exists() else ""
        gate.set()
        await w.records_written()
        return written_meanwhile

    assert asyncio.run(go()) == ""  # the node went on while the first batch waited
    assert batches == [[0], [1, 2, 3, 4]]
    assert path.read_text() == "".join(f'{{"n":{n}}}\n' for n in range(5))


def test_temp_names_do_not_repeat():
    """Temp names come from a counter, not the kernel's random source: still distinct."""
    from sapod.store import _temp_tag

    tags = [_temp_tag() for _ in range(100_000)]
    assert len(set(tags)) == len(tags) and all(len(t) == 8 for t in tags)


def test_reads_take_the_whole_file_whatever_its_size_said(tmp_path):
    """A file that grew after its size was taken is read to its end, up to the limit."""
    from sapod.store import _read_at_most

    blob = os.urandom(200_000)
    (tmp_path / "f").write_bytes(blob)
    fd = os.open(tmp_path / "f", os.O_RDONLY)
    try:
        assert _read_at_most(fd, 10**6, size_hint=10) == blob
        os.lseek(fd, 0, os.SEEK_SET)
        assert _read_at_most(fd, 70_001, size_hint=0) == blob[:70_001]
    finally:
        os.close(fd)


def test_read_each_reads_several_at_once_in_order_or_one_by_one_here():
    """Concurrent: READ_CONCURRENCY calls are in flight together (the barrier opens only
    then), results come back in order and the first error is raised. Otherwise every call
    runs in the calling thread, one after another."""
    barrier = threading.Barrier(READ_CONCURRENCY, timeout=30)

    def together(x: int) -> int:
        barrier.wait()
        return 2 * x

    items = list(range(2 * READ_CONCURRENCY))
    assert read_each(together, items, concurrent=True) == [2 * x for x in items]

    def failing(x: int) -> int:
        if x == 3:
            raise OSError(5, "Input/output error")
        return x

    with pytest.raises(OSError):
        read_each(failing, items, concurrent=True)
    here = threading.current_thread()
    assert read_each(lambda x: threading.current_thread() is here, items, concurrent=False) == [True] * len(items)


def test_an_ignored_entry_that_stays_is_logged_once_however_many_come_and_go(tmp_path, monkeypatch):
    """The log-once memory of ignored entries is bounded; a stray that stays in a folder
    listed every round (a conflict copy in peers/) is not logged again because many
    short-lived strays were seen since."""
    import io
    import json
    import sys

    from sapod import store
    from sapod.logs import configure_logging

    monkeypatch.setattr(store, "_IGNORED", store.OrderedDict())
    monkeypatch.setattr(store, "_IGNORED_MAX", 4)
    peers, rounds = tmp_path / "peers", tmp_path / "rounds"
    peers.mkdir()
    rounds.mkdir()
    (peers / "w1 (1).json").write_text("{}")
    out = io.StringIO()
    configure_logging("json", "info", stream=out)
    try:
        for i in range(12):
            list_node_files(peers)
            stray = rounds / f"stray-{i}.txt"
            stray.write_text("")
            list_node_files(rounds)
            stray.unlink()
    finally:
        configure_logging("json", "warning", stream=sys.stdout)
    about = [e for e in map(json.loads, out.getvalue().splitlines()) if e["event"] == "entry_ignored"]
    assert [e["path"] for e in about].count(str(peers / "w1 (1).json")) == 1
    assert len(about) == 13
