"""Configuration: one frozen dataclass, built here from flags and the environment.

Every option has a flag and an environment variable (the original RL Swarm names
where one existed). Flags win over the environment, the environment over defaults.
``os.environ`` is read nowhere else in sapod.
"""

from __future__ import annotations

import argparse
import os
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from sapod.errors import ConfigError
from sapod.store import valid_node_id


@dataclass(frozen=True)
class Option:
    field: str
    env: str
    default: Any
    help: str
    kind: Callable[[str], Any] = str
    allowed: str = ""  # shown in errors: what values are allowed
    check: Callable[[Any], bool] | None = None

    @property
    def flag(self) -> str:
        return "--" + self.field.replace("_", "-")


def _pos_int(v: int) -> bool:
    return v >= 1


def _choice(*names: str) -> Callable[[Any], bool]:
    return lambda v: v in names


def _bool(text: str) -> bool:
    low = text.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(text)


def _auto_bool(text: str) -> bool | str:
    return "auto" if text.strip().lower() == "auto" else _bool(text)


OPTIONS: tuple[Option, ...] = (
    Option("role", "NODE_ROLE", "worker", "node role", allowed="worker or coordinator",
           check=_choice("worker", "coordinator")),
    Option("shared", "GDRIVE_PATH", None, "shared folder every node sees (Drive, NFS, gcsfuse, local)",
           kind=Path, allowed="a folder path"),
    Option("experiment", "EXPERIMENT_NAME", "sapod", "experiment name (a folder under experiments/)",
           allowed="letters, digits, '_', '.', '-' (max 64)", check=valid_node_id),
    Option("node_id", "NODE_ID", None, "this node's id; default {host}-{role}",
           allowed="letters, digits, '_', '.', '-' (max 64, starting with a letter or digit)",
           check=valid_node_id),
    Option("model", "MODEL_NAME", "sapod:tiny", "sapod:tiny, sapod:scripted, a hub id or a local model folder"),
    Option("seed", "SEED", 42, "base seed; per-node and per-round seeds derive from it", kind=int,
           allowed="an integer >= 0", check=lambda v: v >= 0),
    Option("num_train_samples", "NUM_TRAIN_SAMPLES", 2, "I: own questions per round", kind=int,
           allowed="an integer >= 1", check=_pos_int),
    Option("num_transplant_trees", "NUM_TRANSPLANT_TREES", 2, "J: external question-groups per round (0 = plain GRPO)",
           kind=int, allowed="an integer >= 0", check=lambda v: v >= 0),
    Option("num_generations", "NUM_GENERATIONS", 4, "G: completions per question", kind=int,
           allowed="an integer >= 2", check=lambda v: v >= 2),
    Option("max_rounds", "MAX_ROUNDS", 100, "rounds before the experiment finishes", kind=int,
           allowed="an integer >= 1", check=_pos_int),
    Option("max_stages", "MAX_STAGES", 1, "stages per round (reasoning-gym SAPO has one)", kind=int,
           allowed="1 (reasoning-gym SAPO has one stage per round)", check=lambda v: v == 1),
    Option("rollout_publish_frequency", "ROLLOUT_PUBLISH_FREQUENCY", "stage",
           "when rollouts are published; with one stage per round both mean once a round",
           allowed="stage or round", check=_choice("stage", "round")),
    Option("checkpoint_interval", "CHECKPOINT_INTERVAL", 10, "checkpoint every N rounds (and on stop and at the end)",
           kind=int, allowed="an integer >= 1", check=_pos_int),
    Option("checkpoint_keep", "CHECKPOINT_KEEP", 2, "complete checkpoints kept per node", kind=int,
           allowed="an integer >= 1", check=_pos_int),
    Option("max_new_tokens", "MAX_NEW_TOKENS", 256, "tokens generated per completion at most", kind=int,
           allowed="an integer >= 1", check=_pos_int),
    Option("learning_rate", "LEARNING_RATE", 5e-6, "Adam learning rate", kind=float,
           allowed="a number > 0", check=lambda v: 0 < v < 1),
    Option("temperature", "TEMPERATURE", 1.0, "sampling temperature", kind=float,
           allowed="a number > 0", check=lambda v: 0 < v <= 10),
    Option("heartbeat_interval", "HEARTBEAT_INTERVAL", 5.0, "seconds between heartbeats", kind=float,
           allowed="a number > 0", check=lambda v: v > 0),
    Option("peer_timeout", "PEER_TIMEOUT", 60.0, "a peer whose heartbeat has not moved this long is dead", kind=float,
           allowed="a number > 0", check=lambda v: v > 0),
    Option("gather_timeout", "GATHER_TIMEOUT", 120.0, "seconds a worker waits for live peers' rollouts",
           kind=float, allowed="a number >= 0", check=lambda v: v >= 0),
    Option("round_timeout", "ROUND_TIMEOUT", 900.0, "seconds after which a round advances with any submission",
           kind=float, allowed="a number > 0", check=lambda v: v > 0),
    Option("poll_interval", "POLL_INTERVAL", 2.0, "seconds between rescans of the shared folder", kind=float,
           allowed="a number > 0", check=lambda v: v > 0),
    Option("watch_mode", "WATCH_MODE", "auto", "file events: auto picks poll on network/FUSE mounts",
           allowed="auto, inotify or poll", check=_choice("auto", "inotify", "poll")),
    Option("stop_timeout", "STOP_TIMEOUT", 60.0, "seconds a stop waits for the current phase", kind=float,
           allowed="a number >= 0", check=lambda v: v >= 0),
    Option("log_format", "LOG_FORMAT", "auto", "auto: JSON when stdout is not a terminal",
           allowed="auto, json or console", check=_choice("auto", "json", "console")),
    Option("log_level", "LOG_LEVEL", "info", "log level", kind=lambda s: s.lower(),
           allowed="debug, info, warning or error", check=_choice("debug", "info", "warning", "error")),
    Option("tasks", "TASKS", "", "reasoning-gym task names (comma-separated), a task mix (easy), or a "
           "jsonl/parquet/csv file; empty = the paper's nine tasks"),
    Option("device", "DEVICE", "auto", "torch device for workers", allowed="auto, cpu, cuda or cuda:N",
           check=lambda v: v in ("auto", "cpu", "cuda") or (v.startswith("cuda:") and v[5:].isdigit())),
    Option("compile_generation", "COMPILE_GENERATION", "auto",
           "decode with a static KV cache, compiled with CUDA graphs (the first round at each prompt length "
           "compiles); auto: on CUDA", kind=_auto_bool, allowed="auto, true or false"),
    Option("cache_dir", "SAPOD_CACHE", None, "where sapod:tiny is built and cached; default ~/.cache/sapod",
           kind=Path, allowed="a folder path"),
    Option("rollout_cleanup_enabled", "ROLLOUT_CLEANUP_ENABLED", False,
           "coordinator removes rollouts/rewards of old rounds", kind=_bool, allowed="true or false"),
    Option("rollout_keep_last_n_rounds", "ROLLOUT_KEEP_LAST_N_ROUNDS", 10, "rounds kept when cleanup is on",
           kind=int, allowed="an integer >= 2", check=lambda v: v >= 2),
    Option("rollout_archive_old", "ROLLOUT_ARCHIVE_OLD", False,
           "pack old rounds into archives/ (one .tar.gz per round) before removing them", kind=_bool,
           allowed="true or false"),
    Option("log_to_shared", "LOG_TO_SHARED", True, "copy stdout/stderr to logs/{node}/stdout.log and stderr.log",
           kind=_bool, allowed="true or false"),
    Option("log_file_max_mb", "LOG_FILE_MAX_MB", 10.0, "size cap of each shared log file (one older copy kept)",
           kind=float, allowed="a number from 0.01 to 1000000", check=lambda v: 0.01 <= v <= 1e6),
)

