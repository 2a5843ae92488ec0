"""Helpers shared by the data tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from colorize_dist import cli

needs_dali = pytest.mark.skipif(importlib.util.find_spec("nvidia.dali") is None, reason="nvidia.dali not installed")

GOOD_IMAGES = 14  # in the `image_folder` fixture, besides one truncated JPEG and one text file named .jpg


def run_cli(*argv: str | Path) -> int:
    return cli.main([str(arg) for arg in argv])
