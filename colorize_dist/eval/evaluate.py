"""Evaluate an exported generator on a shard set, or compare two evaluation cards.

Metrics are those of `colorize_dist.eval.metrics`; the card (`colorize_dist.eval.card`) fixes the protocol so two
cards compare only on the same images. Under `accelerate launch` every process scores its share; sums are reduced and
per-image values and Inception outputs gathered to rank 0, so N processes give the same numbers as one.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import yaml

from colorize_dist.data.make import sample_key
from colorize_dist.data.manifest import MANIFEST, read_manifest
from colorize_dist.data.reading import parse_index
from colorize_dist.data.store import open_store, redact
from colorize_dist.eval import card, fid
from colorize_dist.eval.names import LABELS
from colorize_dist.files import first_line

SAMPLE_IMAGES = 8  # rows of samples.png


def paired_comparison(first: str, second: str) -> tuple[dict[str, dict[str, float]] | None, str]:
    """A − B per metric with paired intervals from the cards' per-image files, when both score the same images
    in the same order; else None and why."""
    files = [card.card_file(path).with_name(card.PER_IMAGE_CSV) for path in (first, second)]
    missing = [str(file) for file in files if not file.is_file()]
    if missing:
        return None, f"{' and '.join(missing)} missing (cards of an older colorize-dist?)"
    (keys_a, values_a), (keys_b, values_b) = map(card.read_per_image, files)
    if keys_a != keys_b:
        return None, "the two cards scored different images"
    names = [name for name in values_a if name in values_b and name in LABELS and name not in card.MODEL_FREE]
    return card.paired_differences({name: values_a[name] for name in names},
                                   {name: values_b[name] for name in names}), ""


def split_keys(shards: str | Path, loader) -> list[str]:
    """Each image's sample key, in the split's order (the order of the gathered per-image values)."""
    store = open_store(shards)
    return [key.removeprefix("./") for shard in loader.split.shards for key in parse_index(shard, store).keys]


def read_groups(path: Path, keys: list[str]) -> dict[str, str]:
    """`--groups FILE`: key → group from a CSV (key,group rows, optionally under a header "key,group") or a JSON
    object; one line
    naming the file when it cannot be read or labels none of the split's images."""
    try:
        text = path.read_text(encoding="utf-8")
        if path.suffix.lower() == ".json":
            groups = json.loads(text)
            if not isinstance(groups, dict):
                raise ValueError("not a JSON object {key: group}")
        else:
            rows = [row for row in csv.reader(io.StringIO(text)) if len(row) >= 2]
            if rows and [cell.strip().lower() for cell in rows[0][:2]] == ["key", "group"]:
                rows = rows[1:]  # the header
            groups = {row[0].strip(): row[1].strip() for row in rows}
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"--groups {path} cannot be read ({first_line(exc)}); give a CSV of key,group rows or a "
                         "JSON object {key: group}") from None
    groups = {str(key): str(group) for key, group in groups.items()}
    known = set(keys)
    if not any(sample_key(key) in known for key in groups):
        raise ValueError(f"--groups {path}: none of its {len(groups)} keys names an image of the split (keys are "
                         f"sample keys such as {keys[0]!r}, or the image paths `shards make` was given)")
    return groups


def training_mean_ab(train_shards: str | Path) -> dict[str, object]:
    """The mean-ab baseline: the train split's mean (a, b) that `shards make` recorded, and where it comes from;
    or why there is none."""
    try:
        manifest = read_manifest(train_shards)
    except OSError as exc:
        return {"ab": None, "why": f"{first_line(exc)} (pass --train-shards)"}
    value = (manifest.get("mean_ab") or {}).get("train")
    if value is None:
        reason = ("has no train images" if manifest["splits"]["train"]["samples"] == 0 else
                  "records no mean ab (made before it did: make it again)")
        return {"ab": None, "why": f"the manifest of {redact(str(train_shards))} {reason}; pass --train-shards the "
                                   "set the model was trained on"}
    store = open_store(train_shards)
    return {"ab": [float(value[0]), float(value[1])], "from": f"{store.show(store.root / MANIFEST)} (train split)"}


def training_shards(given: Path, checkpoint: Path) -> str | None:
    """The run's data.shards, from RUN/config.yaml, when the checkpoint belongs to a run directory."""
    config = run_dir_of(given, checkpoint) / "config.yaml"
    if not config.is_file():
        return None
    shards = ((yaml.safe_load(config.read_text()) or {}).get("data") or {}).get("shards")
    return shards or None  # a directory or a URL (recorded with its credentials redacted: --train-shards then)


def resize_done(shards: str | Path, resolution: int, resize_filter: str) -> str:
    """What resized the images: nothing when the shards' images are already resolution² (their manifest says so),
    else the loader's filter."""
    if read_manifest(shards).get("resolution") == resolution:
        return f"none (the shards' images are {resolution}², the resolution; no filter ran)"
    return resize_filter


def inception_report(shards: str, fid_weights: str, fid_reference: str | None, images: int) -> dict:
    """How FID, KID and IS were computed, for metrics.json: N, weights, resize filter, JPEG, protocol."""
    image_format = read_manifest(shards).get("image_format")
    return {
        "images": images,
        **fid.weights_info(fid_weights),
        "resize": fid.RESIZE_FILTER,
        "jpeg_compressed": {"predictions": False,  # quantised to 8 bits, never JPEG-encoded
                            "ground_truth": {"jpg": True, "png": False}.get(image_format)},  # None: unknown
        "ground_truth_format": image_format,
        "reference": fid_reference,
        "kid": {"kernel": "(x·y/2048 + 1)^3", "subsets": fid.KID_SUBSETS,
                "subset_size": min(fid.KID_SUBSET_SIZE, images), "seed": fid.SEED},
        "inception_score": {"logits": "pool · W^T (no bias)", "splits": min(fid.IS_SPLITS, images),
                            "seed": fid.SEED},
        "warning": fid.sample_size_warning(images),
    }


def run_dir_of(given: Path, checkpoint: Path) -> Path:
    """The run directory when one was given (or the file is RUN/export/...), else the file's folder."""
    if given.is_dir():
        return given
    return checkpoint.parent.parent if checkpoint.parent.name == "export" else checkpoint.parent
