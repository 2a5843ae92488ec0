"""Shards from a user's images: square crops, a stable train/val split, pre-shuffled shards, DALI indexes.

Baseline JPEG is the default because DALI's `mixed` decoder sends it to the hardware JPEG decoder (progressive JPEG
to CUDA, PNG to the CPU). The split and the order within a split come from a hash of each relative path, so adding
images never moves old ones between splits and every shard is pre-shuffled for the loaders' shuffle window.
Transparent pixels are composited onto white, never the colour hidden under them. Residual chroma from 4 to 12 is
kept but listed: colour faces of muted colour meet toned prints there, and losing a colour face is the worse error.
The plan (`manifest.MAKE_PLAN`) stays in OUT until the manifest is in place, so an interrupted run's shards are
refused by `shards index` and the loaders.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import functools
import hashlib
import io
import multiprocessing
import multiprocessing.pool
import os
import re
import shutil
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageOps
from tabulate import tabulate
from tqdm import tqdm

from colorize_dist.data import contact_sheet
from colorize_dist.data.dali_index import IMAGE_EXTENSIONS, image_extension
from colorize_dist.data.images import (
    BACKGROUND,
    CHROMA_EDGE,
    CHROMA_SIDE,
    ab_sums,
    has_transparency,
    on_background,
    residual_chroma,
    to_8bit,
    to_rgb8,
)
from colorize_dist.data.manifest import MAKE_PLAN, MANIFEST, SPLITS, Shard, write_make_plan, write_manifest
from colorize_dist.data.options import (
    COLOUR_RESIDUAL_CHROMA,
    GRAY_RESIDUAL_CHROMA,
    ShardError,
    ShardOptions,
    SkipRules,
)
from colorize_dist.data.tar_writer import SplitWriter
from colorize_dist.files import first_line

CPU_DECODED = ("png", "webp")  # DALI's `mixed` decoder decodes these on the CPU
SPLIT_RULE = "val if int(sha1(relative path).hexdigest()[:16], 16) / 2**64 < val_fraction, else train"
SAMPLE_ORDER = "sha1 of the relative path (pre-shuffled: neighbours in a shard are unrelated images)"
CONTACT_SHEET = "contact_sheet.png"
UNREADABLE, TOO_SMALL, GRAYSCALE = "unreadable", "too small", "grayscale"
REVIEW = "review"  # kept, listed for review
SKIP_REASONS = (UNREADABLE, TOO_SMALL, GRAYSCALE)
LISTED_PER_REASON = 20  # skipped files named on the terminal per reason; the manifest lists every one


class Thumbnail(NamedTuple):
    """What the contact sheet shows of an image: its residual chroma and a small RGB copy (PNG bytes)."""

    residual_chroma: float
    png: bytes


class Stored(NamedTuple):
    """An input as stored in its shard."""

    extension: str
    data: bytes
    composited: bool = False  # it had transparent pixels, now composited onto BACKGROUND
    review: Thumbnail | None = None  # kept, but its residual chroma is in the band listed for review
    ab_sums: tuple[float, float, int] | None = None  # Σa, Σb over its pixels and their count (`images.ab_sums`)


class Skipped(NamedTuple):
    """An input left out of the set, and why."""

    reason: str  # one of SKIP_REASONS
    detail: str
    thumbnail: Thumbnail | None = None  # for the contact sheet (grayscale images)


Encoded = Stored | Skipped


def split_of(relative_path: str, val_fraction: float) -> str:
    """Train or val, from a hash of the path alone, so adding images never moves existing ones."""
    return "val" if path_hash(relative_path) / 2**64 < val_fraction else "train"


def path_hash(relative_path: str) -> int:
    return int(hashlib.sha1(relative_path.encode("utf-8")).hexdigest()[:16], 16)


def sample_key(relative_path: str) -> str:
    """A WebDataset key for an image path: no dots (they start the extension), no spaces or slashes."""
    return re.sub(r"[^A-Za-z0-9_-]", "_", relative_path)


def make_shards(source: Path, out: Path, *, resolution: int | None, options: ShardOptions,
                rules: SkipRules | None = None) -> list[tuple[str, Skipped]]:
    """Shards of the images in `source` (a folder, .zip or .tar), cropped to `resolution`² or, with
    `resolution=None`, stored as they are; `rules` say which to leave out. Returns the skipped inputs."""
    rules = rules or SkipRules()
    if resolution is not None and resolution < 1:
        raise ShardError(f"--resolution must be at least 1, got {resolution}")
    min_size = rules.minimum_side(resolution)
    encode = functools.partial(encode_image, resolution=resolution, image_format=options.image_format,
                               quality=options.quality, keep_gray=rules.keep_gray, min_size=min_size)
    gray_rule = ("kept (--keep-gray)" if rules.keep_gray else
                 f"skipped when residual chroma < {GRAY_RESIDUAL_CHROMA:g}, kept and listed for review from "
                 f"{GRAY_RESIDUAL_CHROMA:g} to {COLOUR_RESIDUAL_CHROMA:g} (99th percentile of the distance in ab "
                 f"from one tint that follows lightness, {CHROMA_EDGE:.0%} of each side left out, box-filtered to at "
                 f"most {CHROMA_SIDE} px a side)")
    with open_source(source) as (relative_paths, load):
        return write_shard_set(
            out, relative_paths, load, encode, options, source=str(source.resolve()), resolution=resolution,
            image_format="original" if resolution is None else options.image_format, grayscale=gray_rule,
            min_size=min_size, background=list(BACKGROUND),
        )


@contextlib.contextmanager
def open_source(source: Path) -> Iterator[tuple[list[str], Callable[[str], bytes]]]:
    """The image paths inside `source` (relative, '/'-separated) and a function reading one's bytes."""
    def is_image(name: str) -> bool:
        return "." in name and image_extension(name.rsplit(".", 1)[1]) and not Path(name).name.startswith(".")

    if source.is_dir():
        names = [p.relative_to(source).as_posix() for p in source.rglob("*") if p.is_file()]
        yield sorted(filter(is_image, names)), lambda name: (source / name).read_bytes()
    elif source.is_file() and zipfile.is_zipfile(source):
        with zipfile.ZipFile(source) as archive:
            names = [info.filename for info in archive.infolist() if not info.is_dir()]
            yield sorted(filter(is_image, names)), archive.read
    elif source.is_file() and tarfile.is_tarfile(source):
        try:
            tar = tarfile.open(source, "r:")  # noqa: SIM115 (closed below; uncompressed, as we seek)
        except tarfile.ReadError:
            raise ShardError(f"{source} is a compressed tar; decompress it first") from None
        with tar:
            members = {member.name: member for member in tar.getmembers() if member.isreg()}
            yield sorted(filter(is_image, members)), lambda name: tar.extractfile(members[name]).read()
    else:
        raise ShardError(f"{source} is not a folder, .zip or .tar of images ({', '.join(IMAGE_EXTENSIONS)})")


