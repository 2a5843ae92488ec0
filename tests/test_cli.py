"""The command line: `--help` imports no command module (so no torch), every command's own help works."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

from colorize_dist.cli import COMMANDS, build_parser


def test_top_level_help_imports_no_command() -> None:
    code = ("import sys; from colorize_dist import cli; cli.build_parser(['--help']).format_help(); "
            "heavy = {'torch', 'accelerate', 'deepspeed', 'submitit'} & set(sys.modules); "
            "print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("words", sorted(COMMANDS))
def test_every_command_parses_its_own_help(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_status:
        build_parser([*words, "--help"]).parse_args([*words, "--help"])
    assert exit_status.value.code == 0
    assert "usage: colorize-dist " + " ".join(words) in capsys.readouterr().out


def test_runs_help_imports_nothing_heavy() -> None:
    """`colorize-dist runs --help` answers at once: no torch, matplotlib or tabulate before a run is read."""
    code = ("import sys; from colorize_dist import cli; cli.build_parser(['runs', '--help']).format_help(); "
            "heavy = {'torch', 'accelerate', 'matplotlib', 'tabulate'} & set(sys.modules); print(sorted(heavy))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60)
    assert result.stdout.strip() == "[]"


@pytest.mark.parametrize("words", sorted(COMMANDS))
def test_every_command_describes_itself_for_users(words: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    """`--help` shows the module's DESCRIPTION (what the command does and writes), never its developer docstring."""
    module = importlib.import_module(f"colorize_dist.commands.{COMMANDS[words][0]}")
    assert module.DESCRIPTION.strip() and module.DESCRIPTION.strip() != (module.__doc__ or "").strip()
    with pytest.raises(SystemExit):
        build_parser([*words, "--help"]).parse_args([*words, "--help"])
    shown = capsys.readouterr().out
    assert module.DESCRIPTION.strip() in shown
    assert module.__doc__ is None or module.__doc__.strip().splitlines()[0] not in shown
