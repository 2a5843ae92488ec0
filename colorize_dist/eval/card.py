"""The evaluation card: what `colorize-dist eval` measured, how, with what uncertainty, and for whom.

`RUN/eval/card.json` (for programs) and `card.md` (for people) hold

- the protocol, which fixes what the numbers mean: the shard set (its manifest's SHA-256), the split and its
  number of images, the resolution and resize rule, the metrics and their implementations (library versions,
  weight files' SHA-256), the FID reference statistics' SHA-256, and every seed and resampling count;
- the model (file, SHA-256, config) and the run (processes, device, loader), which the protocol leaves out:
  the numbers do not depend on them beyond float rounding;
- each per-image metric's mean with its 95 % bootstrap interval (`intervals`); FID with its jackknife
  standard error, KID and IS with their spread over subsets and splits (`fid`);
- the model minus each baseline (gray, the training set's mean ab) on the same images, with paired intervals;
- the same per skin-tone stratum (ITA of the ground truth's skin in the face region, `strata`) or per users'
  group (`--groups`) with its count, and per metric the largest gap between two strata of at least
  `min_stratum_images` images (every such stratum, "undetermined" included; the others listed with why), with
  the interval of that difference.

`colorize-dist eval --compare A B` prints two cards side by side, and refuses (one line, exit status 2) when
their protocols differ, naming the first field that does: numbers from different protocols are not comparable.
"""

from __future__ import annotations

import contextlib
import csv
import datetime
import importlib.metadata
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tabulate import tabulate

from colorize_dist.data.augment import EVALUATION_CROP
from colorize_dist.data.make import sample_key
from colorize_dist.data.manifest import manifest_sha256
from colorize_dist.errors import UserError
from colorize_dist.eval import fid, intervals, strata
from colorize_dist.eval.lpips import LPIPS_NET
from colorize_dist.eval.names import DIRECTION, LABELS, LPIPS_METRICS, MIN_STRATUM_IMAGES, REGIONS
from colorize_dist.files import atomic_write, sha256_of

FORMAT = "colorize_dist.eval_card/2"
PER_IMAGE_CSV = "per_image.csv"
CARD_JSON, CARD_MD = "card.json", "card.md"
SPREAD_LABELS = {"fid": "jackknife SE", "kid": f"std over {fid.KID_SUBSETS} subsets",
                 "inception_score": f"std over {fid.IS_SPLITS} splits"}


class CardError(UserError, ValueError):
    """A card that cannot be read or compared; the message is one line naming the file or the field."""


def protocol(*, shards: str | Path, split: str, images: int, resolution: int, resize_filter: str, metrics: list[str],
             lpips_weights: str | Path | None, fid_weights: str | Path | None, fid_reference: str | Path | None,
             min_stratum_images: int, skin_region: str = "face", groups: str | Path | None = None) -> dict[str, Any]:
    """The fields two evaluations must share for their numbers to be comparable (FID's reference after it is
    written). `resize_filter`: what resized the images (or that nothing did); `groups`: the users' group labels
    that replace the skin-tone strata."""
    implementations: dict[str, Any] = {
        "colorize_dist": _version("colorize-dist"),
        "psnr_ssim": f"torchmetrics {_version('torchmetrics')} functional, float64; SSIM over the valid windows",
        "delta_e": "CIEDE2000 (Sharma et al. 2005; k_L = k_C = k_H = 1), colorize_dist.eval.metrics",
    }
    inception: dict[str, Any] | None = None
    if LPIPS_METRICS[0] in metrics:
        implementations["lpips"] = {"implementation": f"torchmetrics {_version('torchmetrics')} LPIPS v0.1",
                                    "net": LPIPS_NET, "weights_sha256": sha256_of(Path(lpips_weights))}
    if fid_weights is not None:
        inception = {
            "implementation": f"pytorch-fid {_version('pytorch-fid')} FID Inception",
            "weights_sha256": fid.weights_info(fid_weights)["weights_sha256"],
            "resize": fid.RESIZE_FILTER,
            "reference_sha256": sha256_of(Path(fid_reference)) if fid_reference is not None else None,
            "fid_standard_error": {"method": fid.FID_SE_METHOD, "groups": fid.JACKKNIFE_GROUPS, "seed": fid.SEED},
            "kid": {"subsets": fid.KID_SUBSETS, "subset_size": min(fid.KID_SUBSET_SIZE, images), "seed": fid.SEED},
            "inception_score": {"splits": min(fid.IS_SPLITS, images), "seed": fid.SEED},
        }
    return {
        "format": FORMAT,
        "shards": {"manifest_sha256": manifest_sha256(shards), "split": split, "images": images},
        "images": {"resolution": resolution, "crop": EVALUATION_CROP, "resize": resize_filter},
        "metrics": list(metrics),
        "implementations": implementations,
        "inception": inception,
        "intervals": {"method": intervals.METHOD, "confidence": intervals.CONFIDENCE,
                      "resamples": intervals.RESAMPLES, "seed": intervals.SEED},
        "strata": ({"groups": str(groups), "groups_sha256": sha256_of(Path(groups)),
                    "min_stratum_images": min_stratum_images} if groups is not None else
                   {"what": strata.WHAT_STRATA_ARE, "ita": strata.ITA_STATISTIC, "skin_mask": strata.SKIN_MASK,
                    "region": {"name": skin_region, "box": list(REGIONS[skin_region])},
                    "categories": [[name, _finite(lower), _finite(upper)] for name, lower, upper in strata.CATEGORIES],
                    "min_stratum_images": min_stratum_images}),
    }


