"""The ``sapod`` command: run a node (default), ``demo``, ``check``."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from sapod import __version__
from sapod.config import add_arguments, build_config
from sapod.errors import ConfigError

COMMANDS = ("run", "demo", "check", "status", "report", "doctor", "experiment")
# Commands that live in their own module: name -> (module, function taking argv, returning an exit code).
EXTERNAL = {"demo": ("sapod.demo", "demo_main"), "status": ("sapod.status", "status_main"),
            "report": ("sapod.report", "report_main"), "doctor": ("sapod.doctor", "doctor_main"),
            "experiment": ("sapod.experiment", "experiment_main")}

EPILOG = """commands:
  sapod [run] --role worker|coordinator ...   run one node (the default command)
  sapod demo [--workers N] [--rounds R]        a coordinator and N workers on a temporary folder
  sapod check --node-id ID                     exit 0 if that node's heartbeat is moving, 1 if not
  sapod status [--watch] [--json]              one row per node: round, phase, liveness, reward, ETA
  sapod report EXPERIMENT... [--out DIR]       reward plots and a comparison table (needs sapod[plot])
  sapod doctor --shared PATH                   check a folder before a swarm uses it
  sapod experiment --configs I/J,I/J --seeds N one swarm per I/J split and seed, then the table vs J=0

exit codes: 0 finished or stopped cleanly, 1 crash, 2 bad usage or config,
3 failed to start, 4 displaced (NODE_ID taken or a newer coordinator took over)"""


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description, epilog=EPILOG,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def _run(argv: Sequence[str]) -> int:
    parser = _parser("sapod", "Run one SAPO swarm node (coordinator or worker) over a shared folder.")
    parser.add_argument("-V", "--version", action="version", version=f"sapod {__version__}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    cfg = build_config(vars(args))
    from sapod.daemon import run_node

    return run_node(cfg)


def _check(argv: Sequence[str]) -> int:
    parser = _parser("sapod check", "Health probe for one node: exit 0 if its heartbeat moves, 1 if not.")
    add_arguments(parser, only=("shared", "experiment", "node_id", "role", "heartbeat_interval"))
    args = parser.parse_args(argv)
    cfg = build_config(vars(args))
    from sapod.health import check_node

    ok, reason = check_node(cfg)
    print(("healthy: " if ok else "unhealthy: ") + reason)
    return 0 if ok else 1


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "run"
    try:
        if command in EXTERNAL:
            import importlib

            module, function = EXTERNAL[command]
            return getattr(importlib.import_module(module), function)(argv)
        if command == "check":
            return _check(argv)
        return _run(argv)
    except ConfigError as exc:
        print(f"sapod: error: {exc}", file=sys.stderr)
        return 2


def entry() -> None:
    sys.exit(main())


if __name__ == "__main__":
    entry()
