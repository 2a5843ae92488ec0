"""Shard writer, verify and index commands on real image formats, bad files and foreign shards."""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from colorize_dist.data import DataConfig, MissingShardsError, build_loader
from colorize_dist.data.dali_index import count_images, dali_index
from colorize_dist.data.images import is_progressive_jpeg
from colorize_dist.data.make import make_shards, sample_key, split_of
from colorize_dist.data.options import ShardError, ShardOptions
from colorize_dist.data.synth import synth_image, write_synthetic_shards
from tests.data.helpers import GOOD_IMAGES, run_cli
from tests.training.helpers import REPO


@pytest.fixture(scope="module")
def made_shards(image_folder, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("made") / "shards"
    assert run_cli("shards", "make", image_folder, out, "--resolution", 32, "--shard-size", 4,
                   "--val-fraction", 0.3, "--workers", 2, "--keep-gray") == 0
    return out


def gray_files(image_folder: Path) -> set[str]:
    """The images of `image_folder` stored as 8-bit grayscale ("L")."""
    gray = set()
    for path in image_folder.rglob("face*"):
        with Image.open(path) as image:
            if image.mode == "L":
                gray.add(path.relative_to(image_folder).as_posix())
    return gray


def tar_keys(directory: Path) -> dict[str, set[str]]:
    return {split: {key for tar in sorted((directory / split).glob("*.tar"))
                    for key in (sample["__key__"] for sample in wds.DataPipeline(
                        wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples()))}
            for split in ("train", "val")}


def test_make_counts_split_and_bad_files(made_shards, image_folder, capsys):
    manifest = json.loads((made_shards / "manifest.json").read_text())
    good = sorted(p.relative_to(image_folder).as_posix() for p in image_folder.rglob("face*"))
    assert len(good) == GOOD_IMAGES
    assert {entry["file"] for entry in manifest["skipped"]} == {"notes.jpg", "people/truncated.jpg"}
    expected = {split: {sample_key(path) for path in good if split_of(path, 0.3) == split}
                for split in ("train", "val")}
    assert expected["train"] and expected["val"]
    assert tar_keys(made_shards) == expected
    for split in ("train", "val"):
        entries = manifest["splits"][split]["shards"]
        assert manifest["splits"][split]["samples"] == len(expected[split])
        assert [entry["samples"] for entry in entries][:-1] == [4] * (len(entries) - 1)
        for entry in entries:
            tar = made_shards / entry["file"]
            assert (tar.with_suffix(".idx")).read_text() == dali_index(tar)
            assert count_images(dali_index(tar)) == entry["samples"]
    assert manifest["resolution"] == 32
    assert not list(made_shards.rglob("*.partial"))


def test_make_reports_skipped_files(image_folder, tmp_path, capsys):
    """Unreadable files and (by default) grayscale ones: each named with its reason, counted per reason."""
    gray = gray_files(image_folder)
    assert len(gray) == 2
    assert run_cli("shards", "make", image_folder, tmp_path / "out", "--resolution", 16, "--workers", 1) == 0
    captured = capsys.readouterr()
    listed = {line.split(": ")[0].removeprefix("skipped "): line.split(": ")[1].split(" (")[0]
              for line in captured.err.splitlines() if line.startswith("skipped ")}
    assert listed == {"notes.jpg": "unreadable", "people/truncated.jpg": "unreadable"} | dict.fromkeys(gray,
                                                                                                      "grayscale")
    assert captured.out.splitlines()[-1] == f"kept {GOOD_IMAGES - 2} of {GOOD_IMAGES + 2} images; skipped 4: " \
                                            f"2 unreadable, 2 grayscale; see {tmp_path / 'out' / 'contact_sheet.png'}"
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert {entry["file"]: entry["reason"] for entry in manifest["skipped"]} == listed
    assert manifest["splits"]["train"]["samples"] + manifest["splits"]["val"]["samples"] == GOOD_IMAGES - 2


def test_make_refuses_existing_out_without_force(made_shards, image_folder, tmp_path, capsys):
    out = tmp_path / "copy"
    shutil.copytree(made_shards, out)
    (out / "mine.txt").write_text("keep me")
    before = (out / "manifest.json").read_text()
    with pytest.raises(ShardError, match="already exists; pass --force"):
        make_shards(image_folder, out, resolution=16, options=ShardOptions(workers=1))
    assert run_cli("shards", "make", image_folder, out, "--resolution", 16) == 2
    assert capsys.readouterr().err == f"shards make: {out} already exists; pass --force to replace its shards\n"
    assert (out / "manifest.json").read_text() == before
    assert run_cli("shards", "make", image_folder, out, "--resolution", 16, "--workers", 1, "--force") == 0
    assert json.loads((out / "manifest.json").read_text())["resolution"] == 16
    assert (out / "mine.txt").read_text() == "keep me"


@pytest.mark.parametrize("options", [{"quality": 0}, {"shard_size": 0}, {"val_fraction": 1.5}, {"val_fraction": -0.1},
                                     {"image_format": "gif"}])
def test_bad_writer_options_raise_shard_error(options):
    with pytest.raises(ShardError) as error:
        ShardOptions(**options)
    assert isinstance(error.value, ValueError) and "\n" not in str(error.value)


@pytest.mark.parametrize("argv", [
    ("make", "{images}", "{out}", "--resolution", "16", "--quality", "0"),
    ("make", "{images}", "{out}"),
    ("make", "{out}/missing.zip", "{out}", "--resolution", "16"),
    ("make", "{images}", "{out}", "--resolution", "16", "--min-size", "-1"),
    ("make", "{images}", "{out}", "--resolution", "16", "--val-fraction", "1.5"),
    ("synth", "{out}", "--n", "0"),
    ("synth", "{out}", "--shard-size", "0"),
])
def test_commands_report_bad_options_in_one_line(argv, image_folder, tmp_path, capsys):
    argv = [word.format(images=image_folder, out=tmp_path / "out") for word in argv]
    assert run_cli("shards", *argv) == 2
    captured = capsys.readouterr()
    assert captured.err.startswith(f"shards {argv[0]}: ") and captured.err.count("\n") == 1
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_write_synthetic_shards_keyword_api(tmp_path):
    out = write_synthetic_shards(tmp_path / "synth", 6, 16, options=ShardOptions(image_format="png", shard_size=4,
                                                                                 val_fraction=0.0, workers=1))
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["image_format"] == "png" and manifest["resolution"] == 16
    assert [entry["samples"] for entry in manifest["splits"]["train"]["shards"]] == [4, 2]
    assert manifest["splits"]["val"]["samples"] == 0
    with pytest.raises(ShardError, match="--n and --resolution must be at least 1"):
        write_synthetic_shards(tmp_path / "none", 0, 16)


def test_split_does_not_move_old_images_when_adding(image_folder, made_shards, tmp_path):
    grown = tmp_path / "grown"
    shutil.copytree(image_folder, grown)
    for index in range(6):
        Image.fromarray(np.full((20, 20, 3), 40 * index, np.uint8)).save(grown / f"new{index}.png")
    out = tmp_path / "out"
    assert run_cli("shards", "make", grown, out, "--resolution", 32, "--val-fraction", 0.3, "--workers", 1,
                   "--keep-gray") == 0
    old, new = tar_keys(made_shards), tar_keys(out)
    for split in ("train", "val"):
        assert old[split] <= new[split]


def test_zip_and_tar_sources_give_the_same_samples(image_folder, made_shards, tmp_path):
    archive = tmp_path / "images.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for path in sorted(image_folder.rglob("*")):
            if path.is_file():
                zf.write(path, path.relative_to(image_folder).as_posix())
    with tarfile.open(tmp_path / "images.tar", "w") as tf:
        for path in sorted(image_folder.rglob("*")):
            if path.is_file():
                tf.add(path, path.relative_to(image_folder).as_posix())
    for source in (archive, tmp_path / "images.tar"):
        out = tmp_path / f"from-{source.suffix[1:]}"
        args = ("shards", "make", source, out, "--resolution", 32, "--val-fraction", 0.3, "--workers", 1, "--keep-gray")
        assert run_cli(*args) == 0
        assert tar_keys(out) == tar_keys(made_shards)
        assert (out / "train" / "train-000000.tar").read_bytes().count(b"JFIF") > 0


def test_verify_passes_then_names_a_corrupted_tar(made_shards, tmp_path, capsys):
    assert run_cli("shards", "verify", made_shards) == 0
    assert "OK" in capsys.readouterr().out

    out = tmp_path / "corrupt"
    shutil.copytree(made_shards, out)
    tar = out / "train" / "train-000001.tar"
    _, offset, size, name = (tar.with_suffix(".idx")).read_text().splitlines()[2].split(" ")
    data = bytearray(tar.read_bytes())
    data[int(offset) + 20: int(offset) + int(size) - 20] = bytes(int(size) - 40)  # zero the image data
    tar.write_bytes(bytes(data))
    assert run_cli("shards", "verify", out) == 1
    report = capsys.readouterr().out
    assert f"{tar}: sample {name} does not match its CRC-32 in manifest.json" in report

    tar.write_bytes(bytes(data[: len(data) // 2]))  # truncated tar
    assert run_cli("shards", "verify", out) == 1
    report = capsys.readouterr().out
    assert f"PROBLEM {tar}: not a readable tar" in report


def test_verify_names_count_and_index_mismatches(made_shards, tmp_path, capsys):
    out = tmp_path / "edited"
    shutil.copytree(made_shards, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["splits"]["val"]["shards"][0]["samples"] += 1
    (out / "manifest.json").write_text(json.dumps(manifest))
    index = out / "train" / "train-000000.idx"
    index.write_text(index.read_text().replace("jpg ", "png ", 1))
    assert run_cli("shards", "verify", out) == 1
    report = capsys.readouterr().out
    assert f"{out / 'val' / 'val-000000.tar'}: 3 images, manifest.json says 4" in report
    assert f"{index}: does not match" in report


def test_reindexing_keeps_what_make_recorded_and_the_mean_ab_only_of_the_same_bytes(made_shards, tmp_path, capsys):
    out = tmp_path / "reindexed"
    shutil.copytree(made_shards, out)
    made = json.loads((out / "manifest.json").read_text())
    assert made["mean_ab"]["train"] is not None and "review" in made
    assert run_cli("shards", "index", out, "--force") == 0
    same = json.loads((out / "manifest.json").read_text())
    assert {key: same.get(key) for key in ("mean_ab", "review", "contact_sheet", "skipped")} == \
        {key: made.get(key) for key in ("mean_ab", "review", "contact_sheet", "skipped")}
    last = sorted((out / "train").glob("*.tar"))[-1]
    last.unlink()
    last.with_suffix(".idx").unlink()
    assert run_cli("shards", "index", out, "--force") == 0
    fewer = json.loads((out / "manifest.json").read_text())
    assert "mean_ab" not in fewer and fewer["review"] == made["review"]  # other bytes: no baseline of the old ones
    capsys.readouterr()


def test_foreign_shards_are_indexed(tmp_path, capsys):
    """Shards from webdataset.ShardWriter and GNU tar (directories, ./ prefixes, extra components)."""
    train, val = tmp_path / "set" / "train", tmp_path / "set" / "val"
    train.mkdir(parents=True)
    val.mkdir()
    with wds.ShardWriter(str(train / "wds-%03d.tar"), maxcount=3, verbose=0) as writer:
        for index in range(5):
            buffer = io.BytesIO()
            Image.fromarray(np.full((8, 8, 3), index, np.uint8)).save(buffer, format="PNG")
            writer.write({"__key__": f"img{index}", "png": buffer.getvalue(), "json": b"{}"})
    files = tmp_path / "files"
    (files / "sub").mkdir(parents=True)
    for index in range(3):
        Image.fromarray(np.full((8, 8, 3), 10 + index, np.uint8)).save(files / "sub" / f"g{index}.jpeg")
    (files / "sub" / "caption.txt").write_text("no image in this sample")
    subprocess.run(["tar", "-cf", str(val / "gnu.tar"), "-C", str(files), "."], check=True)
    assert run_cli("shards", "index", tmp_path / "set") == 0
    manifest = json.loads((tmp_path / "set" / "manifest.json").read_text())
    assert [entry["samples"] for entry in manifest["splits"]["train"]["shards"]] == [3, 2]
    assert manifest["splits"]["val"]["samples"] == 3
    assert run_cli("shards", "verify", tmp_path / "set") == 0
    capsys.readouterr()
    for backend in ("dali", "reference") if importlib.util.find_spec("nvidia.dali") else ("reference",):
        cfg = DataConfig(shards=str(tmp_path / "set"), resolution=8, backend=backend, num_threads=1)
        for split, expected in (("train", 5), ("val", 3)):  # read through the index, tar headers checked
            with build_loader(cfg, split, batch_size=2) as loader:
                assert sum(int(batch.valid.sum()) for batch in loader.epoch(0)) == expected
    assert run_cli("shards", "index", tmp_path / "set") == 2
    manifest_path = tmp_path / "set" / "manifest.json"
    assert capsys.readouterr().err == (f"shards index: {manifest_path} exists; pass --force to replace it, or "
                                       "--repair to rewrite missing or stale .idx files\n")


# ---------------------------------------------------------------- formats for GPU decoding, bit depth

def test_make_stores_baseline_jpegs_and_says_what_png_and_progressive_mean_on_a_gpu(image_folder, tmp_path,
                                                                                    capsys):
    out = tmp_path / "jpeg"
    assert run_cli("shards", "make", image_folder, out, "--resolution", 16, "--workers", 1) == 0
    assert "note:" not in capsys.readouterr().err
    for tar in out.rglob("*.tar"):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples()):
            assert not is_progressive_jpeg(sample["jpg"])

    assert run_cli("shards", "make", image_folder, tmp_path / "png", "--resolution", 16, "--format", "png",
                   "--workers", 1, "--keep-gray") == 0
    assert f"note: {GOOD_IMAGES} images are stored as PNG (or WebP), which DALI decodes on the CPU even on a GPU" in \
        capsys.readouterr().err

    progressive = tmp_path / "progressive"
    progressive.mkdir()
    for index in range(3):
        Image.fromarray(synth_image(index, 24)).save(progressive / f"p{index}.jpg", progressive=True)
    assert run_cli("shards", "make", progressive, tmp_path / "kept", "--keep-original", "--workers", 1) == 0
    assert "note: 3 images are progressive JPEGs (kept as they were): the GPU's hardware JPEG decoder skips them" in \
        capsys.readouterr().err
    manifest = json.loads((tmp_path / "kept" / "manifest.json").read_text())
    assert sum(entry["progressive_jpegs"] for split in manifest["splits"].values() for entry in split["shards"]) == 3


def write_png16(path: Path, pixels: np.ndarray) -> None:
    """A 16-bit PNG (gray (H, W) or RGB (H, W, 3)), written by hand: Pillow writes 16-bit gray only."""
    import struct

    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.astype(">u2").reshape(height, -1).tobytes()
    stride = len(rows) // height
    raw = b"".join(b"\0" + rows[row * stride:(row + 1) * stride] for row in range(height))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0,
                                                                        0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def test_sixteen_bit_images_keep_their_values(tmp_path):
    """16-bit gray used to become pure white (Pillow clips I;16 at 255 on convert("RGB")); RGB must stay RGB."""
    source = tmp_path / "src"
    source.mkdir()
    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    write_png16(source / "gray.png", ramp)
    rgb = np.zeros((16, 16, 3), np.uint16)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 50000, 25000, 1000
    write_png16(source / "rgb.png", rgb)
    out = tmp_path / "out"
    assert run_cli("shards", "make", source, out, "--resolution", 16, "--format", "png", "--val-fraction", 0,
                   "--workers", 1, "--keep-gray") == 0
    stored = {sample["__key__"]: np.asarray(Image.open(io.BytesIO(sample["png"])))
              for sample in wds.DataPipeline(wds.SimpleShardList([str(out / "train" / "train-000000.tar")]),
                                             wds.tarfile_to_samples())}
    gray = stored["gray_png"]
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(gray[..., 0], expected) and np.array_equal(gray[..., 1], expected)
    assert gray.min() == 0 and gray.max() == 255
    assert np.abs(stored["rgb_png"][0, 0].astype(int) - [194, 97, 4]).max() <= 1  # 50000/257, 25000/257, 1000/257


# ---------------------------------------------------------------- a full disk

@pytest.fixture
def small_tmpfs(tmp_path: Path):
    """A 256 KiB tmpfs (we run as root here); skipped where mounting is not permitted, always unmounted."""
    mount = tmp_path / "small"
    mount.mkdir()
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount)], capture_output=True,
                            text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip() or result.returncode}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


@pytest.mark.parametrize("shard_size", [8, 1000])  # 1000: the disk fills before the first shard is complete
def test_a_full_disk_ends_make_in_one_line_and_leaves_no_set_that_looks_complete(shard_size, small_tmpfs, tmp_path,
                                                                                 capsys):
    """The line reports the bytes the shards took, the unfinished one's included (before: "took 0.0 B, the set needs
    about 0.0 B" when no shard was complete), and `shards index` refuses what is left."""
    source = tmp_path / "noise"
    source.mkdir()
    rng = np.random.default_rng(0)
    for index in range(64):  # incompressible: about 12 KiB each as JPEG, 3× the tmpfs in all
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source / f"n{index:02d}.png")
    out = small_tmpfs / "shards"
    started = time.perf_counter()
    assert run_cli("shards", "make", source, out, "--resolution", 64, "--shard-size", shard_size, "--workers", 1) == 2
    assert time.perf_counter() - started < 60
    error = capsys.readouterr().err.splitlines()
    lines = [line for line in error if line.startswith("shards make: ")]
    assert len(lines) == 1 and not any("Traceback" in line or "closed file" in line for line in error)
    assert re.fullmatch(rf"shards make: no space left on the device holding {re.escape(str(out))}: the shards of "
                        r"\d+ of 64 images took [1-9][\d.]+ KiB, the set needs about [1-9][\d.]+ KiB and [\d.]+ KiB "
                        r"is free; free space or choose another OUT, then rerun with --force \(no manifest was "
                        r"written: the partial set is never used\)", lines[0]), lines[0]
    assert not (out / "manifest.json").exists() and not list(out.rglob("*.partial"))
    assert all(tar.with_suffix(".idx").is_file() for tar in out.rglob("*.tar"))  # complete shards only
    interrupted = (rf"manifest.json is missing: a `shards make` into {re.escape(str(out))} did not finish \(\d+ "
                   r"images in complete shards; 64 inputs planned")
    with pytest.raises(MissingShardsError, match=interrupted):
        build_loader(DataConfig(shards=str(out), resolution=64, backend="reference"), "train", batch_size=4)
    assert run_cli("shards", "index", out) == 2
    assert "or pass --force to index the complete shards alone" in capsys.readouterr().err