@dataclass(frozen=True)
class Strata:
    """Which stratum each image is in (`labels`, (n,) str) and the strata in the card's order, each with a
    description (its ITA range, or "group label"); `not_compared` take no part in the largest gaps (why)."""

    labels: np.ndarray
    order: tuple[tuple[str, str], ...]
    not_compared: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_ita(cls, ita: np.ndarray) -> Strata:
        labels = np.array(strata.STRATA, dtype=object)[strata.stratum_of(ita)]
        return cls(labels, tuple((name, _ita_range(position)) for position, name in enumerate(strata.STRATA)))

    @classmethod
    def from_groups(cls, keys: list[str], groups: dict[str, str]) -> Strata:
        """Users' own labels: `groups` maps a sample key (or the relative path it was made from) to a group."""
        by_key = {sample_key(key): group for key, group in groups.items()}
        labels = np.array([by_key.get(key, UNLABELLED) for key in keys], dtype=object)
        order = (*dict.fromkeys(by_key.values()), UNLABELLED)
        return cls(labels, tuple((name, "group label" if name != UNLABELLED else "no label in --groups")
                                 for name in order), {UNLABELLED: "images without a label"})


UNLABELLED = "unlabelled"
# Per-image metrics that do not depend on the model: no paired comparison with a baseline.
MODEL_FREE = ("psnr_lab_gray", "colorfulness_real")


