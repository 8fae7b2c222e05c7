"""systemd integration: the notify protocol over a real datagram socket, and the unit files."""

from __future__ import annotations

import configparser
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from sapod.config import BY_FIELD
from sapod.sdnotify import Notifier

UNIT = Path(__file__).resolve().parent.parent / "systemd" / "sapod@.service"


def datagram_socket(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(path))
    sock.settimeout(30)
    return sock


def test_notifier_sends_key_value_datagrams(tmp_path):
    """Notifier sends READY/STATUS/WATCHDOG/STOPPING as one datagram each, to a path or an abstract name."""
    sock = datagram_socket(tmp_path / "notify")
    n = Notifier(str(tmp_path / "notify"))
    n.ready("up")
    n.status("round 3")
    n.watchdog()
    n.stopping()
    got = [sock.recv(4096).decode() for _ in range(4)]
    assert got == ["READY=1\nSTATUS=up", "STATUS=round 3", "WATCHDOG=1", "STOPPING=1"]
    abstract = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"sapod-test-{os.getpid()}"
    abstract.bind("\0" + name)
    assert Notifier("@" + name).watchdog()
    assert abstract.recv(64) == b"WATCHDOG=1"
    assert Notifier(None).ready("x") is False  # outside systemd: nothing sent, nothing raised
    assert Notifier(str(tmp_path / "gone")).status("x") is False


def test_full_notify_queue_drops_instead_of_blocking(tmp_path):
    """A receiver that stops reading makes sends fail fast; the event loop is never blocked."""
    sock = datagram_socket(tmp_path / "notify")
    n = Notifier(str(tmp_path / "notify"))
    t0 = time.monotonic()
    results = [n.watchdog() for _ in range(2000)]
    assert time.monotonic() - t0 < 5
    assert results[0] is True and results[-1] is False
    sock.close()


def test_real_worker_notifies_in_order(tmp_path):
    """A worker process says READY=1 first, STATUS= per phase, WATCHDOG=1 from its loop, and STOPPING=1 last."""
    sock = datagram_socket(tmp_path / "notify")
    messages: list[str] = []
    done = threading.Event()

    def drain():  # as systemd does: read every datagram as it comes
        sock.settimeout(0.2)
        while not done.is_set():
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue

    reader = threading.Thread(target=drain)
    reader.start()
    shared = tmp_path / "shared"
    shared.mkdir()
    env = {**os.environ, "GDRIVE_PATH": str(shared), "MODEL_NAME": "sapod:scripted", "MAX_ROUNDS": "2",
           "HEARTBEAT_INTERVAL": "0.2", "PEER_TIMEOUT": "5", "POLL_INTERVAL": "0.1", "LOG_FORMAT": "json"}
    coord = subprocess.Popen([sys.executable, "-m", "sapod", "--role", "coordinator", "--node-id", "c"], env=env,
                             stdout=subprocess.DEVNULL)
    worker = subprocess.Popen([sys.executable, "-m", "sapod", "--role", "worker", "--node-id", "w"],
                              env={**env, "NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"},
                              stdout=subprocess.DEVNULL)
    try:
        assert worker.wait(60) == 0 and coord.wait(60) == 0
    finally:
        worker.kill()
        coord.kill()
        time.sleep(0.5)
        done.set()
        reader.join()
    assert messages[0].startswith("READY=1\nSTATUS=worker w:")
    statuses = [m[len("STATUS="):] for m in messages if m.startswith("STATUS=")]
    phases = [s.split(": ")[1].split(",")[0] for s in statuses]
    assert phases[:3] == ["register", "await_stage", "generate"]
    assert "train" in phases and phases[-1] == "finished"
    assert "round 1" in statuses[-1]
    assert "WATCHDOG=1" in messages
    assert messages[-1] == "STOPPING=1"


def unit_sections() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(UNIT)
    return parser


def test_no_watchdog_ping_follows_stopping(make_cfg):
    """A node's shutdown says STOPPING=1 and then never WATCHDOG=1, even with its
    watchdog loop due to ping at every turn of the event loop: a ping after STOPPING=1
    would tell systemd the service runs again."""
    import asyncio
    from dataclasses import replace

    from sapod.worker import Worker

    class Recorder(Notifier):
        def __init__(self):
            super().__init__(None)
            self.sent: list[str] = []

        def send(self, *lines: str) -> bool:
            self.sent.append("\n".join(lines))
            return True

    async def go() -> list[str]:
        node = Worker(make_cfg("worker", "w1"))
        node.cfg = replace(node.cfg, watchdog_usec=0)  # the loop pings, then sleep(0): at every turn
        node.notifier = Recorder()
        node._hb_task = asyncio.create_task(node._heartbeat_loop())
        node._wd_task = asyncio.create_task(node._watchdog_loop())
        await asyncio.sleep(0.05)
        await node.shutdown()
        return node.notifier.sent

    sent = asyncio.run(go())
    assert "WATCHDOG=1" in sent
    assert sent[sent.index("STOPPING=1"):] == ["STOPPING=1"], sent[-5:]


def test_unit_supervises_as_documented():
    """The unit is Type=notify with a watchdog, restarts on failure but not after exit 2 or 4, stops gracefully."""
    service = unit_sections()["Service"]
    assert service["Type"] == "notify" and int(service["WatchdogSec"]) > 0
    assert service["Restart"] == "on-failure"
    assert set(service["RestartPreventExitStatus"].split()) == {"2", "4"}
    assert int(service["TimeoutStopSec"]) > BY_FIELD["stop_timeout"].default
    assert service["EnvironmentFile"] == "/etc/sapod/%i.env"
    assert service["NoNewPrivileges"] == "yes" and service["ProtectSystem"] == "strict"
    assert "/var/lib/sapod" in service["ReadWritePaths"]


def test_example_env_files_are_valid_configs(tmp_path):
    """Each example env file builds a valid sapod config."""
    from sapod.config import build_config

    for name in ("worker.env.example", "coordinator.env.example"):
        env = {}
        for line in (UNIT.parent / name).read_text().splitlines():
            if line.strip() and not line.startswith("#"):
                key, _, value = line.partition("=")
                env[key] = value
        env["GDRIVE_PATH"] = str(tmp_path)
        cfg = build_config({"node_id": "n1"}, env)
        assert cfg.role == env["NODE_ROLE"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify(tmp_path):
    """systemd-analyze verify accepts the unit (with ExecStart pointed at this sapod) without a warning."""
    sapod = shutil.which("sapod") or str(Path(sys.executable).parent / "sapod")
    unit = tmp_path / "sapod@.service"
    unit.write_text(UNIT.read_text().replace("/opt/sapod/venv/bin/sapod", sapod))
    res = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "sapod@w1.service")], capture_output=True,
                         text=True)
    assert res.returncode == 0 and not (res.stdout + res.stderr).strip(), res.stdout + res.stderr
