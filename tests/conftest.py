from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from pathlib import Path

import pytest

from sapod.config import Config, build_config
from sapod.logs import configure_logging



@pytest.fixture(autouse=True)
def _logging_to_this_tests_stdout():
    """Each test logs to its own captured stdout (a CLI test may have pointed it elsewhere)."""
    import sys

    configure_logging("json", "warning", stream=sys.stdout)
    yield

FAST = {"heartbeat_interval": "0.2", "peer_timeout": "2", "poll_interval": "0.1", "gather_timeout": "5",
        "round_timeout": "30", "stop_timeout": "5", "model": "sapod:scripted", "log_level": "warning"}


@pytest.fixture
def make_cfg(tmp_path):
    """Config for an in-process node on a tmp shared folder, fast timings, scripted policy."""

    def make(role: str = "worker", node_id: str = "w1", **over) -> Config:
        flags = {**FAST, "role": role, "node_id": node_id, "shared": str(tmp_path), "experiment": "t",
                 "cache_dir": str(tmp_path / "cache")}
        flags.update({k: str(v) for k, v in over.items()})
        return build_config(flags, {})

    return make


def run_nodes(*nodes, timeout: float = 60.0, stop_after: float | None = None):
    """Run nodes in one loop until all return; results or exceptions in order."""

    async def go():
        tasks = [asyncio.create_task(n.run()) for n in nodes]
        if stop_after is not None:
            await asyncio.sleep(stop_after)
            for n in nodes:
                n.stop.set()
        return await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), timeout)

    return asyncio.run(go())


def write_peer(root: Path, node: str, beat: int, status: str = "running", role: str = "worker") -> None:
    """A heartbeat file as a node of that role and status would write it."""
    from sapod import paths, schema
    from sapod.store import atomic_write_json

    doc = schema.envelope(schema.PEER, node, "inst", 3, 0, 0)
    doc.update(role=role, model="m", host="h", pid=1, version="0", started_at=0.0, beat=beat, phase="train",
               status=status)
    atomic_write_json(paths.peer_file(root, node), doc)


@contextlib.contextmanager
def beating(root: Path, node: str, interval: float = 0.1):
    """A node whose heartbeat counter moves every ``interval`` seconds while the block runs."""
    stop = threading.Event()

    def beat():
        n = 1
        while not stop.is_set():
            n += 1
            write_peer(root, node, n)
            time.sleep(interval)

    write_peer(root, node, 1)
    t = threading.Thread(target=beat)
    t.start()
    try:
        yield
    finally:
        stop.set()
        t.join()


def read_rows(path: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in path.read_text().splitlines()]