def summarise(per_image: dict[str, np.ndarray], groups: Strata, min_stratum_images: int = MIN_STRATUM_IMAGES,
              baselines: dict[str, dict[str, np.ndarray]] | None = None) -> dict[str, Any]:
    """Means with intervals over all images and per stratum, each metric's largest gap between the strata of at
    least `min_stratum_images` images (the others named, with why), and the model's paired differences from each
    baseline (the same images: each resample draws the same images for both)."""
    names = list(per_image)
    values = _stack(per_image, names)
    resampled = {}
    stratum_rows = []
    for position, (name, description) in enumerate(groups.order):
        rows = values[groups.labels == name]
        entry: dict[str, Any] = {"stratum": name, "ita": description, "images": len(rows), "metrics": {}}
        if len(rows):
            resampled[name] = intervals.bootstrap_means(rows, stream=1 + position)
            entry["metrics"] = _with_intervals(names, rows.mean(axis=0), resampled[name])
        stratum_rows.append(entry)
    eligible, left_out = [], []
    for entry in stratum_rows:
        if entry["stratum"] in groups.not_compared and entry["images"]:
            left_out.append({"stratum": entry["stratum"], "images": entry["images"],
                             "why": groups.not_compared[entry["stratum"]]})
        elif entry["images"] >= min_stratum_images:
            eligible.append(entry["stratum"])
        elif entry["images"]:
            left_out.append({"stratum": entry["stratum"], "images": entry["images"],
                             "why": f"fewer than {min_stratum_images} images"})
    gaps = {}
    if len(eligible) >= 2:
        by_name = {entry["stratum"]: entry for entry in stratum_rows}
        for column, metric in enumerate(names):
            highest = max(eligible, key=lambda name: by_name[name]["metrics"][metric]["mean"])
            lowest = min(eligible, key=lambda name: by_name[name]["metrics"][metric]["mean"])
            difference = resampled[highest][:, column] - resampled[lowest][:, column]
            low, high = intervals.percentile_interval(difference[:, None])
            gaps[metric] = {"gap": by_name[highest]["metrics"][metric]["mean"]
                            - by_name[lowest]["metrics"][metric]["mean"],
                            "low": float(low[0]), "high": float(high[0]), "highest": highest, "lowest": lowest}
    compared = [name for name in names if name not in MODEL_FREE]
    versus = {baseline: paired_differences({name: per_image[name] for name in compared},
                                           {name: scores[name] for name in compared})
              for baseline, scores in (baselines or {}).items()}
    return {"images": len(values),
            "metrics": _with_intervals(names, values.mean(axis=0), intervals.bootstrap_means(values, stream=0)),
            "versus_baselines": versus, "strata": stratum_rows, "largest_gap": gaps,
            "left_out_of_gaps": left_out}


