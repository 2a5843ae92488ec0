"""`colorize-dist colorize`: sizes, lightness, image modes, unreadable files, and aspect ratio kept."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize_dist import cli
from colorize_dist.color import rgb_to_lab
from colorize_dist.data import synth_image
from colorize_dist.eval.colorize import colorize_images
from colorize_dist.models.export import load_generator

L_ROUNDING = 0.5  # L units: the output is 8-bit RGB


def lab_of(rgb: np.ndarray) -> torch.Tensor:
    return rgb_to_lab(torch.from_numpy(np.ascontiguousarray(rgb))[None])[0]


def assert_same_lightness(source: Path, output: Path) -> None:
    with Image.open(source) as original, Image.open(output) as colourised:
        assert colourised.size == original.size
        expected = np.array(original.convert("RGB"))
        produced = np.array(colourised.convert("RGB"))
    assert (lab_of(produced)[0] - lab_of(expected)[0]).abs().max() <= L_ROUNDING


def test_gray_rgba_and_unreadable_inputs(generator_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    inputs = tmp_path / "in"
    (inputs / "nested").mkdir(parents=True)
    Image.fromarray(synth_image(1, 96)[:, :70]).convert("L").save(inputs / "gray.png")
    rgba = np.dstack([synth_image(2, 48)[:40], np.tile(np.arange(48, dtype=np.uint8) * 5, (40, 1))])
    Image.fromarray(rgba, "RGBA").save(inputs / "nested" / "rgba.png")
    (inputs / "broken.jpg").write_bytes(b"not a JPEG")
    run_dir = generator_file.parents[1]  # RUN/export/generator_best.safetensors → RUN

    status = cli.main(["colorize", "--checkpoint", str(run_dir), str(inputs), "--out", str(tmp_path / "out"),
                       "--side-by-side", "--batch-size", "2"])

    assert status == 1  # one file skipped
    assert f"skipping {inputs / 'broken.jpg'}" in capsys.readouterr().err
    assert_same_lightness(inputs / "gray.png", tmp_path / "out" / "gray.png")
    assert_same_lightness(inputs / "nested" / "rgba.png", tmp_path / "out" / "nested" / "rgba.png")
    with Image.open(tmp_path / "out" / "nested" / "rgba.png") as output:
        assert output.mode == "RGBA"
        np.testing.assert_array_equal(np.array(output)[..., 3], rgba[..., 3])
    with Image.open(tmp_path / "out" / "gray_side_by_side.png") as side_by_side:
        assert side_by_side.size == (140, 96)
    assert not (tmp_path / "out" / "broken.png").exists()


def test_large_jpeg_keeps_size_and_lightness(generator_file: Path, tmp_path: Path):
    source = tmp_path / "photo.jpg"
    Image.fromarray(synth_image(3, 500)).resize((3000, 2000), Image.BILINEAR).save(source, quality=90)
    status = cli.main(["colorize", "--checkpoint", str(generator_file), str(tmp_path / "*.jpg"),
                       "--out", str(tmp_path / "out")])
    assert status == 0
    assert_same_lightness(source, tmp_path / "out" / "photo.png")


@pytest.mark.parametrize("orientation", ["tall", "wide"])
def test_extreme_aspect_ratios_are_not_stretched(generator_file: Path, orientation: str):
    """A 640×120 image is coloured as the same image centred in a 640×640 square, which nothing stretches.

    The side bands are uniform across their width, so padding the image to a square at full resolution or
    after scaling gives the model the same input (stretching the image to the square instead changes ab by
    about 28 units on average).
    """
    generator, _, resolution = load_generator(generator_file)
    core = np.array(Image.fromarray(synth_image(7, 256)).resize((40, 640), Image.BILINEAR))
    image, square = np.pad(core, ((0, 0), (40, 40), (0, 0)), mode="edge"), np.pad(core, ((0, 0), (300, 300), (0, 0)),
                                                                                 mode="edge")
    if orientation == "wide":
        image, square = image.transpose(1, 0, 2), square.transpose(1, 0, 2)
    coloured, coloured_square = colorize_images(generator, resolution, [image, square])
    assert coloured.shape == image.shape
    if orientation == "wide":
        coloured, coloured_square = coloured.transpose(1, 0, 2), coloured_square.transpose(1, 0, 2)
    # Compare away from the left and right edges (half a model pixel), where upsampling sees different neighbours.
    ab, ab_in_square = lab_of(coloured)[1:, :, 10:-10], lab_of(coloured_square[:, 260:380])[1:, :, 10:-10]
    assert (ab - ab_in_square).abs().mean() < 0.01
    assert (ab - ab_in_square).abs().max() <= 1.0  # 8-bit rounding
