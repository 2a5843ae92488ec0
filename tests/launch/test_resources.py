"""One description of Slurm resources (`SlurmResources`) for `submit` and a study's `launch:` section: the same
flags on both commands, Slurm's time-limit formats read in one place, errors in one line naming the option."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import pytest

from colorize_dist.commands import study_run, submit
from colorize_dist.commands.resources import add_resource_arguments, given_resources, resources_from_arguments
from colorize_dist.config import ConfigError
from colorize_dist.launch.resources import TIME_FORMATS, SlurmResources, time_limit_minutes
from colorize_dist.study.config import load_study
from colorize_dist.study.plan import make_plan
from tests.launch.test_slurm import REPO, run_cli, submit_args


@pytest.mark.parametrize(("text", "minutes"), [
    ("90", 90),  # MM
    ("1", 1),
    ("90:30", 91),  # MM:SS, rounded up to whole minutes
    ("00:01:00", 1),  # HH:MM:SS
    ("01:00:01", 61),
    ("48:00:00", 2880),
    ("2-0", 2880),  # D-HH
    ("1-12", 2160),
    ("1-12:30", 2190),  # D-HH:MM
    ("2-00:00:00", 2880),  # D-HH:MM:SS
    ("1-12:30:01", 2191),
])
def test_every_slurm_time_format_is_read_as_whole_minutes(text: str, minutes: int) -> None:
    assert time_limit_minutes(text) == minutes


@pytest.mark.parametrize("text", ["", "0", "0:30", "1:60", "10:00:60", "1-24", "1-", "1:2:3:4", "1-2:3:4:5", "-5",
                                  "1d", "24h", "abc", "１２"])
def test_a_bad_time_limit_is_one_line_naming_the_option_and_the_formats(text: str) -> None:
    with pytest.raises(ConfigError) as error:
        time_limit_minutes(text, "launch.time")
    message = str(error.value)
    assert message.startswith(f"launch.time {text!r} ") and TIME_FORMATS in message and "\n" not in message


def test_submit_and_study_run_take_the_same_slurm_flags_one_per_field() -> None:
    flags = {}
    for command in (submit, study_run):
        parser = argparse.ArgumentParser()
        command.add_arguments(parser)
        flags[command.__name__] = {option for action in parser._actions for option in action.option_strings}
    fields = {"--" + item.name.replace("_", "-") for item in dataclasses.fields(SlurmResources)}
    assert fields <= flags[submit.__name__] and fields <= flags[study_run.__name__]


def test_flags_override_the_defaults_and_are_checked_by_their_name() -> None:
    parser = argparse.ArgumentParser()
    add_resource_arguments(parser, "Slurm")
    args = parser.parse_args(["--time", "2-12", "--gpus-per-node", "8", "--exclusive"])
    assert given_resources(args) == {"time": "2-12", "gpus_per_node": 8, "exclusive": True}
    resources = resources_from_arguments(args, SlurmResources(partition="gpu", nodes=2))
    assert (resources.partition, resources.nodes, resources.time_min, resources.num_processes) == ("gpu", 2, 3600, 16)
    args = parser.parse_args(["--time", "5", "--signal-delay", "200"])
    with pytest.raises(ConfigError, match=r"^--signal-delay 200 s must be at most half the time limit \(--time 5\)"):
        resources_from_arguments(args, SlurmResources())
    args = parser.parse_args(["--nodes", "0"])
    with pytest.raises(ConfigError, match=r"^--nodes must be at least 1, got 0$"):
        resources_from_arguments(args, SlurmResources())


def test_submit_refuses_a_bad_time_limit_in_one_line(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    status, _, err = run_cli(*submit_args(run_dir, "debug", shards, "--time", "1-25:00"))
    assert status == 2 and err.startswith("submit: --time '1-25:00' ") and TIME_FORMATS in err, err
    assert len(err.strip().splitlines()) == 1 and not run_dir.exists()


def test_signal_delay_must_leave_time_to_start(shards: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(*submit_args(tmp_path / "run", "debug", shards, "--time", "00:01:00"))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("submit: --signal-delay 120 s ") and "--time 00:01:00" in err, err


def write_study(tmp_path: Path, launch: str) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(f"config: tiny\noverrides: {{train.batch_size: 8}}\nlaunch: {launch}\n")
    return path


@pytest.mark.parametrize(("launch", "minutes"), [('{time: "1-12"}', 2160), ('{time: "90"}', 90), ("{}", 1440)])
def test_a_study_takes_its_time_limit_in_slurm_formats(tmp_path: Path, launch: str, minutes: int) -> None:
    plan = make_plan(*load_study(write_study(tmp_path, launch)), tmp_path)
    assert {point.launch.time_min for point in plan.points} == {minutes}


def test_the_command_line_time_wins_over_the_studys_and_is_read_as_text(tmp_path: Path) -> None:
    path = write_study(tmp_path, '{time: "1-12"}')
    plan = make_plan(*load_study(path, ["launch.time=30:00"]), tmp_path)  # YAML alone would read 1800
    assert plan.points[0].launch.time_min == 30
    status, out, err = run_cli("study", "run", path, "--time", "2-00:00:00", "--dry-run", "--out", tmp_path / "out")
    assert status == 0 and "2-00:00:00 per allocation" in out, err


@pytest.mark.parametrize("where", ["launch: {time: 24:00:00}", "launch: {}\noverrides: {launch.time: 30:00}",
                                   "launch: {}\ngrid: {launch.time: [60, 120]}"])
def test_an_unquoted_yaml_time_is_refused_naming_the_key(tmp_path: Path, where: str) -> None:
    """YAML reads 24:00:00 as 86400 and 30:00 as 1800: taken as minutes, a 60-day or 30-hour limit."""
    path = tmp_path / "study.yaml"
    path.write_text(f"config: tiny\n{where}\n")
    status, _, err = run_cli("study", "run", path, "--dry-run", "--out", tmp_path / "out")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "launch.time=" in err and "is a number" in err and '"24:00:00"' in err, err


def test_a_bad_study_time_names_the_study_key(tmp_path: Path) -> None:
    status, _, err = run_cli("study", "run", write_study(tmp_path, '{time: "1:75"}'), "--dry-run")
    assert status == 2 and "launch.time '1:75' " in err and TIME_FORMATS in err, err
    status, _, err = run_cli("study", "run", REPO / "configs" / "studies" / "smoke.yaml", "--time", "soon",
                             "--dry-run")
    assert status == 2 and err.startswith("study run: --time 'soon' ") and len(err.strip().splitlines()) == 1, err
