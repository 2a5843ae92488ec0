"""The evaluation card of `colorize-dist eval`: its protocol fields, its figures, and `--compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from colorize_dist import cli
from colorize_dist.data.augment import EVALUATION_CROP
from colorize_dist.eval import PER_IMAGE_METRICS, intervals, strata
from colorize_dist.eval.card import FORMAT
from colorize_dist.files import sha256_of
from tests.eval.conftest import RESOLUTION, unwritable_folder_runs


def run_eval(generator_file: Path, shards: Path, out: Path, *extra: str) -> int:
    return cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(shards), "--batch-size", "4",
                     "--backend", "reference", "--out", str(out), *extra])


@pytest.fixture(scope="module")
def card_dir(val_shards: Path, generator_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("card")
    assert run_eval(generator_file, val_shards, out, "--min-stratum-images", "1") == 0
    return out


def test_card_records_the_protocol_and_the_figures(card_dir: Path, val_shards: Path, generator_file: Path):
    card = json.loads((card_dir / "card.json").read_text())
    protocol = card["protocol"]
    assert protocol["format"] == FORMAT
    assert protocol["shards"] == {"manifest_sha256": sha256_of(val_shards / "manifest.json"), "split": "val",
                                  "images": 15}
    assert protocol["images"] == {"resolution": RESOLUTION, "crop": EVALUATION_CROP,
                                  "resize": "PIL's BILINEAR (antialiased)"}  # the tests' reference loader
    assert protocol["metrics"] == list(PER_IMAGE_METRICS) and protocol["inception"] is None
    assert protocol["implementations"]["psnr_ssim"].startswith("torchmetrics ")
    assert protocol["intervals"] == {"method": intervals.METHOD, "confidence": 0.95, "resamples": 1000, "seed": 0}
    assert protocol["strata"]["min_stratum_images"] == 1 and protocol["strata"]["skin_mask"] == strata.SKIN_MASK
    assert card["model"]["sha256"] == sha256_of(generator_file) and card["run"]["processes"] == 1

    results = card["results"]
    metrics = json.loads((card_dir / "metrics.json").read_text())["metrics"]
    assert list(results["metrics"]) == list(PER_IMAGE_METRICS)
    for name, entry in results["metrics"].items():
        assert entry["mean"] == pytest.approx(metrics[name], rel=1e-12)
        assert entry["low"] < entry["mean"] < entry["high"]
    assert sum(entry["images"] for entry in results["strata"]) == results["images"] == 15
    assert [entry["stratum"] for entry in results["strata"]] == list(strata.STRATA)
    populated = [entry for entry in results["strata"] if entry["images"] and entry["stratum"] != strata.NO_SKIN]
    if len(populated) >= 2:
        assert results["largest_gap"].keys() == results["metrics"].keys()
    markdown = (card_dir / "card.md").read_text()
    for heading in ("## Results", "## Skin-tone strata", "## Protocol", protocol["shards"]["manifest_sha256"]):
        assert heading in markdown


def test_compare_prints_two_cards_of_one_protocol(card_dir: Path, val_shards: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture):
    """The same checkpoint evaluated again with another batch size: the same protocol, so they compare."""
    other = tmp_path / "other"
    generator_file = Path(json.loads((card_dir / "card.json").read_text())["model"]["checkpoint"])
    assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(val_shards), "--batch-size", "8",
                     "--backend", "reference", "--out", str(other), "--min-stratum-images", "1"]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "--compare", str(card_dir), str(other / "card.json")]) == 0
    out = capsys.readouterr().out
    assert "PSNR Lab (dB) ↑" in out and f"A: {card_dir}" in out and "B − A" in out
    mean = json.loads((card_dir / "card.json").read_text())["results"]["metrics"]["psnr_lab"]["mean"]
    assert f"{mean:.4f}" in out


def test_compare_refuses_another_protocol_naming_the_first_difference(card_dir: Path, val_shards: Path,
                                                                      tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture):
    generator_file = Path(json.loads((card_dir / "card.json").read_text())["model"]["checkpoint"])
    assert run_eval(generator_file, val_shards, tmp_path / "train", "--split", "train",
                    "--min-stratum-images", "1") == 0
    capsys.readouterr()
    assert cli.main(["eval", "--compare", str(card_dir), str(tmp_path / "train")]) == 2
    captured = capsys.readouterr()
    line = captured.err.strip()
    assert "\n" not in line and captured.out == ""
    assert line.startswith("eval: the cards' protocols differ at shards.split: 'val' vs 'train'")

    assert cli.main(["eval", "--compare", str(card_dir), str(tmp_path / "nothing")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(tmp_path / "nothing" / "card.json") in line and "colorize-dist eval" in line


def test_bad_output_folders_are_one_line_before_any_scoring(val_shards: Path, generator_file: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture):
    a_file = tmp_path / "taken"
    a_file.write_text("")
    for out, reason in [(a_file, "is an existing file"), (a_file / "below", "cannot be written (Not a directory)")]:
        assert run_eval(generator_file, val_shards, out) == 2
        line = capsys.readouterr().err.strip()
        assert "\n" not in line and line.startswith(f"eval: --out {out} {reason}")
    assert a_file.read_text() == ""


def test_out_without_permission_or_on_a_read_only_file_system_is_one_line(val_shards: Path, generator_file: Path,
                                                                         tmp_path: Path):
    out = tmp_path / "locked" / "eval"
    runs = unwritable_folder_runs(out.parent, ["eval", "--checkpoint", str(generator_file), "--shards",
                                               str(val_shards), "--backend", "reference", "--out", str(out)])
    for reason, result in [("Permission denied", runs["permission"]), ("Read-only file system", runs["read-only"])]:
        assert result.returncode == 2, result.stderr
        line = result.stderr.strip()
        assert "\n" not in line and line.startswith(f"eval: --out {out} cannot be written ({reason})")


def test_eval_of_a_set_without_a_validation_split_is_one_line(generator_file: Path, tmp_path: Path,
                                                              capsys: pytest.CaptureFixture):
    shards = tmp_path / "train_only"
    assert cli.main(["shards", "synth", str(shards), "--n", "8", "--resolution", "32", "--val-fraction", "0",
                     "--workers", "1"]) == 0
    capsys.readouterr()
    assert run_eval(generator_file, shards, tmp_path / "eval") == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and str(shards / "manifest.json") in line
    assert "lists no val images" in line and "--val-fraction" in line
    assert not (tmp_path / "eval" / "card.json").exists()

