"""The study tests: a study file with the smoke grid plus a point that fails at run time, and Slurm's fixture."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

from colorize_dist import cli
from tests.launch.conftest import partition  # noqa: F401  (the local Slurm cluster's default partition, or skip)

REPO = Path(__file__).resolve().parents[2]
SMOKE = REPO / "configs" / "studies" / "smoke.yaml"
BROKEN = "broken"  # the injected point: a perceptual loss whose VGG16 weights do not exist
MISSING_WEIGHTS = "/nonexistent/vgg16-397923af.pth"


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(arg) for arg in argv])
    return status, out.getvalue(), err.getvalue()


def markdown_tables(text: str) -> dict[str, list[dict[str, str]]]:
    """The tables of a markdown document by the heading above them: one {column: cell} per row."""
    tables: dict[str, list[dict[str, str]]] = {}
    heading, header = "", None
    for line in text.splitlines():
        if line.startswith("#"):
            heading, header = line.lstrip("#").strip(), None
        elif line.startswith("|"):
            cells = [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if header is None:
                header = cells
            elif not all(set(cell) <= set("-:") for cell in cells):
                tables.setdefault(heading, []).append(dict(zip(header, cells, strict=True)))
    return tables


@pytest.fixture(scope="session")
def smoke_with_failure(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """configs/studies/smoke.yaml (2 resolutions × GAN off/on) and one more point, not crossed with the grid, that
    passes every config check and fails when its trainer starts."""
    path = tmp_path_factory.mktemp("studies") / "smoke_with_failure.yaml"
    path.write_text(f"base: {SMOKE}\n"
                    "points:\n"
                    f"  - name: {BROKEN}\n"
                    "    cross: false\n"
                    f"    overrides: {{loss.beta: 1.0, loss.vgg_weights: {MISSING_WEIGHTS}}}\n")
    return path
