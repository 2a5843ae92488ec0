"""Images to 8-bit RGB everywhere (`shards make`, the reference loader, `colorize`): 16-bit images keep their values."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from colorize_dist.data.images import has_transparency, is_progressive_jpeg, on_background, to_8bit, to_rgb8
from colorize_dist.data.synth import synth_image
from colorize_dist.eval.colorize import read_picture
from colorize_dist.models.config import GeneratorConfig
from colorize_dist.models.export import save_generator
from colorize_dist.models.generator import build_generator
from tests.data.helpers import run_cli
from tests.data.test_shards import write_png16

RAMP16 = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))


def test_sixteen_bit_gray_is_scaled_not_clipped(tmp_path):
    path = tmp_path / "gray16.png"
    write_png16(path, RAMP16)
    with Image.open(path) as image:
        assert image.mode.startswith("I")  # what Pillow gives: convert("RGB") would clip it to white
        rgb = np.asarray(to_rgb8(image))
    expected = np.rint(RAMP16 / 257.0).astype(np.uint8)
    assert np.array_equal(rgb[..., 0], expected) and np.array_equal(rgb[..., 2], expected)
    picture = read_picture(path)
    assert np.array_equal(picture.rgb[..., 1], expected) and picture.alpha is None


def test_sixteen_bit_rgb_keeps_its_colour(tmp_path):
    pixels = np.zeros((8, 8, 3), np.uint16)
    pixels[..., 0], pixels[..., 1], pixels[..., 2] = 50000, 25000, 1000
    write_png16(tmp_path / "rgb16.png", pixels)
    assert np.abs(read_picture(tmp_path / "rgb16.png").rgb[0, 0].astype(int) - [194, 97, 4]).max() <= 1


@pytest.mark.parametrize(("values", "expected"), [(np.array([[0.0, 0.5, 1.0]]), [0, 128, 255]),
                                                   (np.array([[0.0, 100.0, 300.0]]), [0, 100, 255])])
def test_float_images_are_read_as_unit_or_byte_range(values, expected):
    assert np.asarray(to_8bit(Image.fromarray(values.astype(np.float32), "F"))).tolist() == [expected]


def test_progressive_jpegs_are_told_apart():
    image = Image.fromarray(synth_image(0, 32))
    for progressive in (False, True):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", progressive=progressive)
        assert is_progressive_jpeg(buffer.getvalue()) is progressive
    png = io.BytesIO()
    image.save(png, format="PNG")
    assert not is_progressive_jpeg(png.getvalue()) and not is_progressive_jpeg(b"\xff\xd8")


def test_colorize_keeps_the_lightness_of_a_sixteen_bit_gray_photo(tmp_path):
    """It used to come out pure white, with exit status 0."""
    cfg = GeneratorConfig(ndims=4, depth=2)
    weights = tmp_path / "generator.safetensors"
    torch.manual_seed(0)
    save_generator(build_generator(cfg), cfg, 16, weights)
    (tmp_path / "in").mkdir()
    write_png16(tmp_path / "in" / "gray16.png", RAMP16)
    assert run_cli("colorize", tmp_path / "in", "--checkpoint", weights, "--out", tmp_path / "out", "--cpu") == 0
    with Image.open(tmp_path / "out" / "gray16.png") as output:
        lightness = np.asarray(output.convert("L"), dtype=float)
    # The gray ramp (in colour, from an untrained generator), not white: its lightness follows the input's.
    assert lightness.min() < 10 and lightness.max() > 245
    assert np.corrcoef(lightness.ravel(), RAMP16.ravel())[0, 1] > 0.95


def test_transparency_is_found_in_every_form_and_composited_onto_white():
    opaque = Image.fromarray(synth_image(1, 8))
    rgba = opaque.convert("RGBA")
    assert not has_transparency(rgba)  # an alpha channel, every pixel opaque
    rgba.putpixel((0, 0), (10, 200, 10, 0))
    palette = opaque.convert("P")
    palette.info["transparency"] = palette.getpixel((0, 0))
    keyed = opaque.copy()
    keyed.info["transparency"] = opaque.getpixel((0, 0))  # an RGB PNG's colour key (tRNS)
    for image in (rgba, palette, keyed, opaque.convert("LA").copy()):
        if image.mode == "LA":
            image.putpixel((0, 0), (0, 0))
        assert has_transparency(image), image.mode
        flattened = np.asarray(on_background(image))
        assert flattened[0, 0].tolist() == [255, 255, 255], image.mode
    assert np.array_equal(np.asarray(on_background(rgba))[1:], np.asarray(opaque)[1:])
    assert not has_transparency(opaque) and not has_transparency(opaque.convert("P"))