def encode_image(relative_path: str, data: bytes, *, resolution: int | None, image_format: str, quality: int,
                 keep_gray: bool = False, min_size: int = 0) -> Encoded:
    """Decode fully (catching truncated files), check size and colour, composite transparency, crop and resize,
    re-encode; runs in worker processes."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            if min(image.size) < min_size:
                return Skipped(TOO_SMALL, f"{image.width}x{image.height}, shorter side under --min-size {min_size}")
            upright = to_8bit(ImageOps.exif_transpose(image))
            transparent = has_transparency(upright)
            rgb = on_background(upright) if transparent else to_rgb8(upright)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        # PIL names the in-memory buffer it was given ("<_io.BytesIO object at 0x…>"): name the file instead.
        return Skipped(UNREADABLE, f"{type(exc).__name__}: "
                                   f"{re.sub(r'<_io.BytesIO object at 0x[0-9a-f]+>', relative_path, str(exc))}")
    review = None
    if not keep_gray and (chroma := residual_chroma(rgb)) < COLOUR_RESIDUAL_CHROMA:
        if chroma < GRAY_RESIDUAL_CHROMA:
            return Skipped(GRAYSCALE, f"residual chroma {chroma:.1f} < {GRAY_RESIDUAL_CHROMA:g}; --keep-gray keeps it",
                           thumbnail(rgb, chroma))
        review = thumbnail(rgb, chroma)
    if resolution is None:  # the file as it is, unless its transparent pixels would show their hidden colour
        stored = encode_array(rgb, "png", quality, transparent) if transparent else \
            Stored(relative_path.rsplit(".", 1)[1].lower(), data, ab_sums=ab_sums(rgb))
    else:
        square = ImageOps.fit(rgb, (resolution, resolution), method=Image.Resampling.LANCZOS)
        stored = encode_array(square, image_format, quality, transparent)
    return stored._replace(review=review)


def thumbnail(image: Image.Image, chroma: float) -> Thumbnail:
    small = image.copy()
    small.thumbnail((contact_sheet.THUMBNAIL, contact_sheet.THUMBNAIL), Image.Resampling.LANCZOS)
    buffer = io.BytesIO()
    small.save(buffer, format="PNG")
    return Thumbnail(chroma, buffer.getvalue())


def encode_array(image: Image.Image, image_format: str, quality: int, composited: bool = False) -> Stored:
    buffer = io.BytesIO()
    if image_format == "jpg":
        image.save(buffer, format="JPEG", quality=quality, progressive=False)  # baseline: the GPU's hardware decoder
    else:
        image.save(buffer, format="PNG")
    return Stored(image_format, buffer.getvalue(), composited, ab_sums=ab_sums(image))


def write_shard_set(out: Path, relative_paths: Sequence[str], load: Callable[[str], Any],
                    encode: Callable[[str, Any], Encoded], options: ShardOptions,
                    **manifest_info: Any) -> list[tuple[str, Skipped]]:
    """Encode every input in worker processes and write train/val shards and the manifest under `out`.

    `load` runs in this process (reading files, archive members); `encode(path, loaded)` in the workers
    (it stores `options.image_format`). Samples are written in hash order, so consecutive samples are
    unrelated. Returns the skipped inputs (path, why); raises ShardError for what the caller can fix.
    """
    if not relative_paths:
        raise ShardError("no images found in the source")
    keys = {}
    for path in relative_paths:
        if keys.setdefault(sample_key(path), path) != path:
            raise ShardError(f"{keys[sample_key(path)]} and {path} map to the same key; rename one")

    created = not out.exists()
    prepare_output(out, options.force)

    ordered = sorted(relative_paths, key=path_hash)  # pre-shuffled shards: neighbours are unrelated images
    writers = {split: SplitWriter(out, split, options.shard_size) for split in SPLITS}
    skipped: list[tuple[str, Skipped]] = []
    review: list[tuple[str, Thumbnail]] = []
    sheet: dict[str, list[tuple[str, float, bytes]]] = {GRAYSCALE: [], REVIEW: []}
    ab_totals = {split: np.zeros(3) for split in SPLITS}  # Σa, Σb, pixels of the kept images
    composited = 0
    workers = max(1, options.workers or os.cpu_count() or 1)
    done = 0
    try:
        write_make_plan(out, manifest_info.get("source", "SOURCE"), len(ordered))
        with multiprocessing.Pool(workers) as pool, tqdm(total=len(ordered), unit="img") as progress:
            for path, result in zip(ordered, _encode_all(pool, workers, ordered, load, encode), strict=True):
                if isinstance(result, Skipped):
                    skipped.append((path, result._replace(thumbnail=None)))
                    drawn = result.thumbnail
                    verdict = GRAYSCALE
                else:
                    split = split_of(path, options.val_fraction)
                    writers[split].write(sample_key(path), result.extension, result.data)
                    ab_totals[split] += result.ab_sums
                    composited += result.composited
                    drawn = result.review
                    verdict = REVIEW
                    if drawn is not None:
                        review.append((path, drawn))
                if drawn is not None and len(sheet[verdict]) < contact_sheet.MAX_PER_SECTION:
                    sheet[verdict].append((path, drawn.residual_chroma, drawn.png))
                done += 1
                progress.update()
        shards = {split: writer.close() for split, writer in writers.items()}
        if not any(shards.values()):
            (out / MAKE_PLAN).unlink()
            remove_empty_output(out, created)
            overrides = [option for reason, option in ((GRAYSCALE, "--keep-gray"), (TOO_SMALL, "--min-size"))
                         if any(why.reason == reason for _, why in skipped)]
            see = f"; see {' and '.join(overrides)}" if overrides else ""
            raise ShardError(f"none of the {len(ordered)} inputs was kept ({skip_counts(skipped)}{see}); nothing "
                             f"written to {out}")
        grayscale = sum(why.reason == GRAYSCALE for _, why in skipped)
        if grayscale or review:
            contact_sheet.write(out / CONTACT_SHEET, [
                (f"skipped as grayscale (residual chroma under {GRAY_RESIDUAL_CHROMA:g})", "skipped",
                 sheet[GRAYSCALE], grayscale),
                (f"kept for review (residual chroma {GRAY_RESIDUAL_CHROMA:g} to {COLOUR_RESIDUAL_CHROMA:g})", "kept",
                 sheet[REVIEW], len(review))])
        manifest = write_manifest(
            out, shards, **manifest_info, val_fraction=options.val_fraction, split_rule=SPLIT_RULE,
            sample_order=SAMPLE_ORDER, jpeg_quality=options.quality, transparent_on_background=composited,
            skipped=[{"file": path, "reason": why.reason, "detail": why.detail} for path, why in skipped],
            review=[{"file": path, "residual_chroma": round(drawn.residual_chroma, 2)} for path, drawn in review],
            mean_ab={split: [round(float(a / pixels), 4), round(float(b / pixels), 4)] if pixels else None
                     for split, (a, b, pixels) in ab_totals.items()},
            contact_sheet=CONTACT_SHEET if grayscale or review else None,
        )
        (out / MAKE_PLAN).unlink()  # the set is complete
    except OSError as exc:
        written = sum(writer.bytes_written + writer.partial_bytes for writer in writers.values())  # before abort
        for writer in writers.values():
            writer.abort()
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ShardError(_no_space(out, written, done, len(ordered))) from None
        raise ShardError(f"{first_line(exc)}; no manifest was written to {out}, so the partial set is never used"
                         ) from None
    print(tabulate([(split, manifest["splits"][split]["samples"], len(manifest["splits"][split]["shards"]),
                     out / split) for split in SPLITS], headers=("split", "images", "shards", "folder")))
    for note in decoder_notes(shards):
        print(f"note: {note}", file=sys.stderr)
    for line in skip_listing(skipped, out / MANIFEST) + review_listing(review, out / MANIFEST):
        print(line, file=sys.stderr)
    kept = len(ordered) - len(skipped)
    print(f"kept {kept} of {len(ordered)} images" + (f"; skipped {len(skipped)}: {skip_counts(skipped)}" if skipped
                                                     else "")
          + (f"; {composited} with transparency composited onto white" if composited else "")
          + (f"; {len(review)} kept for review (residual chroma {GRAY_RESIDUAL_CHROMA:g} to "
             f"{COLOUR_RESIDUAL_CHROMA:g}: muted colour, or a compressed toned print)" if review else "")
          + (f"; see {out / CONTACT_SHEET}" if grayscale or review else ""))
    return skipped


def review_listing(review: Sequence[tuple[str, Thumbnail]], manifest: Path) -> list[str]:
    """The files kept for review with their scores, LISTED_PER_REASON at most (the manifest has them all)."""
    lines = [f"review {path}: residual chroma {drawn.residual_chroma:.1f}, kept (colour faces of muted colour score "
             f"{GRAY_RESIDUAL_CHROMA:g} to {COLOUR_RESIDUAL_CHROMA:g}, and so do JPEGs of toned prints)"
             for path, drawn in review[:LISTED_PER_REASON]]
    if len(review) > LISTED_PER_REASON:
        lines.append(f"{len(review) - LISTED_PER_REASON} more images kept for review, all listed in {manifest}")
    return lines


def remove_empty_output(out: Path, created: bool) -> None:
    """Remove the empty split folders of a set that kept nothing, and `out` itself if this run created it, so
    that a retry starts as the first run did."""
    for split in SPLITS:
        shutil.rmtree(out / split, ignore_errors=True)
    if created:
        with contextlib.suppress(OSError):
            out.rmdir()


def skip_counts(skipped: Sequence[tuple[str, Skipped]]) -> str:
    """How many were skipped, per reason: "1 unreadable, 11 grayscale"."""
    counts = collections.Counter(why.reason for _, why in skipped)
    return ", ".join(f"{counts[reason]} {reason}" for reason in SKIP_REASONS if counts[reason])


def skip_listing(skipped: Sequence[tuple[str, Skipped]], manifest: Path) -> list[str]:
    """The skipped files with their reasons, LISTED_PER_REASON per reason at most (the manifest has them all)."""
    lines = []
    for reason in SKIP_REASONS:
        files = [(path, why.detail) for path, why in skipped if why.reason == reason]
        lines += [f"skipped {path}: {reason} ({detail})" for path, detail in files[:LISTED_PER_REASON]]
        if len(files) > LISTED_PER_REASON:
            lines.append(f"skipped {len(files) - LISTED_PER_REASON} more {reason} images, all listed in {manifest}")
    return lines


def _no_space(out: Path, written: int, done: int, total: int) -> str:
    """The one line for a full disk: where, how many bytes the shards of `done` inputs took (the unfinished shard's
    included), about how much the whole set needs."""
    free = shutil.disk_usage(out).free
    if written:
        used = (f"the shards of {done} of {total} images took {_size(written)}, the set needs about "
                f"{_size(written / max(done, 1) * total)} and {_size(free)} is free")
    else:
        used = f"{_size(free)} is free, too little to write the first shard of {total} images"
    return (f"no space left on the device holding {out}: {used}; free space or choose another OUT, then rerun with "
            "--force (no manifest was written: the partial set is never used)")


def _size(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024:
            return f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} TiB"


def decoder_notes(shards: dict[str, list[Shard]]) -> list[str]:
    """What the stored formats mean for GPU decoding with DALI (PNG on the CPU, progressive JPEG off the
    hardware decoder); empty for baseline JPEGs."""
    samples = [shard for split_shards in shards.values() for shard in split_shards]
    png = sum(map(_cpu_decoded_samples, samples))
    progressive = sum(shard.progressive for shard in samples)
    notes = []
    if png:
        notes.append(f"{png} images are stored as PNG (or WebP), which DALI decodes on the CPU even on a GPU "
                     "(`mixed`); the default --format jpg stores baseline JPEGs, which the GPU's hardware decoder "
                     "takes")
    if progressive:
        notes.append(f"{progressive} images are progressive JPEGs (kept as they were): the GPU's hardware JPEG "
                     "decoder skips them (CUDA decodes them, slower); drop --keep-original to store baseline JPEGs")
    return notes


def _cpu_decoded_samples(shard: Shard) -> int:
    """Samples stored in a format DALI's `mixed` decoder leaves to the CPU (PNG, WebP)."""
    index = shard.index_path.read_text() if shard.index_path.is_file() else ""
    return sum(line.split(" ", 1)[0].lower() in CPU_DECODED for line in index.splitlines()[1:])


def _encode_all(pool: multiprocessing.pool.Pool, workers: int, ordered: Sequence[str],
                load: Callable[[str], Any], encode: Callable[[str, Any], Encoded]) -> Iterator[Encoded]:
    """Results in input order; inputs are loaded a chunk at a time, so memory stays bounded."""
    chunk_size = 64 * workers
    for start in range(0, len(ordered), chunk_size):
        chunk = ordered[start:start + chunk_size]
        yield from pool.starmap(encode, [(path, load(path)) for path in chunk], chunksize=8)


def prepare_output(out: Path, force: bool) -> None:
    """Refuse to touch an existing non-empty `out` unless forced; then remove only our own files in it."""
    if out.exists() and not out.is_dir():
        raise ShardError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ShardError(f"{out} already exists; pass --force to replace its shards")
        (out / MANIFEST).unlink(missing_ok=True)  # first, so the old set reads as incomplete from now on
        (out / CONTACT_SHEET).unlink(missing_ok=True)
        for split in SPLITS:
            shutil.rmtree(out / split, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
