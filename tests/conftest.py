"""Fixtures shared across test folders."""

from __future__ import annotations

from pathlib import Path

import pytest

from colorize_dist import cli


@pytest.fixture(scope="session")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 64 training and 16 validation images of 16² (lossless), for the training and Slurm tests."""
    out = tmp_path_factory.mktemp("tiny") / "shards"
    assert cli.main(["shards", "synth", str(out), "--n", "80", "--resolution", "16", "--format", "png",
                     "--shard-size", "40", "--val-fraction", "0.2", "--workers", "1"]) == 0
    return out
