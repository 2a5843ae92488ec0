"""Every command's errors leave through one path (`cli.run`): one line `COMMAND: message` on stderr, and the
status of the error (2 for bad input unless the command documents another), never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from colorize_dist import cli
from colorize_dist.cli import COMMANDS
from colorize_dist.errors import UserError

MISSING = "/nonexistent/colorize-dist"

# (command words, its arguments, expected status, a piece of the expected message)
ERRORS = {
    ("bench", "color"): (["--sizes", "0"], 2, "--sizes, --megapixels and --min-time must be positive"),
    ("bench", "data"): (["--epochs", "0"], 1, "--epochs and --resolutions must be at least 1"),
    ("bench", "train"): (["--steps", "2", "--warmup", "1"], 1, "need 1 <= --warmup < --steps - 1"),
    ("bench", "gpu"): (["--warmup", "0"], 2, "need 1 <= --warmup < --steps - 1"),
    ("bench", "checkpoint"): (["--repeats", "0"], 2, "--repeats must be at least 1"),
    ("bench", "telemetry"): (["--steps", "0"], 2, "--steps must be at least 1"),
    ("shards", "make"): ([MISSING, "{tmp}/out"], 2, "--resolution is required"),
    ("shards", "synth"): (["{tmp}/file", "--n", "4"], 2, "{tmp}/file"),
    ("shards", "verify"): ([MISSING], 2, MISSING),
    ("shards", "index"): ([MISSING], 2, MISSING),
    ("model-info",): (["generator.depth=two"], 2, "generator.depth"),
    ("submit",): (["--partition", "p", "--time", "1:00:00", "--gpus-per-node", "1", "--dry-run", "train.batch_size=0"],
                  2, "train.batch_size must be at least 1"),
    ("study", "run"): (["{tmp}/no-study.yaml", "--dry-run"], 2, "no-study.yaml"),
    ("study", "report"): (["{tmp}/no-study.yaml"], 2, "no-study.yaml"),
    ("train",): (["--run-dir", "{tmp}/run", "train.batch_size=0"], 2, "train.batch_size must be at least 1"),
    ("eval",): (["--shards", MISSING], 2, "--checkpoint and --shards are required"),
    ("colorize",): ([MISSING, "--checkpoint", MISSING, "--out", "{tmp}/out", "--batch-size", "0"], 2,
                    "--batch-size must be at least 1"),
    ("export",): (["--onnx", MISSING], 2, MISSING),
    ("runs",): ([MISSING], 2, f"no metrics.jsonl in {MISSING}"),
}


def test_every_command_has_an_error_path_here() -> None:
    assert set(ERRORS) == set(COMMANDS)


@pytest.mark.parametrize("words", sorted(ERRORS))
def test_an_error_is_one_line_and_its_status(words: tuple[str, ...], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "file").write_text("not a folder")
    arguments, status, message = ERRORS[words]
    argv = [*words, *(argument.format(tmp=tmp_path) for argument in arguments)]
    assert cli.main(argv) == status
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(" ".join(words) + ": ")
    assert message.format(tmp=tmp_path) in lines[0]


def test_an_error_without_a_message_leaves_with_its_status_alone(capsys: pytest.CaptureFixture[str]) -> None:
    """A node's other ranks after a lost peer: the node's lowest rank reports, the others only exit."""
    def fails(_):
        raise UserError("", exit_status=3)

    assert cli.run("train", fails, None) == 3
    assert capsys.readouterr().err == ""


def test_other_errors_keep_their_traceback() -> None:
    def fails(_):
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        cli.run("train", fails, None)
