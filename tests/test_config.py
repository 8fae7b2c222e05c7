"""Config: flags over environment over defaults, and one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from sapod.cli import main
from sapod.config import OPTIONS, build_config, recorded_settings
from sapod.errors import ConfigError

ENV = {"GDRIVE_PATH": "/tmp/shared"}


def test_defaults_and_original_variable_names():
    """The original project's variable names set I, J, G and the rest."""
    cfg = build_config({}, {**ENV, "NUM_TRAIN_SAMPLES": "3", "NUM_TRANSPLANT_TREES": "0", "NUM_GENERATIONS": "8",
                            "NODE_ROLE": "coordinator", "NODE_ID": "c1", "EXPERIMENT_NAME": "exp", "MAX_ROUNDS": "7"})
    assert (cfg.num_train_samples, cfg.num_transplant_trees, cfg.num_generations) == (3, 0, 8)
    assert (cfg.role, cfg.node_id, cfg.experiment, cfg.max_rounds) == ("coordinator", "c1", "exp", 7)
    assert cfg.root == Path("/tmp/shared/experiments/exp")


def test_flags_win_over_environment():
    """A flag beats the variable, which beats the default."""
    cfg = build_config({"num_generations": "6"}, {**ENV, "NUM_GENERATIONS": "5", "SEED": "9"})
    assert cfg.num_generations == 6 and cfg.seed == 9
    assert build_config({}, ENV).num_generations == 4


def test_compile_generation_is_auto_unless_set():
    """COMPILE_GENERATION defaults to auto (the policy decides from the device); true and false stay booleans."""
    assert build_config({}, ENV).compile_generation == "auto"
    assert build_config({}, {**ENV, "COMPILE_GENERATION": " AUTO "}).compile_generation == "auto"
    assert build_config({}, {**ENV, "COMPILE_GENERATION": "true"}).compile_generation is True
    assert build_config({"compile_generation": "off"}, {**ENV, "COMPILE_GENERATION": "on"}).compile_generation is False


@pytest.mark.parametrize("env,needle", [
    ({"NUM_GENERATIONS": "1"}, "NUM_GENERATIONS='1' is not allowed: must be an integer >= 2"),
    ({"NUM_TRAIN_SAMPLES": "two"}, "NUM_TRAIN_SAMPLES='two' is not allowed"),
    ({"MAX_STAGES": "2"}, "MAX_STAGES='2' is not allowed: must be 1"),
    ({"WATCH_MODE": "fsevents"}, "WATCH_MODE='fsevents' is not allowed: must be auto, inotify or poll"),
    ({"COMPILE_GENERATION": "cuda"}, "COMPILE_GENERATION='cuda' is not allowed: must be auto, true or false"),
    ({"NODE_ID": "../evil"}, "NODE_ID='../evil' is not allowed"),
    ({"LOG_FORMAT": "xml"}, "must be auto, json or console"),
    ({"PEER_TIMEOUT": "1", "HEARTBEAT_INTERVAL": "5"}, "PEER_TIMEOUT=1.0 is not allowed"),
    ({"LOG_FILE_MAX_MB": "inf"}, "LOG_FILE_MAX_MB='inf' is not allowed: must be a number from 0.01 to 1000000"),
    ({"LOG_FILE_MAX_MB": "1e-9"}, "LOG_FILE_MAX_MB='1e-9' is not allowed"),  # a cap of 0 bytes
])
def test_bad_values_name_variable_value_and_allowed(env, needle):
    """A bad value is a ConfigError naming the variable, the value and what is allowed."""
    with pytest.raises(ConfigError) as err:
        build_config({}, {**ENV, **env})
    assert needle in str(err.value)
    assert "\n" not in str(err.value)


def test_missing_shared_folder_is_an_error():
    """Without GDRIVE_PATH the node refuses to start and says how to fix it."""
    with pytest.raises(ConfigError, match="GDRIVE_PATH is not set"):
        build_config({}, {})


def test_cli_exits_2_with_one_line(capsys):
    """The CLI turns a bad value into exit 2 and one line on stderr."""
    assert main(["--shared", "/tmp/x", "--num-generations", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "NUM_GENERATIONS" in err[0] and "'0'" in err[0]


def test_help_lists_every_option_with_variable_and_default():
    """--help shows each flag with its environment variable and default."""
    out = subprocess.run([sys.executable, "-m", "sapod", "--help"], capture_output=True, text=True, check=True).stdout
    flat = " ".join(out.split())
    for opt in OPTIONS:
        assert opt.flag in out, opt.flag
        assert f"env {opt.env};" in flat, opt.env


def test_readme_documents_every_option():
    """The README's configuration table has a row for every option, with its flag."""
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    for opt in OPTIONS:
        assert f"| `{opt.env}` | `{opt.flag}` |" in readme, opt.env


@pytest.mark.parametrize("recorded, problem", [
    ({"num_train_samples": "2"}, "settings.num_train_samples='2'"),
    ({"num_generations": 0}, "settings.num_generations=0"),
    ({"num_transplant_trees": True}, "settings.num_transplant_trees=True"),
    ({"tasks": 5}, "settings.tasks=5"),
    ({"seed": 1.5}, "settings.seed=1.5"),
])
def test_recorded_settings_are_held_to_their_options_rules(recorded, problem):
    """experiment.json is a file anyone can edit: a bad value is a one-line error naming
    it, not a TypeError or ZeroDivisionError rounds later."""
    with pytest.raises(ConfigError, match=re.escape(problem)):
        recorded_settings(recorded, list(recorded))


def test_recorded_settings_pass_good_values_and_leave_out_what_is_not_asked():
    got = recorded_settings({"num_train_samples": 3, "tasks": "easy", "seed": 7, "other": "x"},
                            ["num_train_samples", "tasks", "seed", "num_generations"])
    assert got == {"num_train_samples": 3, "tasks": "easy", "seed": 7}