def paired_differences(first: dict[str, np.ndarray], second: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per metric, the mean of first − second over the same images with its paired bootstrap interval (each
    resample draws the same images for both: stream 0, the overall intervals' resamples)."""
    names = list(first)
    differences = _stack(first, names) - _stack(second, names)
    low, high = intervals.percentile_interval(intervals.bootstrap_means(differences, stream=0))
    return {name: {"difference": float(mean), "low": float(lo), "high": float(hi)}
            for name, mean, lo, hi in zip(names, differences.mean(axis=0), low, high, strict=True)}


def _stack(per_image: dict[str, np.ndarray], names: list[str]) -> np.ndarray:
    return np.stack([np.asarray(per_image[name], dtype=np.float64) for name in names], axis=1)


def _with_intervals(names: list[str], means: np.ndarray, resampled: np.ndarray) -> dict[str, dict[str, float]]:
    low, high = intervals.percentile_interval(resampled)
    return {name: {"mean": float(mean), "low": float(lo), "high": float(hi)}
            for name, mean, lo, hi in zip(names, means, low, high, strict=True)}


def _finite(bound: float) -> float | None:
    return None if math.isinf(bound) else bound  # JSON has no infinity


def _ita_range(position: int) -> str:
    if position == len(strata.CATEGORIES):
        return "too little skin"
    _, lower, upper = strata.CATEGORIES[position]
    if math.isinf(upper):
        return f"> {lower:g}°"
    if math.isinf(lower):
        return f"≤ {upper:g}°"
    return f"{lower:g}° to {upper:g}°"


def build_card(*, protocol: dict[str, Any], summary: dict[str, Any], metrics: dict[str, float],
               fid_se: float | None, model: dict[str, Any], run: dict[str, Any], warnings: list[str],
               baselines: dict[str, Any] | None = None) -> dict[str, Any]:
    """The card: protocol, model, run, the summary's figures and the set-level metrics with their spreads."""
    spreads = {"fid": fid_se, "kid": metrics.get("kid_std"), "inception_score": metrics.get("inception_score_std")}
    set_level = {name: {"value": metrics[name], "spread": spread, "spread_kind": SPREAD_LABELS[name]}
                 for name, spread in spreads.items() if name in metrics}
    return {"protocol": protocol, "model": model, "run": run, "baselines": baselines or {}, "per_image": PER_IMAGE_CSV,
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "results": {**summary, "set_metrics": set_level}, "warnings": warnings}


def write_card(card: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """Write card.json and card.md into `out`, atomically."""
    atomic_write(out / CARD_JSON, json.dumps(card, indent=2, ensure_ascii=False) + "\n")
    atomic_write(out / CARD_MD, markdown(card))
    return out / CARD_JSON, out / CARD_MD


def write_per_image(path: Path, keys: list[str], columns: dict[str, np.ndarray]) -> None:
    """One row per image (its sample key, then `columns`: stratum, skin estimate, metrics), full float precision,
    for people to read and for `--compare` to pair the images of two cards."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["key", *columns])
    for row, key in enumerate(keys):
        writer.writerow([key, *(_csv_value(values[row]) for values in columns.values())])
    atomic_write(path, buffer.getvalue())


def read_per_image(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The keys and numeric columns `write_per_image` wrote."""
    with path.open(newline="", encoding="utf-8") as file:
        rows = list(csv.reader(file))
    header, body = rows[0], rows[1:]
    columns = {}
    for position, name in enumerate(header[1:], start=1):
        with contextlib.suppress(ValueError):
            columns[name] = np.array([float(row[position]) for row in body])
    return [row[0] for row in body], columns


def _csv_value(value: Any) -> str:
    return repr(float(value)) if isinstance(value, (float, np.floating)) else str(value)


def card_file(path: str | Path) -> Path:
    """The card.json that `path` names: itself, the eval folder holding it, or the run directory."""
    path = Path(path)
    candidates = [path] if path.suffix == ".json" else [path / CARD_JSON, path / "eval" / CARD_JSON]
    file = next((candidate for candidate in candidates if candidate.is_file()), None)
    if file is None:
        raise CardError(f"no evaluation card at {' or '.join(map(str, candidates))}; run `colorize-dist eval` first")
    return file


def load_card(path: str | Path) -> dict[str, Any]:
    """A card from its card.json, the eval folder holding it, or the run directory (RUN/eval/card.json)."""
    file = card_file(path)
    try:
        card = json.loads(file.read_text(encoding="utf-8"))
        card_format = card["protocol"]["format"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CardError(f"{file} is not an evaluation card ({exc!r}); run `colorize-dist eval` again") from None
    if card_format != FORMAT:
        raise CardError(f"{file} is a card of format {card_format!r}, not {FORMAT!r}; run `colorize-dist eval` again")
    return card


def first_difference(a: dict[str, Any], b: dict[str, Any]) -> str | None:
    """The first protocol field whose values differ, as "field: A value vs B value", or None."""
    flat_a, flat_b = _flatten(a["protocol"]), _flatten(b["protocol"])
    for key in [*flat_a, *(key for key in flat_b if key not in flat_a)]:
        if flat_a.get(key) != flat_b.get(key):
            return f"{key}: {flat_a.get(key)!r} vs {flat_b.get(key)!r}"
    return None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat.update(_flatten(item, f"{prefix}{key}."))
        return flat
    return {prefix[:-1]: value}


def results_table(card: dict[str, Any], tablefmt: str = "simple") -> str:
    """Every metric's mean and 95 % interval, then the set-level metrics with their spreads."""
    results = card["results"]
    rows = [[LABELS[name], _number(entry["mean"]), _interval(entry)] for name, entry in results["metrics"].items()]
    rows += [[LABELS[name], _number(entry["value"]), f"± {_number(entry['spread'])} ({entry['spread_kind']})"]
             for name, entry in results["set_metrics"].items()]
    return tabulate(rows, headers=["metric", "mean", f"{intervals.CONFIDENCE:.0%} interval"], tablefmt=tablefmt,
                    disable_numparse=True)


def strata_table(card: dict[str, Any], tablefmt: str = "simple") -> str:
    """One row per metric, one column per stratum: mean [interval]; the first row counts the images."""
    stratum_rows = card["results"]["strata"]
    headers = ["", *(f"{entry['stratum']} ({entry['ita']})" for entry in stratum_rows)]
    rows = [["images", *(str(entry["images"]) for entry in stratum_rows)]]
    for name in card["results"]["metrics"]:
        rows.append([LABELS[name], *(f"{_number(entry['metrics'][name]['mean'])} {_interval(entry['metrics'][name])}"
                                     if entry["images"] else "–" for entry in stratum_rows)])
    return tabulate(rows, headers=headers, tablefmt=tablefmt, disable_numparse=True)


def gap_table(card: dict[str, Any], tablefmt: str = "simple") -> str:
    gaps = card["results"]["largest_gap"]
    rows = [[LABELS[name], _number(gap["gap"]), _interval(gap), gap["highest"], gap["lowest"]]
            for name, gap in gaps.items()]
    return tabulate(rows, headers=["metric", "largest gap", f"{intervals.CONFIDENCE:.0%} interval", "highest",
                                   "lowest"], tablefmt=tablefmt, disable_numparse=True)


def strata_line(card: dict[str, Any]) -> str:
    """The images per skin-tone stratum and the largest PSNR Lab gap, in one line for the terminal."""
    results = card["results"]
    counts = ", ".join(f"{entry['stratum']} {entry['images']}" for entry in results["strata"] if entry["images"])
    line = f"skin-tone strata (ITA of the ground truth): {counts}"
    if (gap := results["largest_gap"].get("psnr_lab")) is not None:
        line += (f"; largest PSNR Lab gap {gap['gap']:.2f} dB {_interval(gap)} ({gap['highest']} − "
                 f"{gap['lowest']})")
    return line


def baselines_table(card: dict[str, Any], tablefmt: str = "simple") -> str:
    """Per metric, the model minus each baseline on the same images with its paired interval and what it means."""
    versus = card["results"]["versus_baselines"]
    baselines = list(versus)
    rows = []
    for name in next(iter(versus.values()), {}):
        row = [LABELS[name]]
        for baseline in baselines:
            entry = versus[baseline][name]
            row.append(f"{entry['difference']:+.4f} {_interval(entry)} {_verdict(name, entry)}")
        rows.append(row)
    return tabulate(rows, headers=["metric", *(f"model − {BASELINE_LABELS[name]}" for name in baselines)],
                    tablefmt=tablefmt, disable_numparse=True)


BASELINE_LABELS = {"gray": "gray (ab = 0)", "mean_ab": "training set's mean ab"}


def _verdict(metric: str, entry: dict[str, float]) -> str:
    """Whether a paired interval of a difference says better, worse, or neither (for the metrics that compare with
    the truth: more colourful is not better)."""
    direction = DIRECTION.get(metric)
    if direction is None or metric == "colorfulness":
        return ""
    if entry["low"] <= 0.0 <= entry["high"]:
        return "(no significant difference)"
    better = (entry["low"] > 0.0) == (direction == "max")
    return "(better)" if better else "(worse)"


def left_out_line(card: dict[str, Any]) -> str:
    left_out = card["results"]["left_out_of_gaps"]
    if not left_out:
        return "Every stratum with images takes part."
    return "Left out: " + "; ".join(f"{entry['stratum']} ({entry['images']} images: {entry['why']})"
                                    for entry in left_out) + "."


def markdown(card: dict[str, Any]) -> str:
    protocol, results = card["protocol"], card["results"]
    minimum = protocol["strata"]["min_stratum_images"]
    if "groups" in protocol["strata"]:
        strata_heading = f"## Strata: the group labels of {protocol['strata']['groups']}"
        strata_text = "Groups as the users labelled the images (`--groups`); images without a label are unlabelled."
    else:
        estimate = results["skin_estimate"]
        strata_heading = "## Skin-tone strata (ITA of the ground truth's detected skin)"
        strata_text = (f"The strata are {protocol['strata']['what']}. ITA = {protocol['strata']['ita']}, in the "
                       f"{protocol['strata']['region']['name']} region {protocol['strata']['region']['box']} (left, "
                       f"top, right, bottom); skin pixels: {protocol['strata']['skin_mask']}. The estimates rest on "
                       f"a median of {estimate['pixels_median']:g} skin pixels ({estimate['fraction_median']:.0%} of "
                       f"the region); {estimate['undetermined']} images are undetermined. Each image's estimate: "
                       f"{card['per_image']}.")
    versus = results["versus_baselines"]
    lines = [
        f"# Evaluation card: {card['model']['checkpoint']}", "",
        f"{results['images']:,} images of the {protocol['shards']['split']} split at "
        f"{protocol['images']['resolution']}², {card['created']}. Intervals: {intervals.METHOD}.", "",
        "## Results", "", results_table(card, "github"), "",
        "## Against the trivial answers", "",
        f"The model minus each baseline on the same images, with the {intervals.CONFIDENCE:.0%} paired bootstrap "
        "interval of that difference (each resample draws the same images for both):", "",
        baselines_table(card, "github") if versus else "(no baseline was scored)", "",
        *([] if "mean_ab" in versus else [f"No mean-ab baseline: {card['baselines']['mean_ab']['why']}.", ""]),
        strata_heading, "", strata_text, "",
        strata_table(card, "github"), "",
        f"Largest gap between two strata of at least {minimum} images, with the {intervals.CONFIDENCE:.0%} interval "
        f"of that difference (stratified bootstrap). {left_out_line(card)}", "",
        gap_table(card, "github") if results["largest_gap"] else f"(fewer than two strata have {minimum} images)", "",
        "## Protocol", "",
        tabulate([[key, _cell(value)] for key, value in _flatten(protocol).items()], headers=["field", "value"],
                 tablefmt="github", disable_numparse=True), "",
        "## Model and run (not part of the protocol)", "",
        tabulate([[key, _cell(value)] for key, value in _flatten({"model": card["model"], "run": card["run"]}).items()],
                 headers=["field", "value"], tablefmt="github", disable_numparse=True), "",
    ]
    if card["warnings"]:
        lines += ["## Warnings", "", *(f"- {warning}" for warning in card["warnings"]), ""]
    return "\n".join(lines)


def comparison(a: dict[str, Any], b: dict[str, Any], names: tuple[str, str],
               paired: dict[str, dict[str, float]] | None = None) -> str:
    """Two cards of the same protocol side by side: means with intervals, A − B (with its paired interval when
    `paired`, from the same images' values), then the largest gaps."""
    rows = []
    for name, entry in a["results"]["metrics"].items():
        other = b["results"]["metrics"][name]
        difference = _number(entry["mean"] - other["mean"])
        if paired is not None and name in paired:
            difference = f"{paired[name]['difference']:+.4f} {_interval(paired[name])} {_verdict(name, paired[name])}"
        rows.append([LABELS[name], f"{_number(entry['mean'])} {_interval(entry)}",
                     f"{_number(other['mean'])} {_interval(other)}", difference])
    for name, entry in a["results"]["set_metrics"].items():
        other = b["results"]["set_metrics"][name]
        rows.append([LABELS[name], f"{_number(entry['value'])} ± {_number(entry['spread'])}",
                     f"{_number(other['value'])} ± {_number(other['spread'])}",
                     _number(entry["value"] - other["value"])])
    header = "A − B [paired 95 % interval]" if paired is not None else "A − B"
    text = [tabulate(rows, headers=["metric", f"A: {names[0]}", f"B: {names[1]}", header], disable_numparse=True)]
    gap_names = [name for name in a["results"]["largest_gap"] if name in b["results"]["largest_gap"]]
    if gap_names:
        gap_rows = [[LABELS[name], *(f"{_number(card['results']['largest_gap'][name]['gap'])} "
                                     f"{_interval(card['results']['largest_gap'][name])} "
                                     f"({card['results']['largest_gap'][name]['highest']} − "
                                     f"{card['results']['largest_gap'][name]['lowest']})" for card in (a, b))]
                    for name in gap_names]
        text += ["", tabulate(gap_rows, headers=["largest gap between strata", "A", "B"], disable_numparse=True)]
    return "\n".join(text)


def _number(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def _interval(entry: dict[str, float]) -> str:
    return f"[{entry['low']:.4f}, {entry['high']:.4f}]"


def _cell(value: Any) -> str:
    return "–" if value is None else str(value)


def _version(distribution: str) -> str:
    return importlib.metadata.version(distribution)

