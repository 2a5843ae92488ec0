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

from colorize_dist.data import DataConfig, ManifestError, build_loader, contact_sheet
from colorize_dist.data.images import residual_chroma
from colorize_dist.data.make import CONTACT_SHEET, LISTED_PER_REASON, Skipped, skip_counts, skip_listing
from colorize_dist.data.manifest import list_shards
from colorize_dist.data.options import COLOUR_RESIDUAL_CHROMA, GRAY_RESIDUAL_CHROMA
from tests.data.helpers import run_cli
from tests.data.photos import (
    COLOUR_PHOTOS,
    FACE_CROPS,
    FAINT_TINT,
    MUTED,
    TINTS,
    as_jpeg,
    colour_in_centre,
    face,
    gray_with_strip,
    muted,
    photo,
    toned,
)
from tests.training.helpers import tiny_overrides, train_once

RESOLUTION = 48
HIDDEN = (0, 255, 0)  # the colour stored under transparent pixels
GRAYSCALE = {"gray.png": "L", "gray_as_rgb.jpg": "gray saved as RGB", "sepia.png": "toned", "la.png": "LA",
             "faint.png": "a faintly tinted print", "strip.png": "a gray face with a colour strip along an edge"}
TOO_SMALL = {"tiny.png": (2, 1), "small.png": (40, 20)}
REVIEW = {"sepia_q75.jpg": "a JPEG of a toned print", "muted.png": "a face at half its chroma"}
KEPT = {"colour.png", "portrait.jpg", "subject_on_gray.png", "palette.png", "rgba.png", *REVIEW}
INPUTS = len(GRAYSCALE) + len(TOO_SMALL) + len(KEPT)


@pytest.mark.parametrize(("side", "toned_jpeg_at_most"), [(512, 6.0), (256, 10.1)])
def test_residual_chroma_separates_colour_photos_from_gray_and_toned_prints(side, toned_jpeg_at_most):
    """The nine library photos (README, Data): colour 12 and more, so never listed for review; gray 0; toned
    prints skipped; their JPEGs (quality 75 and 50) at most 5.9 at 512 px and 10.0 at 256 px, kept for review at
    worst, never counted as colour; a colour subject on 5 % of a gray photo keeps it colour."""
    for name in COLOUR_PHOTOS:
        image = photo(name)
        image.thumbnail((side, side), Image.Resampling.LANCZOS)
        assert residual_chroma(image) >= COLOUR_RESIDUAL_CHROMA, name
        assert residual_chroma(image.convert("L")) < 0.01, name  # the kernel's rounding of a, b for gray
        for tint_name, tint in TINTS.items():
            assert residual_chroma(toned(image, tint)) < GRAY_RESIDUAL_CHROMA, (name, tint_name)
            for quality in (75, 50):
                assert residual_chroma(as_jpeg(toned(image, tint), quality)) <= toned_jpeg_at_most, (name, tint_name)
        if name != "hubble_deep_field":  # its centre is black sky: no colour to keep
            assert residual_chroma(colour_in_centre(image, 0.05)) >= COLOUR_RESIDUAL_CHROMA, name
    assert toned_jpeg_at_most < COLOUR_RESIDUAL_CHROMA


@pytest.fixture(scope="module")
def face_scores() -> dict[str, dict[str, float]]:
    """Residual chroma of the face crops at 128 px: muted colour (MUTED), toned prints, a strip along an edge."""
    scores: dict[str, dict[str, float]] = {}
    for name in FACE_CROPS:
        image = face(name, 128)
        scores[name] = {how: residual_chroma(muted(image, *args)) for how, args in MUTED.items()}
        for tint_name, tint in {**TINTS, "faint": FAINT_TINT, "gray": (1.0, 1.0, 1.0)}.items():
            scores[name][tint_name] = residual_chroma(toned(image, tint))
            scores[name][f"{tint_name} q75"] = residual_chroma(as_jpeg(toned(image, tint), 75))
        scores[name]["faint q90"] = residual_chroma(as_jpeg(toned(image, FAINT_TINT), 90))
        scores[name]["strip"] = residual_chroma(gray_with_strip(image, photo("coffee")))
    return scores


def test_colour_faces_of_muted_colour_are_kept(face_scores):
    """The README's face table, 128 px row: as shot 14.7 and more (kept, not listed); chroma scaled by 0.6 8.8,
    by 0.4 5.9, regraded warm or cool at 0.5 7.6 and more: kept and listed for review, never skipped."""
    def lowest(how):
        return min(scores[how] for scores in face_scores.values())
    assert lowest("as shot") == pytest.approx(14.7, abs=0.1) and lowest("as shot") >= COLOUR_RESIDUAL_CHROMA
    assert lowest("saturation 0.6") == pytest.approx(8.8, abs=0.1)
    assert lowest("saturation 0.4") == pytest.approx(5.9, abs=0.1)
    assert min(lowest("warm, saturation 0.5"), lowest("cool, saturation 0.5")) == pytest.approx(7.6, abs=0.1)
    assert min(lowest(how) for how in MUTED if how != "saturation 0.25") >= GRAY_RESIDUAL_CHROMA
    assert lowest("saturation 0.25") < GRAY_RESIDUAL_CHROMA  # a quarter of a face's chroma: gray to the rule


