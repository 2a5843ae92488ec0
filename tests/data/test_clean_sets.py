"""Clean sets from real photo folders: `shards make` skips grayscale (gray or toned) and tiny images and lists them
with the reason, composites transparency onto white, and makes test sets (--val-fraction 1)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from colorize_dist.data import DataConfig, ManifestError, build_loader
from colorize_dist.data.images import residual_chroma
from colorize_dist.data.make import GRAY_RESIDUAL_CHROMA, LISTED_PER_REASON, Skipped, skip_counts, skip_listing
from colorize_dist.data.manifest import list_shards
from tests.data.helpers import run_cli
from tests.data.photos import COLOUR_PHOTOS, TINTS, as_jpeg, colour_in_centre, photo, toned
from tests.training.helpers import tiny_overrides, train_once

RESOLUTION = 48
HIDDEN = (0, 255, 0)  # the colour stored under transparent pixels
GRAYSCALE = {"gray.png": "L", "gray_as_rgb.jpg": "gray saved as RGB", "sepia.jpg": "toned", "la.png": "LA"}
TOO_SMALL = {"tiny.png": (2, 1), "small.png": (40, 20)}
KEPT = {"colour.png", "portrait.jpg", "subject_on_gray.png", "palette.png", "rgba.png"}


@pytest.mark.parametrize(("side", "toned_at_most"), [(512, 5.0), (256, 9.0)])
def test_residual_chroma_separates_colour_photos_from_gray_and_toned_prints(side, toned_at_most):
    """The figures behind GRAY_RESIDUAL_CHROMA (README, Data): colour photos 12 and more, toned prints (JPEG
    quality 50 included) at most 4.7 at 512 px and 8.4 at 256 px, gray 0; a colour subject on 5 % of a gray
    photo keeps it colour."""
    for name in COLOUR_PHOTOS:
        image = photo(name)
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        assert residual_chroma(image) >= 12.0, name
        assert residual_chroma(image.convert("L")) < 0.01, name  # the kernel's rounding of a, b for gray
        for tint_name, tint in TINTS.items():
            for print_ in (toned(image, tint), as_jpeg(toned(image, tint), 75), as_jpeg(toned(image, tint), 50)):
                assert residual_chroma(print_) <= toned_at_most, (name, tint_name)
        if name != "hubble_deep_field":  # its centre is black sky: no colour to keep
            assert residual_chroma(colour_in_centre(image, 0.05)) >= 12.0, name
    assert toned_at_most < GRAY_RESIDUAL_CHROMA < 12.0


@pytest.mark.parametrize(("colours", "one_tint"), [
    (((220, 30, 30), (30, 30, 220)), False),  # flat graphics of two hues: colour, though each lightness has one
    (((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)), False),
    (((200, 120, 80), (90, 60, 40)), True),  # two browns of one hue: a toned image
])
def test_flat_colours_count_as_colour_unless_they_are_one_tint(colours, one_tint):
    stripes = np.repeat(np.array(colours, np.uint8), 16, axis=0)[None].repeat(32, axis=0)
    assert (residual_chroma(Image.fromarray(stripes)) < GRAY_RESIDUAL_CHROMA) is one_tint


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory) -> Path:
    """Photos as users' folders hold them: colour, gray, toned, tiny, transparent in three ways. Those compared
    pixel for pixel are RESOLUTION² (stored unresampled); the others 256 px, where the grayscale rule holds for
    JPEGs of toned prints."""
    root = tmp_path_factory.mktemp("photos")
    size = (RESOLUTION, RESOLUTION)
    astronaut = photo("astronaut").resize(size, Image.Resampling.LANCZOS)
    astronaut.save(root / "colour.png")
    photo("grace_hopper").resize((256, 300), Image.Resampling.LANCZOS).save(root / "portrait.jpg", quality=90)
    colour_in_centre(photo("chelsea").resize((256, 256), Image.Resampling.LANCZOS), 0.1).save(
        root / "subject_on_gray.png")
    large = photo("astronaut").resize((256, 256), Image.Resampling.LANCZOS)
    large.convert("L").save(root / "gray.png")
    large.convert("L").convert("RGB").save(root / "gray_as_rgb.jpg", quality=90)
    toned(large, TINTS["sepia"]).save(root / "sepia.jpg", quality=75)
    Image.fromarray(np.array([[(255, 0, 0), (0, 0, 255)]], np.uint8)).save(root / "tiny.png")
    astronaut.resize((40, 20)).save(root / "small.png")

    palette = np.zeros(size, np.uint8)  # left half: entry 0, transparent, pure green; right half red and blue
    palette[:, RESOLUTION // 2:] = 1 + (np.arange(RESOLUTION) // 4 % 2)[:, None]
    indexed = Image.fromarray(palette, "P")
    indexed.putpalette([*HIDDEN, 220, 30, 30, 30, 30, 220])
    indexed.save(root / "palette.png", transparency=0)

    rgba = np.zeros((*size, 4), np.uint8)
    rgba[..., :3] = np.asarray(astronaut)
    rgba[..., 3] = 255
    rgba[:16, :, :3], rgba[:16, :, 3] = HIDDEN, 0  # top rows: invisible green
    rgba[16:24, :, :3], rgba[16:24, :, 3] = (200, 0, 0), 128  # half-transparent red
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")

    la = np.zeros((*size, 2), np.uint8)
    la[..., 0], la[..., 1] = np.asarray(astronaut.convert("L")), 255
    la[:10, :, 1] = 0
    Image.fromarray(la, "LA").save(root / "la.png")
    return root


def stored_images(out: Path) -> dict[str, np.ndarray]:
    """Every stored image of a set by sample key (train and val), decoded."""
    images = {}
    for tar in sorted(out.rglob("*.tar")):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples()):
            extension = next(key for key in ("png", "jpg") if key in sample)
            images[sample["__key__"]] = np.asarray(Image.open(io.BytesIO(sample[extension])))
    return images


def make(photo_folder: Path, out: Path, *options: object) -> int:
    return run_cli("shards", "make", photo_folder, out, "--resolution", RESOLUTION, "--format", "png",
                   "--val-fraction", 0, "--workers", 1, *options)


def test_gray_toned_and_tiny_photos_are_skipped_and_listed(photo_folder, tmp_path, capsys):
    out = tmp_path / "set"
    assert make(photo_folder, out) == 0
    captured = capsys.readouterr()
    expected = dict.fromkeys(GRAYSCALE, "grayscale") | dict.fromkeys(TOO_SMALL, "too small")
    listed = dict(re.fullmatch(r"skipped (\S+): (grayscale|too small) \(.*\)", line).groups()
                  for line in captured.err.splitlines() if line.startswith("skipped "))
    assert listed == expected
    assert captured.out.splitlines()[-1] == ("kept 5 of 11 images; skipped 6: 2 too small, 4 grayscale; 2 with "
                                             "transparency composited onto white")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {entry["file"]: entry["reason"] for entry in manifest["skipped"]} == expected
    details = {entry["file"]: entry["detail"] for entry in manifest["skipped"]}
    assert details["tiny.png"] == "2x1, shorter side under --min-size 24"
    assert details["small.png"] == "40x20, shorter side under --min-size 24"
    assert all(float(re.search(r"residual chroma ([\d.]+) <", details[name]).group(1)) < GRAY_RESIDUAL_CHROMA
               for name in GRAYSCALE)
    assert manifest["min_size"] == RESOLUTION // 2 and manifest["background"] == [255, 255, 255]
    assert manifest["transparent_on_background"] == 2 and "residual chroma < 10" in manifest["grayscale"]
    assert set(stored_images(out)) == {name.replace(".", "_") for name in KEPT}
    assert run_cli("shards", "verify", out) == 0


def test_transparent_pixels_become_white_never_their_hidden_colour(photo_folder, tmp_path):
    out = tmp_path / "set"
    assert make(photo_folder, out) == 0
    stored = stored_images(out)
    palette, rgba = stored["palette_png"], stored["rgba_png"]
    assert palette.shape == (RESOLUTION, RESOLUTION, 3)
    assert (palette[:, :RESOLUTION // 2] == 255).all()  # was transparent green
    assert {tuple(pixel) for pixel in palette[:, RESOLUTION // 2:].reshape(-1, 3)} == {(220, 30, 30), (30, 30, 220)}
    assert (rgba[:16] == 255).all()
    half = 128 / 255
    assert np.abs(rgba[16:24].astype(float) - [200 * half + 255 * (1 - half), 255 * (1 - half),
                                                255 * (1 - half)]).max() <= 1
    with Image.open(photo_folder / "colour.png") as original:
        assert np.array_equal(stored["colour_png"], np.asarray(original))  # opaque images unchanged
        assert np.array_equal(rgba[24:], np.asarray(original)[24:])


@pytest.mark.parametrize(("options", "kept"), [
    (("--keep-gray",), KEPT | set(GRAYSCALE)),
    (("--min-size", 1), KEPT | set(TOO_SMALL)),
    (("--min-size", 0, "--keep-gray"), KEPT | set(GRAYSCALE) | set(TOO_SMALL)),
    (("--min-size", 21), KEPT),  # small.png's shorter side is 20
])
def test_keep_gray_and_min_size_override_the_skips(options, kept, photo_folder, tmp_path, capsys):
    out = tmp_path / "set"
    assert make(photo_folder, out, *options) == 0
    assert set(stored_images(out)) == {name.replace(".", "_") for name in kept}
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest["skipped"]) == 11 - len(kept)
    if "--keep-gray" in options:
        assert manifest["grayscale"] == "kept (--keep-gray)"
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"kept {len(kept)} of 11 images")


def test_keep_original_stores_the_files_but_composites_transparency(photo_folder, tmp_path):
    out = tmp_path / "set"
    assert run_cli("shards", "make", photo_folder, out, "--keep-original", "--val-fraction", 0, "--workers", 1) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["min_size"] == 0  # no resolution to take half of: tiny images are kept
    assert {entry["file"] for entry in manifest["skipped"]} == set(GRAYSCALE)
    samples = {sample["__key__"]: sample for sample in wds.DataPipeline(
        wds.SimpleShardList([str(tar) for tar in sorted(out.rglob("*.tar"))]), wds.tarfile_to_samples())}
    assert samples["portrait_jpg"]["jpg"] == (photo_folder / "portrait.jpg").read_bytes()
    assert samples["tiny_png"]["png"] == (photo_folder / "tiny.png").read_bytes()
    palette = Image.open(io.BytesIO(samples["palette_png"]["png"]))
    assert palette.mode == "RGB" and (np.asarray(palette)[:, :RESOLUTION // 2] == 255).all()


def test_a_test_set_has_no_train_images_and_training_on_it_is_one_line(photo_folder, tmp_path, capsys):
    out = tmp_path / "test-set"
    assert make(photo_folder, out, "--val-fraction", 1.0) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["val_fraction"] == 1.0
    assert manifest["splits"]["train"] == {"samples": 0, "shards": []}
    assert manifest["splits"]["val"]["samples"] == len(KEPT)
    assert run_cli("shards", "verify", out) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert ["train", "0", "0"] in rows and ["val", "1", str(len(KEPT))] in rows

    cfg = DataConfig(shards=str(out), resolution=RESOLUTION, backend="reference", num_threads=1)
    with build_loader(cfg, "val", batch_size=2) as loader:
        assert sum(int(batch.valid.sum()) for batch in loader.epoch(0)) == len(KEPT)
    with pytest.raises(ManifestError) as error:
        list_shards(out, "train")
    message = str(error.value)
    assert "\n" not in message and str(out / "manifest.json") in message and "test set" in message

    result = train_once(tmp_path / "run", tiny_overrides(out), timeout=300)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == f"train: {message}"
    assert "Traceback" not in result.stderr


def test_a_manifest_without_a_train_split_verifies_and_indexes(photo_folder, tmp_path, capsys):
    out = tmp_path / "test-set"
    assert make(photo_folder, out, "--val-fraction", 1.0) == 0
    manifest_path = out / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    del manifest["splits"]["train"]
    manifest_path.write_text(json.dumps(manifest))
    assert run_cli("shards", "verify", out) == 0
    with pytest.raises(ManifestError, match="test set"):
        list_shards(out, "train")

    manifest_path.unlink()  # shards of another tool: val/ only
    (out / "train").rmdir()
    assert run_cli("shards", "index", out) == 0
    indexed = json.loads(manifest_path.read_text())
    assert indexed["splits"]["train"]["samples"] == 0 and indexed["splits"]["val"]["samples"] == len(KEPT)
    capsys.readouterr()


def test_skipped_files_are_listed_up_to_a_limit_per_reason(tmp_path):
    skipped = [(f"g{index:02d}.png", Skipped("grayscale", "residual chroma 0.0 < 10")) for index in range(25)]
    skipped.append(("bad.jpg", Skipped("unreadable", "OSError: truncated")))
    lines = skip_listing(skipped, tmp_path / "manifest.json")
    assert lines[0] == "skipped bad.jpg: unreadable (OSError: truncated)"
    assert lines[1:-1] == [f"skipped g{index:02d}.png: grayscale (residual chroma 0.0 < 10)"
                           for index in range(LISTED_PER_REASON)]
    assert lines[-1] == f"skipped 5 more grayscale images, all listed in {tmp_path / 'manifest.json'}"
    assert skip_counts(skipped) == "1 unreadable, 25 grayscale"


def test_nothing_kept_is_one_line_naming_the_reasons(photo_folder, tmp_path, capsys):
    source = tmp_path / "gray"
    source.mkdir()
    for name in GRAYSCALE:
        (source / name).write_bytes((photo_folder / name).read_bytes())
    assert make(source, tmp_path / "out") == 2
    error = capsys.readouterr().err
    lines = [line for line in error.splitlines() if line.startswith("shards make: ")]  # besides the progress bar
    assert len(lines) == 1 and "Traceback" not in error
    assert lines[0] == f"shards make: none of the 4 inputs was kept (4 grayscale; see --keep-gray); nothing written " \
                       f"to {tmp_path / 'out'}"
    assert not (tmp_path / "out" / "manifest.json").exists()
