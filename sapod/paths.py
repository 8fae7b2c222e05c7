"""Every shared-folder path, one line each. Nothing else builds paths into the folder.

Layout (DESIGN.md section 3) under ``{GDRIVE_PATH}/experiments/{EXPERIMENT_NAME}/``.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

# The paths every node asks for on every wake are built once per argument set and kept
# (Path objects are immutable): building a Path costs more than the stat it is for.
# Per function, the newest 1024: a round's paths for 128 nodes of one process for 8
# rounds, and a bounded few MiB however many rounds a node runs.
_kept = functools.lru_cache(maxsize=1024)

# Canonical round folder names only: "round_03", "round_3\n" or a fullwidth digit would
# name round 3 a second time (and, for checkpoints, make pruning delete the latest one).
_ROUND_DIR = re.compile(r"^round_(0|[1-9][0-9]{0,8})\Z")


def round_number(name: str) -> int | None:
    """The round a folder named ``round_{r}`` is for, or None for any other name."""
    m = _ROUND_DIR.match(name)
    return int(m.group(1)) if m else None


def experiment_root(shared: Path, experiment: str) -> Path:
    return Path(shared) / "experiments" / experiment


def archives_dir(shared: Path) -> Path:
    return Path(shared) / "archives"


def experiment_file(root: Path) -> Path:
    return root / "experiment.json"


@_kept
def state_dir(root: Path) -> Path:
    return root / "state"


@_kept
def state_file(root: Path) -> Path:
    return state_dir(root) / "current_state.json"


@_kept
def peers_dir(root: Path) -> Path:
    return root / "peers"


@_kept
def peer_file(root: Path, node_id: str) -> Path:
    return peers_dir(root) / f"{node_id}.json"


@_kept
def rollouts_dir(root: Path, round_: int, stage: int) -> Path:
    return root / "rollouts" / f"round_{round_}" / f"stage_{stage}"


@_kept
def rollout_file(root: Path, round_: int, stage: int, node_id: str) -> Path:
    return rollouts_dir(root, round_, stage) / f"{node_id}.json"


def rewards_root(root: Path) -> Path:
    return root / "rewards"


@_kept
def rewards_dir(root: Path, round_: int, stage: int) -> Path:
    return rewards_root(root) / f"round_{round_}" / f"stage_{stage}"


@_kept
def reward_file(root: Path, round_: int, stage: int, node_id: str) -> Path:
    return rewards_dir(root, round_, stage) / f"{node_id}.json"


def tally_file(root: Path, round_: int, stage: int) -> Path:
    # A leading underscore can never be a node id: no node's submission can take this name.
    return rewards_dir(root, round_, stage) / "_tally.json"


def checkpoints_dir(root: Path) -> Path:
    return root / "checkpoints"


def checkpoint_dir(root: Path, round_: int, node_id: str) -> Path:
    return checkpoints_dir(root) / f"round_{round_}" / node_id


def complete_marker(directory: Path) -> Path:
    return directory / "COMPLETE"


@_kept
def logs_dir(root: Path, node_id: str) -> Path:
    return root / "logs" / node_id


@_kept
def metrics_file(root: Path, node_id: str) -> Path:
    return logs_dir(root, node_id) / "metrics.jsonl"


@_kept
def events_file(root: Path, node_id: str) -> Path:
    return logs_dir(root, node_id) / "training_events.jsonl"


@_kept
def progress_file(root: Path, node_id: str) -> Path:
    return root / f"progress_{node_id}.jsonl"
