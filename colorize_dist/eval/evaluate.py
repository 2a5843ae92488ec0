"""Evaluate an exported generator on a shard set, or compare two evaluation cards.

Metrics are those of `colorize_dist.eval.metrics`; the card (`colorize_dist.eval.card`) fixes the protocol so two
cards compare only on the same images. Under `accelerate launch` every process scores its share; sums are reduced and
per-image values and Inception outputs gathered to rank 0, so N processes give the same numbers as one.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from accelerate import PartialState

from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.make import sample_key
from colorize_dist.data.manifest import MANIFEST, read_manifest
from colorize_dist.data.reading import parse_index
from colorize_dist.data.store import open_store, redact
from colorize_dist.errors import UserError
from colorize_dist.eval import card, fid
from colorize_dist.eval.lpips import LPIPS_NET, lpips_weights_path
from colorize_dist.eval.metrics import evaluate
from colorize_dist.eval.names import LABELS, MIN_STRATUM_IMAGES
from colorize_dist.eval.samples import sample_grid, save_grid
from colorize_dist.files import atomic_write, first_line, sha256_of, writable_directory
from colorize_dist.models.export import load_generator, resolve_checkpoint

SAMPLE_IMAGES = 8  # rows of samples.png


@dataclass(frozen=True)
class EvaluationFiles:
    """What one evaluation wrote, and its card (for the tables the command line prints)."""

    images: int
    card: dict
    metrics_json: Path
    card_json: Path
    card_md: Path
    per_image_csv: Path
    samples_png: Path


def evaluate_checkpoint(checkpoint: str | Path, shards: str, *, split: str, out: Path | None, batch_size: int,
                        backend: str, cpu: bool, fid_weights: str | None = None, fid_reference: str | None = None,
                        min_fid_images: int = fid.MIN_IMAGES, lpips_weights: str | None = None,
                        train_shards: str | Path | None = None, groups: Path | None = None,
                        skin_region: str = "face", min_stratum_images: int = MIN_STRATUM_IMAGES,
                        ) -> EvaluationFiles | None:
    """Score an exported generator (or a run directory's best export) on `shards`' `split` and write metrics.json,
    the card, per_image.csv and samples.png to `out` (default RUN/eval). Every process of the launch takes its
    share; the main one writes and gets what it wrote, the others None. Bad input is a UserError of one line."""
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=cpu or not torch.cuda.is_available())
    try:
        exported = resolve_checkpoint(checkpoint)
        out = writable_directory(out or run_dir_of(Path(checkpoint), exported) / "eval",
                                 "--out" if out else "eval's output folder")  # before an hour of scoring
        generator, generator_cfg, resolution = load_generator(exported, device=state.device)
        cfg = DataConfig(shards=shards, resolution=resolution, backend=backend,
                         num_threads=max(1, min(4, (os.cpu_count() or 1) // state.num_processes)))
        loader = build_loader(cfg, split, batch_size=batch_size, rank=state.process_index,
                              world_size=state.num_processes, device=state.device, augment=False)
        images = loader.samples
        if fid_weights is not None and images < min_fid_images:
            raise ValueError(f"FID/KID/IS need at least {min_fid_images:,} images (--min-fid-images), the "
                             f"{split} split has {images:,}; score a larger split or leave out --fid-weights")
        keys = split_keys(shards, loader)
        labels = read_groups(groups, keys) if groups is not None else None
        mean_ab = training_mean_ab(train_shards or training_shards(Path(checkpoint), exported) or shards)
        evaluation = evaluate(generator, loader, device=state.device, fid_weights=fid_weights,
                              fid_reference=fid_reference, lpips_weights=lpips_weights,
                              fid_standard_error=fid_weights is not None, mean_ab=mean_ab.get("ab"),
                              skin_region=skin_region, progress=state.is_main_process)
    except (OSError, ValueError) as exc:  # UserErrors among them, and the files' own errors
        raise UserError(first_line(exc)) from exc
    written = None
    if state.is_main_process:
        metrics = evaluation.metrics
        report = {"checkpoint": str(exported), "shards": redact(str(shards)), "split": split,
                  "images": images, "resolution": resolution, "processes": state.num_processes, "metrics": metrics,
                  "delta_e": "CIEDE2000 (k_L = k_C = k_H = 1), mean over pixels, then over images"}
        if lpips_weights is not None:
            report["lpips"] = {"net": LPIPS_NET, "version": "0.1 (torchmetrics' linear layers)",
                               "weights": str(lpips_weights_path(lpips_weights).resolve())}
        if fid_weights is not None:
            report["inception"] = inception_report(shards, fid_weights, fid_reference, images)
        atomic_write(out / "metrics.json", json.dumps(report, indent=2, ensure_ascii=False) + "\n")
        stratified = (card.Strata.from_groups(keys, labels) if labels is not None
                      else card.Strata.from_ita(evaluation.ita))
        summary = card.summarise(evaluation.per_image, stratified, min_stratum_images, evaluation.baselines)
        summary["skin_estimate"] = {"region": skin_region,
                                    "pixels_median": float(np.median(evaluation.skin["pixels"])),
                                    "fraction_median": float(np.median(evaluation.skin["fraction"])),
                                    "undetermined": int(np.isnan(evaluation.ita).sum())}
        card.write_per_image(out / card.PER_IMAGE_CSV, keys, {
            "stratum": stratified.labels, "ita": evaluation.ita, "skin_pixels": evaluation.skin["pixels"],
            "skin_fraction": evaluation.skin["fraction"], **evaluation.per_image,
            **{f"{baseline}:{name}": values for baseline, scores in evaluation.baselines.items()
               for name, values in scores.items()}})
        evaluation_card = card.build_card(
            protocol=card.protocol(shards=shards, split=split, images=images, resolution=resolution,
                                   resize_filter=resize_done(shards, resolution, loader.resize_filter),
                                   metrics=list(evaluation.per_image), lpips_weights=lpips_weights,
                                   fid_weights=fid_weights, fid_reference=fid_reference,
                                   min_stratum_images=min_stratum_images, skin_region=skin_region,
                                   groups=groups),
            summary=summary, baselines={"gray": {"ab": [0.0, 0.0]}, "mean_ab": mean_ab},
            metrics=metrics, fid_se=evaluation.fid_se,
            model={"checkpoint": str(exported), "sha256": sha256_of(exported),
                   "generator_config": dataclasses.asdict(generator_cfg)},
            run={"processes": state.num_processes, "device": str(state.device), "loader": loader.describe(),
                 "batch_size": batch_size},
            warnings=[warning] if fid_weights and (warning := fid.sample_size_warning(images)) else [])
        card_json, card_md = card.write_card(evaluation_card, out)
        save_grid(sample_grid(generator, next(loader.epoch(0)), max_images=SAMPLE_IMAGES), out / "samples.png")
        written = EvaluationFiles(images=images, card=evaluation_card, metrics_json=out / "metrics.json",
                                  card_json=card_json, card_md=card_md, per_image_csv=out / card.PER_IMAGE_CSV,
                                  samples_png=out / "samples.png")
    state.wait_for_everyone()
    return written


def compare_cards(first: str, second: str) -> tuple[str, str | None]:
    """Two cards side by side (A − B, with paired intervals when both scored the same images), and why there are
    no paired intervals (None when there are); a UserError naming the first difference if their protocols differ."""
    cards = card.load_card(first), card.load_card(second)
    difference = card.first_difference(*cards)
    if difference is not None:
        raise UserError(f"the cards' protocols differ at {difference}; their numbers are not comparable: evaluate "
                        "both with the same shard set, split, resolution, metrics and weights")
    paired, why = paired_comparison(first, second)
    return card.comparison(*cards, names=(first, second), paired=paired), None if paired is not None else why


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