# Facts the service manager puts in the environment; no flags.
ENV_FACTS = {"notify_socket": "NOTIFY_SOCKET", "watchdog_usec": "WATCHDOG_USEC",
             # Fault injection for the chaos harness (sapod/failpoints.py); never set in production.
             "failpoints": "SAPOD_FAILPOINTS"}

BY_FIELD = {o.field: o for o in OPTIONS}


@dataclass(frozen=True)
class Config:
    role: str
    shared: Path
    experiment: str
    node_id: str
    model: str
    seed: int
    num_train_samples: int
    num_transplant_trees: int
    num_generations: int
    max_rounds: int
    max_stages: int
    rollout_publish_frequency: str
    checkpoint_interval: int
    checkpoint_keep: int
    max_new_tokens: int
    learning_rate: float
    temperature: float
    heartbeat_interval: float
    peer_timeout: float
    gather_timeout: float
    round_timeout: float
    poll_interval: float
    watch_mode: str
    stop_timeout: float
    log_format: str
    log_level: str
    tasks: str
    device: str
    compile_generation: bool | str  # True, False or "auto"
    cache_dir: Path
    rollout_cleanup_enabled: bool
    rollout_keep_last_n_rounds: int
    rollout_archive_old: bool
    log_to_shared: bool
    log_file_max_mb: float
    notify_socket: str | None = None  # systemd Type=notify
    watchdog_usec: int = 0  # systemd WatchdogSec, in microseconds
    failpoints: str = ""

    @property
    def root(self) -> Path:
        from sapod.paths import experiment_root

        return experiment_root(self.shared, self.experiment)

    def with_(self, **changes: Any) -> Config:
        return replace(self, **changes)

    def settings(self) -> dict[str, Any]:
        """The swarm-wide settings the coordinator records in experiment.json."""
        keys = ("num_train_samples", "num_transplant_trees", "num_generations", "max_rounds", "max_stages",
                "seed", "tasks", "max_new_tokens", "rollout_publish_frequency")
        return {k: getattr(self, k) for k in keys}