# ---------------------------------------------------------------- an interrupted make

def timed_cli(capsys, *argv: str | Path) -> tuple[int, str, float]:
    """`colorize-dist ...` in this process: exit status, the one `<command>: ` error line (or ""), seconds."""
    capsys.readouterr()
    started = time.perf_counter()
    status = run_cli(*argv)
    seconds = time.perf_counter() - started
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.startswith(f"{argv[0]} {argv[1]}: ")]
    assert len(lines) <= 1 and "Traceback" not in stderr, stderr
    return status, lines[0] if lines else stderr, seconds


def test_a_killed_make_is_refused_by_index_and_verify_says_remake(tmp_path, capsys):
    """SIGKILL mid-way leaves complete shards, a `.partial` one and the plan: `index` refuses them (they are part of a
    set), `verify` and the loaders say to remake it, `index --force` adopts the complete shards knowingly.
    Before: `index` wrote a manifest of the shards that happened to be complete and exited 0."""
    source = tmp_path / "noise"
    source.mkdir()
    rng = np.random.default_rng(0)
    for index in range(120):  # incompressible, so that encoding takes long enough to kill mid-way
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(source / f"n{index:03d}.png")
    out = tmp_path / "shards"
    make = subprocess.Popen([sys.executable, "-m", "colorize_dist", "shards", "make", str(source), str(out),
                             "--resolution", "64", "--shard-size", "4", "--val-fraction", "0.1", "--workers", "1",
                             "--quality", "100"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=REPO,
                            env=os.environ | {"PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not list(out.glob("train/*.tar")) and make.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        os.killpg(make.pid, signal.SIGKILL)
        make.wait()
    assert make.returncode == -signal.SIGKILL, "the make finished before it could be killed"
    complete = sum(count_images(tar.with_suffix(".idx").read_text()) for tar in out.rglob("*.tar"))
    assert 0 < complete < 120 and list(out.rglob("*.partial"))

    status, line, seconds = timed_cli(capsys, "shards", "index", out)
    assert status == 2 and seconds < 30, line
    assert re.fullmatch(rf"shards index: a `shards make` into {re.escape(str(out))} did not finish \({complete} images "
                        r"in complete shards; 120 inputs planned in make-in-progress.json; \d+ unfinished shard\(s\): "
                        rf".*\); remake the set with `colorize-dist shards make {re.escape(str(source))} "
                        rf"{re.escape(str(out))} ... --force` \(its options as before\), or pass --force to index the "
                        r"complete shards alone", line), line
    assert not (out / "manifest.json").exists()

    status, line, seconds = timed_cli(capsys, "shards", "verify", out)
    assert status == 2 and seconds < 30 and "shards index" not in line, line
    assert line.startswith(f"shards verify: {out / 'manifest.json'} is missing: a `shards make` into {out} did not "
                           f"finish") and f"shards make {source} {out} ... --force" in line
    with pytest.raises(MissingShardsError, match="did not finish"):
        build_loader(DataConfig(shards=str(out), resolution=64, backend="reference"), "train", batch_size=4)

    status, stderr, _ = timed_cli(capsys, "shards", "index", out, "--force")
    assert status == 0 and f"note: adopted the {complete} images of an unfinished `shards make` (--force)" in stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert sum(split["samples"] for split in manifest["splits"].values()) == complete
    assert not list(out.rglob("*.partial")) and not (out / "make-in-progress.json").exists()
    assert run_cli("shards", "verify", out) == 0
