"""`colorize-dist colorize`: sizes, lightness, image modes, unreadable files, aspect ratio kept, banded
full-resolution work (identical output, bounded memory) and output folders that cannot be written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize_dist import cli
from colorize_dist.color import rgb_to_lab
from colorize_dist.data import synth_image
from colorize_dist.eval.colorize import colorize_images, row_bands
from colorize_dist.models.export import load_generator
from tests.eval.conftest import REPO, unwritable_folder_runs

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


def test_banded_output_is_identical_to_one_band(generator_file: Path):
    """Bands of 7 rows, of 1 row (fewer pixels than a row) and one band give the same bytes, on a non-square photo."""
    generator, _, resolution = load_generator(generator_file)
    photo = np.array(Image.fromarray(synth_image(11, 200)).resize((470, 301), Image.BILINEAR))
    single = colorize_images(generator, resolution, [photo], max_pixels=photo.shape[0] * photo.shape[1])[0]
    assert len(row_bands(301, 470, 7 * 470 + 3)) == 43 and row_bands(301, 470, 100)[:2] == [(0, 1), (1, 2)]
    for max_pixels in (7 * 470 + 3, 100):
        np.testing.assert_array_equal(colorize_images(generator, resolution, [photo], max_pixels=max_pixels)[0],
                                      single)


PEAK_SCRIPT = """
import resource, sys
from colorize_dist import cli
from colorize_dist.eval import colorize  # noqa: F401 (imported before the baseline)
baseline = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
status = cli.main(["colorize", *sys.argv[1:]])
print(status, baseline, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # KiB
"""
PEAK_BOUND_MB = 800  # over the process's size before colorizing (measured 500); in one band it is 3,160 MB


@pytest.mark.slow  # about 20 s, and 6000² images in memory
def test_max_pixels_bounds_the_memory_of_a_6000_square_photo(generator_file: Path, tmp_path: Path):
    source = tmp_path / "photo.jpg"
    Image.fromarray(synth_image(3, 600)).resize((6000, 6000), Image.BILINEAR).save(source, quality=90)
    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, "--checkpoint", str(generator_file), str(source),
                             "--out", str(tmp_path / "out"), "--max-pixels", "1048576"],
                            capture_output=True, text=True, cwd=REPO, timeout=600)
    status, baseline_kib, peak_kib = map(int, result.stdout.split("\n")[-2].split())
    assert status == 0, result.stderr
    assert (peak_kib - baseline_kib) / 1024 < PEAK_BOUND_MB
    with Image.open(tmp_path / "out" / "photo.png") as output:
        assert output.size == (6000, 6000)


def test_out_that_is_a_file_is_one_line(generator_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    source = tmp_path / "photo.png"
    Image.fromarray(synth_image(4, 40)).save(source)
    taken = tmp_path / "taken.png"
    taken.write_bytes(b"keep me")
    for out, reason in [(taken, "is an existing file"), (taken / "below", "cannot be written (Not a directory)")]:
        assert cli.main(["colorize", "--checkpoint", str(generator_file), str(source), "--out", str(out)]) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"colorize: --out {out} {reason}")
    assert taken.read_bytes() == b"keep me"


def test_out_without_permission_or_on_a_read_only_file_system_is_one_line(generator_file: Path, tmp_path: Path):
    source = tmp_path / "photo.png"
    Image.fromarray(synth_image(5, 40)).save(source)
    out = tmp_path / "locked" / "colorized"
    runs = unwritable_folder_runs(out.parent, ["colorize", "--checkpoint", str(generator_file), str(source),
                                               "--out", str(out)])
    for reason, result in [("Permission denied", runs["permission"]), ("Read-only file system", runs["read-only"])]:
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith(f"colorize: --out {out} cannot be written ({reason})")