def add_arguments(parser: argparse.ArgumentParser, only: tuple[str, ...] | None = None,
                  defaults: Mapping[str, Any] | None = None) -> None:
    """One flag per option; the help shows its variable and default."""
    defaults = defaults or {}
    for opt in OPTIONS:
        if only is not None and opt.field not in only:
            continue
        default = defaults.get(opt.field, opt.default)
        shown = "required" if default is None and opt.field == "shared" else default
        if isinstance(shown, bool):
            shown = str(shown).lower()
        if opt.field == "node_id" and default is None:
            shown = "{host}-{role}"
        parser.add_argument(opt.flag, dest=opt.field, default=None, metavar=opt.env,
                            help=f"{opt.help} [env {opt.env}; default: {shown}]")


def _convert(opt: Option, raw: Any, source: str) -> Any:
    where = opt.env if source == "env" else f"{opt.flag} ({opt.env})"
    try:
        value = opt.kind(raw) if isinstance(raw, str) else raw
    except (ValueError, TypeError):
        raise ConfigError(f"{where}={raw!r} is not allowed: must be {opt.allowed or 'a valid value'}") from None
    if opt.check is not None and not opt.check(value):
        raise ConfigError(f"{where}={raw!r} is not allowed: must be {opt.allowed}")
    return value


def recorded_settings(recorded: Mapping[str, Any], keys: Iterable[str]) -> dict[str, Any]:
    """Those of ``keys`` that a record of settings (experiment.json) holds, each held to its
    option's rules, its type and allowed values: ConfigError names the first that breaks
    them (a hand edit, another version's coordinator), rather than a crash rounds later."""
    out = {}
    for key in keys:
        if key not in recorded:
            continue
        opt, value = BY_FIELD[key], recorded[key]
        kind = opt.kind if isinstance(opt.kind, type) else None
        if kind is float and type(value) is int:
            value = float(value)
        try:
            ok = kind is None or (isinstance(value, kind) and isinstance(value, bool) == (kind is bool))
            ok = ok and (opt.check is None or bool(opt.check(value)))
        except (TypeError, ValueError):
            ok = False
        if not ok:
            must = opt.allowed or (kind.__name__ if kind is not None else "a valid value")
            raise ConfigError(f"settings.{key}={value!r} is not allowed: must be {must}")
        out[key] = value
    return out


def build_config(flags: Mapping[str, Any], environ: Mapping[str, str] | None = None,
                 defaults: Mapping[str, Any] | None = None) -> Config:
    """Flags (None = not given) win over the environment, which wins over defaults."""
    environ = os.environ if environ is None else environ
    defaults = defaults or {}
    values: dict[str, Any] = {}
    for opt in OPTIONS:
        if flags.get(opt.field) is not None:
            values[opt.field] = _convert(opt, flags[opt.field], "flag")
        elif environ.get(opt.env, "") != "":
            values[opt.field] = _convert(opt, environ[opt.env], "env")
        else:
            values[opt.field] = defaults.get(opt.field, opt.default)
    if values["shared"] is None:
        raise ConfigError("GDRIVE_PATH is not set: give --shared DIR or set GDRIVE_PATH to the shared folder")
    if values["node_id"] is None:
        host = "".join(c if c.isalnum() or c in "_.-" else "-" for c in socket.gethostname()) or "node"
        values["node_id"] = f"{host}-{values['role']}"[:64]
    if values["cache_dir"] is None:
        xdg = environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        values["cache_dir"] = Path(xdg) / "sapod"
    if values["peer_timeout"] <= 2 * values["heartbeat_interval"]:
        raise ConfigError(
            f"PEER_TIMEOUT={values['peer_timeout']} is not allowed: must exceed twice "
            f"HEARTBEAT_INTERVAL={values['heartbeat_interval']}")
    values["shared"] = Path(values["shared"]).expanduser()
    values["notify_socket"] = environ.get(ENV_FACTS["notify_socket"]) or None
    try:
        values["watchdog_usec"] = int(environ.get(ENV_FACTS["watchdog_usec"], "0") or 0)
    except ValueError:
        values["watchdog_usec"] = 0  # set by systemd; a garbled value just turns the watchdog off
    values["failpoints"] = environ.get(ENV_FACTS["failpoints"], "")
    try:
        from sapod.failpoints import parse

        parse(values["failpoints"])
    except ValueError as exc:
        raise ConfigError(f"SAPOD_FAILPOINTS: {exc}") from None
    return Config(**values)


assert {f.name for f in fields(Config)} == set(BY_FIELD) | set(ENV_FACTS), "OPTIONS and Config disagree"
