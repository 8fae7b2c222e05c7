"""Running one node as a process: event loop choice, signals, exit codes, and the
cyclic collector once start-up is over.

Signal handlers only set a flag; the node finishes or abandons its current phase
within STOP_TIMEOUT, checkpoints if its model changed, writes a final heartbeat
and returns. A second signal exits at once.
"""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys
from collections.abc import Coroutine
from typing import Any

from sapod.config import Config
from sapod.errors import ConfigError, Displaced, StartupError
from sapod.logs import configure_logging, get_logger

EXIT_OK, EXIT_CRASH, EXIT_USAGE, EXIT_START, EXIT_DISPLACED = 0, 1, 2, 3, 4
# A stop request: systemd's SIGTERM, Ctrl-C's SIGINT, and SIGHUP from a closed terminal
# or `tmux kill-session` (sapod has nothing to reload).
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)

# The cyclic collector's thresholds once start-up is over (CPython's are 700, 10, 10).
# Nearly all of a round's garbage is freed by reference counting; what the collector
# does at the default pace is walk the same surviving objects over and over: with 128
# nodes in one process, 34 ms a round and full collections of 50 ms in mid-round, against
# 7 ms a round and none with these (scripts/bench_coordination.py, 20 rounds). Cyclic
# garbage still goes, a little later; a model's round makes none (generate and
# train_step free every tensor by reference counting: tests/test_hf_policy.py), so no
# GPU memory waits on the collector.
GC_THRESHOLDS = (20_000, 20, 20)


def freeze_startup_heap() -> None:
    """Start-up is over (imports, model, task generators): keep what exists now out of
    the cyclic collector's way for good, and collect what comes after less often (see
    GC_THRESHOLDS). A worker's imports (reasoning-gym, sympy, datasets; torch and
    transformers) leave hundreds of thousands of long-lived objects that every full
    collection would walk again, a pause of over 100 ms each time on a small CPU, in
    the middle of a round."""
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run_loop(main: Coroutine[Any, Any, int]) -> int:
    """uvloop where it is installed, the standard loop otherwise; chosen here only."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(main)
    return uvloop.run(main)


def make_node(cfg: Config, stop: asyncio.Event) -> Any:
    if cfg.role == "coordinator":
        from sapod.coordinator import Coordinator

        return Coordinator(cfg, stop=stop)
    from sapod.worker import Worker

    return Worker(cfg, stop=stop)


async def serve(cfg: Config) -> int:
    log = get_logger()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def on_signal(signum: int) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            log.warning("forced_exit", signal=name)
            try:
                sys.stdout.flush()
            except (OSError, ValueError):  # nobody reads it any more
                pass
            os._exit(EXIT_CRASH)
        stop.set()  # before logging: nothing may come between a signal and the stop
        log.info("stop_requested", signal=name, stop_timeout=cfg.stop_timeout)

    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, on_signal, sig)
    node = make_node(cfg, stop)
    try:
        await node.run()
        return EXIT_OK
    except Displaced as exc:
        log.error("displaced", reason=str(exc))
        return EXIT_DISPLACED
    except StartupError as exc:
        log.error("startup_failed", reason=str(exc))
        return EXIT_START
    except ConfigError as exc:  # a setting found bad only once running (e.g. TASKS, checked by the coordinator)
        log.error("bad_setting", reason=str(exc))
        return EXIT_USAGE
    except Exception:
        log.exception("crashed")
        return EXIT_CRASH
    finally:
        for sig in STOP_SIGNALS:
            loop.remove_signal_handler(sig)


def run_node(cfg: Config) -> int:
    from sapod import paths
    from sapod.executor import busy
    from sapod.sharedlog import capture_to_shared, release

    # Only into a shared folder that is there: never create one under an unmounted mount point.
    shared_logs = (capture_to_shared(paths.logs_dir(cfg.root, cfg.node_id), int(cfg.log_file_max_mb * 2**20))
                   if cfg.log_to_shared and cfg.shared.is_dir() else [])
    if cfg.failpoints:
        from sapod import failpoints

        failpoints.configure(cfg.failpoints)
    try:
        configure_logging(cfg.log_format, cfg.log_level)
        code = run_loop(serve(cfg))
    finally:
        release(shared_logs)
    if busy():
        # The GPU thread is stuck past STOP_TIMEOUT: leave at once rather than finalize the
        # interpreter (and unload CUDA) under a call still running.
        sys.stdout.flush()
        os._exit(code)
    return code
