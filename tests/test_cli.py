"""The command line: `--help` imports no command module (so no torch), every command's own help works."""

from __future__ import annotations

import ast
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

import colorize_dist
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


HEAVY = ("torch", "accelerate", "deepspeed", "submitit", "nvidia.dali", "onnxruntime", "PIL", "matplotlib", "skimage",
         "tabulate")
HELP_OF_EVERY_COMMAND = f"""
import contextlib, io, json, sys
from colorize_dist import cli
loaded, before = {{}}, set()
for words in cli.COMMANDS:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        cli.main([*words, "--help"])
    now = {{name for name in {HEAVY!r} if name in sys.modules}}
    loaded[" ".join(words)], before = sorted(now - before), now
print(json.dumps(loaded))
"""


def test_every_commands_help_loads_no_heavy_library() -> None:
    """Each command's `--help` (and so its argument errors) answers without torch & co: one fresh process runs every
    command's `--help` in turn and, after each, names what that command loaded."""
    result = subprocess.run([sys.executable, "-c", HELP_OF_EVERY_COMMAND], capture_output=True, text=True, check=True,
                            timeout=60)
    loaded = json.loads(result.stdout)
    assert list(loaded) == [" ".join(words) for words in COMMANDS]
    assert {command: heavy for command, heavy in loaded.items() if heavy} == {}


def test_only_the_command_line_imports_argparse() -> None:
    """Library functions take typed arguments: argparse belongs to cli.py and commands/ alone."""
    package = Path(colorize_dist.__file__).parent
    found = []
    for path in sorted(package.rglob("*.py")):
        if path == package / "cli.py" or package / "commands" in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            found += [f"{path.relative_to(package.parent)}:{node.lineno}" for name in names
                      if name.split(".")[0] == "argparse"]
    assert found == []


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