def test_toned_faces_are_skipped_and_their_jpegs_never_count_as_colour(face_scores):
    """Gray, sepia, cyanotype, yellowed and faintly tinted prints of the faces (0.9 at most), the faint tint as a
    JPEG of quality 90 (2.5 at most), a gray face with a strip of a colour photo along an edge (0): skipped. JPEGs
    of the strongly toned prints at quality 75 (10.1 at most): kept for review, never counted as colour."""
    def highest(*keys):
        return max(scores[key] for scores in face_scores.values() for key in keys)
    printed = ("sepia", "cyanotype", "yellowed paper", "faint", "gray")
    assert highest(*printed) == pytest.approx(0.9, abs=0.1)
    assert highest("faint q90") == pytest.approx(2.5, abs=0.1) and highest("faint q90") < GRAY_RESIDUAL_CHROMA
    assert highest("strip") < 0.01
    assert highest(*(f"{tint} q75" for tint in printed)) == pytest.approx(10.1, abs=0.1)
    assert highest(*(f"{tint} q75" for tint in printed)) < COLOUR_RESIDUAL_CHROMA


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
    toned(large, TINTS["sepia"]).save(root / "sepia.png")
    toned(large, TINTS["sepia"]).save(root / "sepia_q75.jpg", quality=75)
    portrait = face("astronaut face", 128)
    toned(portrait, FAINT_TINT).save(root / "faint.png")
    gray_with_strip(portrait, photo("coffee")).save(root / "strip.png")
    muted(face("astronaut skin", 128), 0.5).save(root / "muted.png")
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
    reviewed = {re.fullmatch(r"review (\S+): residual chroma [\d.]+, kept \(.*\)", line).group(1)
                for line in captured.err.splitlines() if line.startswith("review ")}
    assert reviewed == set(REVIEW)
    assert captured.out.splitlines()[-1] == (
        f"kept {len(KEPT)} of {INPUTS} images; skipped 8: 2 too small, 6 grayscale; 2 with transparency composited "
        "onto white; 2 kept for review (residual chroma 4 to 12: muted colour, or a compressed toned print); "
        f"see {out / CONTACT_SHEET}")
    manifest = json.loads((out / "manifest.json").read_text())
    assert {entry["file"]: entry["reason"] for entry in manifest["skipped"]} == expected
    details = {entry["file"]: entry["detail"] for entry in manifest["skipped"]}
    assert details["tiny.png"] == "2x1, shorter side under --min-size 24"
    assert details["small.png"] == "40x20, shorter side under --min-size 24"
    assert all(float(re.search(r"residual chroma ([\d.]+) <", details[name]).group(1)) < GRAY_RESIDUAL_CHROMA
               for name in GRAYSCALE)
    review = {entry["file"]: entry["residual_chroma"] for entry in manifest["review"]}
    assert set(review) == set(REVIEW)
    assert review["muted.png"] == pytest.approx(7.44, abs=0.01) and review["sepia_q75.jpg"] == pytest.approx(5.84,
                                                                                                             abs=0.01)
    assert manifest["min_size"] == RESOLUTION // 2 and manifest["background"] == [255, 255, 255]
    assert manifest["transparent_on_background"] == 2 and "residual chroma < 4, kept and listed for review from 4 " \
                                                           "to 12" in manifest["grayscale"]
    assert set(stored_images(out)) == {name.replace(".", "_") for name in KEPT}
    assert run_cli("shards", "verify", out) == 0

    assert manifest["contact_sheet"] == CONTACT_SHEET
    with Image.open(out / CONTACT_SHEET) as sheet:  # two sections of one row each: 6 skipped, 2 for review
        tile = contact_sheet.THUMBNAIL + contact_sheet.PADDING
        tile_height = tile + contact_sheet.CAPTION_LINES * contact_sheet.LINE_HEIGHT
        assert sheet.size == (contact_sheet.COLUMNS * tile + contact_sheet.PADDING,
                              2 * (contact_sheet.TITLE_HEIGHT + tile_height) + contact_sheet.PADDING)
        pixels = np.asarray(sheet.convert("RGB")).astype(int)
    second_row = contact_sheet.PADDING + 2 * contact_sheet.TITLE_HEIGHT + tile_height
    first_tiles = [pixels[top:top + contact_sheet.THUMBNAIL, left:left + contact_sheet.THUMBNAIL]
                   for top in (contact_sheet.PADDING + contact_sheet.TITLE_HEIGHT, second_row)
                   for left in (contact_sheet.PADDING,)]
    skipped_first, review_first = first_tiles
    assert np.ptp(skipped_first) > 50 and np.abs(np.diff(skipped_first, axis=2)).max() <= 3  # a gray photo
    assert np.abs(np.diff(review_first, axis=2)).max() > 10  # the lowest score for review: the sepia JPEG, in colour


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
    assert len(manifest["skipped"]) == INPUTS - len(kept)
    if "--keep-gray" in options:
        assert manifest["grayscale"] == "kept (--keep-gray)"
    assert capsys.readouterr().out.splitlines()[-1].startswith(f"kept {len(kept)} of {INPUTS} images")


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


def test_nothing_kept_is_one_line_naming_the_reasons_and_leaves_nothing(photo_folder, tmp_path, capsys):
    source = tmp_path / "gray"
    source.mkdir()
    for name in GRAYSCALE:
        (source / name).write_bytes((photo_folder / name).read_bytes())
    out = tmp_path / "out"
    for attempt in range(2):  # the retry is not refused: nothing was left behind
        assert make(source, out) == 2
        error = capsys.readouterr().err
        lines = [line for line in error.splitlines() if line.startswith("shards make: ")]  # besides the progress bar
        assert len(lines) == 1 and "Traceback" not in error
        assert lines[0] == (f"shards make: none of the {len(GRAYSCALE)} inputs was kept ({len(GRAYSCALE)} grayscale; "
                            f"see --keep-gray); nothing written to {out}"), attempt
        assert not out.exists()
    out.mkdir()  # an empty folder made by the user stays, empty
    assert make(source, out) == 2
    assert out.is_dir() and not any(out.iterdir())
