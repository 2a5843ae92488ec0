"""Small shard sets shared by the data tests: real-format images (with bad ones) and synthetic shards."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from colorize_dist.data.synth import synth_image
from tests.data.helpers import GOOD_IMAGES, run_cli


@pytest.fixture(scope="session")
def image_folder(tmp_path_factory) -> Path:
    """JPEGs and PNGs of several sizes and modes in nested folders, one truncated file, one non-image."""
    root = tmp_path_factory.mktemp("images")
    (root / "people" / "a").mkdir(parents=True)
    for index in range(GOOD_IMAGES):
        rgb = synth_image(index, 48)[:, : 48 - 2 * (index % 4)]  # some non-square
        image = Image.fromarray(rgb)
        if index % 3 == 0:
            image.save(root / "people" / "a" / f"face{index:02d}.png")
        elif index % 3 == 1:
            image.convert("RGBA" if index % 2 else "L").save(root / "people" / f"face{index:02d}.png")
        else:
            image.save(root / f"face{index:02d}.jpg", quality=90)
    full = (root / "face02.jpg").read_bytes()
    (root / "people" / "truncated.jpg").write_bytes(full[: len(full) // 2])
    (root / "notes.jpg").write_text("not an image\n")
    (root / "readme.txt").write_text("ignored: not an image extension\n")
    return root


@pytest.fixture(scope="session")
def synth_shards(tmp_path_factory) -> Path:
    """43 lossless synthetic images: train/ holds an uneven number of samples over several shards."""
    out = tmp_path_factory.mktemp("synth") / "shards"
    assert run_cli("shards", "synth", out, "--n", 43, "--resolution", 24, "--format", "png",
                   "--shard-size", 7, "--val-fraction", 0.25, "--workers", 1) == 0
    return out
