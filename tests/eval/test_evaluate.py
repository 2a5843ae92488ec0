"""`colorize-dist eval` end to end on CPU: table, metrics.json, sample grid, and one-line errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from colorize_dist import cli
from colorize_dist.eval import INCEPTION_METRICS, LPIPS_METRICS, PER_IMAGE_METRICS, fid
from colorize_dist.eval.evaluate import compare_cards, evaluate_checkpoint
from colorize_dist.eval.fid import FID_WEIGHTS_FILENAME


def test_eval_writes_metrics_and_samples(val_shards: Path, generator_file: Path, lpips_weights: Path,
                                         capsys: pytest.CaptureFixture):
    run_dir = generator_file.parents[1]
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--shards", str(val_shards), "--batch-size", "4",
                     "--backend", "reference", "--lpips-weights", str(lpips_weights)]) == 0
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert report["images"] == 15 and report["checkpoint"] == str(generator_file)
    assert list(report["metrics"]) == [*PER_IMAGE_METRICS, *LPIPS_METRICS]
    assert report["delta_e"].startswith("CIEDE2000") and report["lpips"]["weights"] == str(lpips_weights)
    assert "inception" not in report
    out = capsys.readouterr().out
    for label in ("PSNR Lab (dB)", "PSNR ab (dB)", "SSIM ab", "ΔE CIEDE2000", "LPIPS (AlexNet)"):
        assert label in out
    with Image.open(run_dir / "eval" / "samples.png") as grid:
        assert grid.size == (3 * 34 + 2, 4 * 34 + 2)  # 3 columns × 4 valid samples of the first batch, 2 px gaps


@pytest.mark.slow  # Inception on CPU
def test_eval_with_inception_records_how_fid_was_computed(val_shards: Path, generator_file: Path,
                                                          fid_weights: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture):
    assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(val_shards), "--batch-size", "8",
                     "--backend", "reference", "--fid-weights", str(fid_weights), "--min-fid-images", "10",
                     "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "metrics.json").read_text())
    assert list(report["metrics"]) == [*PER_IMAGE_METRICS, *INCEPTION_METRICS]
    inception = report["inception"]
    assert inception["images"] == 15 and inception["weights"] == str(fid_weights)
    assert len(inception["weights_sha256"]) == 64 and inception["resize"] == fid.RESIZE_FILTER
    assert inception["jpeg_compressed"] == {"predictions": False, "ground_truth": False}  # PNG shards
    assert inception["kid"]["subset_size"] == 15 and inception["inception_score"]["splits"] == 10
    assert "singular below 2,048 images" in inception["warning"]
    out = capsys.readouterr().out
    assert "KID ↓" in out and "Inception Score ↑" in out
    card = json.loads((tmp_path / "card.json").read_text())
    assert card["protocol"]["inception"]["weights_sha256"] == inception["weights_sha256"]
    assert card["protocol"]["inception"]["reference_sha256"] is None  # computed in the same pass
    set_metrics = card["results"]["set_metrics"]
    assert set_metrics["fid"]["value"] == report["metrics"]["fid"] and set_metrics["fid"]["spread"] > 0
    assert set_metrics["kid"]["spread"] == report["metrics"]["kid_std"]
    assert "FID ↓" in out and "jackknife SE" in out


def test_too_few_images_for_fid_is_one_clear_line(val_shards: Path, generator_file: Path, fid_weights: Path,
                                                  tmp_path: Path, capsys: pytest.CaptureFixture):
    assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(val_shards),
                     "--fid-weights", str(fid_weights), "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == ("eval: FID/KID/IS need at least 2,048 images (--min-fid-images), the val "
                                       "split has 15; score a larger split or leave out --fid-weights\n")
    assert not (tmp_path / "metrics.json").exists()


def test_missing_fid_weights_is_one_clear_line(val_shards: Path, generator_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture):
    missing = tmp_path / FID_WEIGHTS_FILENAME
    assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(val_shards),
                     "--fid-weights", str(missing), "--min-fid-images", "2", "--out", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"eval: FID Inception weights not found at {missing}: download ")
    assert "\n" not in error


def test_eval_of_the_train_split_equals_eval_of_the_same_images_as_val(generator_file: Path, tmp_path: Path):
    """Evaluation never augments: the train split is centre-cropped and unflipped, as the val split is."""
    sets = {}
    for split, fraction in (("train", "0"), ("val", "1")):
        sets[split] = tmp_path / split
        assert cli.main(["shards", "synth", str(sets[split]), "--n", "12", "--resolution", "40", "--format", "png",
                         "--val-fraction", fraction, "--workers", "1"]) == 0
    reports = {}
    for split, shards in sets.items():
        assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(shards), "--split", split,
                         "--batch-size", "4", "--backend", "reference", "--out", str(tmp_path / f"eval-{split}")]) == 0
        reports[split] = json.loads((tmp_path / f"eval-{split}" / "metrics.json").read_text())
    assert reports["train"]["images"] == reports["val"]["images"] == 12
    assert reports["train"]["metrics"] == reports["val"]["metrics"]


def test_evaluate_checkpoint_writes_a_card_whose_metrics_are_those_of_metrics_json(val_shards: Path,
                                                                                   generator_file: Path,
                                                                                   tmp_path: Path):
    written = evaluate_checkpoint(generator_file, str(val_shards), split="val", out=tmp_path / "eval", batch_size=4,
                                  backend="reference", cpu=True)
    assert written is not None and written.images == 15
    report = json.loads(written.metrics_json.read_text())
    on_disk = json.loads(written.card_json.read_text())
    means = {name: entry["mean"] for name, entry in on_disk["results"]["metrics"].items()}
    assert list(means) == list(report["metrics"]) == list(PER_IMAGE_METRICS)
    assert means == pytest.approx(report["metrics"], rel=1e-6)  # the card's means over images are metrics.json's
    assert on_disk["protocol"] == written.card["protocol"] and on_disk["results"]["images"] == report["images"] == 15
    assert written.per_image_csv.is_file() and written.samples_png.is_file() and written.card_md.is_file()
    assert {path.parent for path in (written.metrics_json, written.card_json, written.samples_png)} == {tmp_path /
                                                                                                         "eval"}

    _, unpaired = compare_cards(str(written.card_json), str(written.card_json))
    assert unpaired is None  # the same images in the same order: paired intervals
    alone = tmp_path / "alone"
    alone.mkdir()
    (alone / "card.json").write_bytes(written.card_json.read_bytes())  # without its per_image.csv
    _, unpaired = compare_cards(str(written.card_json), str(alone))
    assert unpaired == f"{alone / 'per_image.csv'} missing (cards of an older colorize-dist?)"
