"""The evaluation card of `colorize-dist eval`: its protocol fields, its figures, and `--compare`."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.color import deltaE_ciede2000

from colorize_dist import cli
from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.augment import EVALUATION_CROP
from colorize_dist.eval import PER_IMAGE_METRICS, intervals, strata
from colorize_dist.eval.card import FORMAT, read_per_image
from colorize_dist.eval.evaluate import resize_done
from colorize_dist.eval.metrics import denormalise_lab
from colorize_dist.eval.names import FACE_REGION
from colorize_dist.files import sha256_of
from colorize_dist.models import GeneratorConfig, build_generator
from colorize_dist.models.export import save_generator
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
    assert protocol["images"] == {"resolution": RESOLUTION, "crop": EVALUATION_CROP,  # the shards are 32²: no resize
                                  "resize": f"none (the shards' images are {RESOLUTION}², the resolution; no filter "
                                            "ran)"}
    assert protocol["metrics"] == list(PER_IMAGE_METRICS) and protocol["inception"] is None
    assert protocol["implementations"]["psnr_ssim"].startswith("torchmetrics ")
    assert protocol["intervals"] == {"method": intervals.METHOD, "confidence": 0.95, "resamples": 1000, "seed": 0}
    assert protocol["strata"]["min_stratum_images"] == 1 and protocol["strata"]["skin_mask"] == strata.SKIN_MASK
    assert protocol["strata"]["region"] == {"name": "face", "box": list(FACE_REGION)}
    assert card["model"]["sha256"] == sha256_of(generator_file) and card["run"]["processes"] == 1

    results = card["results"]
    metrics = json.loads((card_dir / "metrics.json").read_text())["metrics"]
    assert list(results["metrics"]) == list(PER_IMAGE_METRICS)
    for name, entry in results["metrics"].items():
        assert entry["mean"] == pytest.approx(metrics[name], rel=1e-12)
        assert entry["low"] < entry["mean"] < entry["high"]
    assert sum(entry["images"] for entry in results["strata"]) == results["images"] == 15
    assert [entry["stratum"] for entry in results["strata"]] == list(strata.STRATA)
    populated = [entry for entry in results["strata"] if entry["images"]]
    if len(populated) >= 2:  # every stratum takes part (min 1), undetermined included
        assert results["largest_gap"].keys() == results["metrics"].keys() and results["left_out_of_gaps"] == []
    markdown = (card_dir / "card.md").read_text()
    for heading in ("## Results", "## Against the trivial answers", "## Skin-tone strata", "## Protocol",
                    protocol["shards"]["manifest_sha256"], strata.WHAT_STRATA_ARE):
        assert heading in markdown


def test_card_compares_the_model_with_gray_and_the_training_mean_ab_on_the_same_images(card_dir: Path,
                                                                                       val_shards: Path):
    """Paired differences, checked against the per-image values; the mean-ab baseline's ab is the train split's
    mean over its pixels, and its per-image ΔE is skimage's for that constant colour."""
    card = json.loads((card_dir / "card.json").read_text())
    keys, columns = read_per_image(card_dir / "per_image.csv")
    assert len(keys) == 15 and columns["skin_pixels"].min() >= 0 and (columns["skin_fraction"] <= 1).all()
    versus = card["results"]["versus_baselines"]
    compared = [name for name in PER_IMAGE_METRICS if name not in ("psnr_lab_gray", "colorfulness_real")]
    assert list(versus) == ["gray", "mean_ab"] and list(versus["gray"]) == compared
    np.testing.assert_allclose(columns["gray:psnr_lab"], columns["psnr_lab_gray"], rtol=1e-12)
    for baseline in versus:
        differences = np.stack([columns[name] - columns[f"{baseline}:{name}"] for name in compared], axis=1)
        low, high = intervals.percentile_interval(intervals.bootstrap_means(differences, stream=0))
        for position, name in enumerate(compared):
            assert versus[baseline][name] == {"difference": pytest.approx(differences[:, position].mean(), rel=1e-12),
                                              "low": low[position], "high": high[position]}

    cfg = DataConfig(shards=str(val_shards), resolution=RESOLUTION, backend="reference", num_threads=1)
    with build_loader(cfg, "train", batch_size=32, augment=False) as loader:
        train = torch.cat([denormalise_lab(torch.cat([batch.l, batch.ab], dim=1))[batch.valid]
                           for batch in loader.epoch(0)])
    assert len(train) == 25
    expected = train[:, 1:].mean(dim=(0, 2, 3))
    mean_ab = card["baselines"]["mean_ab"]
    assert mean_ab["ab"] == pytest.approx(expected.tolist(), abs=1e-3)  # rounded to 4 decimals in the manifest
    assert mean_ab["from"] == f"{val_shards / 'manifest.json'} (train split)"

    with build_loader(cfg, "val", batch_size=4, augment=False) as loader:
        batch = next(loader.epoch(0))
    truth = denormalise_lab(torch.cat([batch.l, batch.ab], dim=1))[0].permute(1, 2, 0).numpy()
    constant = truth.copy()
    constant[..., 1:] = mean_ab["ab"]
    assert columns["mean_ab:delta_e"][0] == pytest.approx(deltaE_ciede2000(truth, constant).mean(), rel=1e-6)


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
    assert "PSNR Lab (dB) ↑" in out and f"A: {card_dir}" in out and "A − B [paired 95 % interval]" in out
    mean = json.loads((card_dir / "card.json").read_text())["results"]["metrics"]["psnr_lab"]["mean"]
    assert f"{mean:.4f}" in out
    assert "+0.0000 [0.0000, 0.0000] (no significant difference)" in out  # the same model on the same images


def test_another_model_with_group_labels_and_compared_with_paired_intervals(card_dir: Path, val_shards: Path,
                                                                           tmp_path: Path,
                                                                           capsys: pytest.CaptureFixture):
    """Another model evaluated with `--groups` (a CSV with a header): the groups are the strata; `--compare` of the
    two cards gives A − B with the paired interval of the same images' values; a groups file that labels no image
    is one line."""
    keys, _ = read_per_image(card_dir / "per_image.csv")
    groups = tmp_path / "groups.csv"
    groups.write_text("key,group\n" + "".join(f"{key},{'A' if i % 2 else 'B'}\n" for i, key in enumerate(keys[:12])))
    torch.manual_seed(1)
    cfg = GeneratorConfig(ndims=4, depth=2)
    other_model = tmp_path / "other.safetensors"
    save_generator(build_generator(cfg), cfg, RESOLUTION, other_model)
    assert run_eval(other_model, val_shards, tmp_path / "other", "--groups", str(groups),
                    "--min-stratum-images", "2") == 0
    card = json.loads((tmp_path / "other" / "card.json").read_text())
    assert [(entry["stratum"], entry["images"]) for entry in card["results"]["strata"]] == [
        ("B", 6), ("A", 6), ("unlabelled", 3)]
    assert card["protocol"]["strata"] == {"groups": str(groups), "groups_sha256": sha256_of(groups),
                                          "min_stratum_images": 2}
    assert {card["results"]["largest_gap"]["psnr_lab"][side] for side in ("highest", "lowest")} == {"A", "B"}
    assert card["results"]["left_out_of_gaps"] == [{"stratum": "unlabelled", "images": 3,
                                                    "why": "images without a label"}]
    assert "## Strata: the group labels of" in (tmp_path / "other" / "card.md").read_text()
    capsys.readouterr()

    assert cli.main(["eval", "--compare", str(card_dir), str(tmp_path / "other")]) == 2  # strata protocols differ
    assert capsys.readouterr().err.startswith("eval: the cards' protocols differ at strata.")
    assert run_eval(other_model, val_shards, tmp_path / "skin", "--min-stratum-images", "1") == 0
    capsys.readouterr()
    assert cli.main(["eval", "--compare", str(card_dir), str(tmp_path / "skin")]) == 0
    out = capsys.readouterr().out
    _, first = read_per_image(card_dir / "per_image.csv")
    _, second = read_per_image(tmp_path / "skin" / "per_image.csv")
    difference = first["delta_e"] - second["delta_e"]
    low, high = intervals.percentile_interval(intervals.bootstrap_means(difference[:, None], stream=0))
    row = next(line for line in out.splitlines() if line.startswith("ΔE CIEDE2000"))
    assert row.endswith(f"{difference.mean():+.4f} [{low[0]:.4f}, {high[0]:.4f}] "
                        f"{'(better)' if high[0] < 0 else '(worse)' if low[0] > 0 else '(no significant difference)'}")

    (tmp_path / "other.json").write_text(json.dumps({"someone_else.png": "A"}))
    assert run_eval(other_model, val_shards, tmp_path / "bad", "--groups", str(tmp_path / "other.json")) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"eval: --groups {tmp_path / 'other.json'}: none of its 1 keys")
    assert not (tmp_path / "bad" / "card.json").exists()


def test_the_resize_filter_is_recorded_only_when_it_ran(val_shards: Path):
    """Two loaders (PIL's, DALI's) on shards already at the resolution: no filter ran, the protocols agree."""
    filters = ("PIL's BILINEAR (antialiased)", "torch's antialiased bilinear interpolate")
    assert {resize_done(val_shards, RESOLUTION, name) for name in filters} == {
        f"none (the shards' images are {RESOLUTION}², the resolution; no filter ran)"}
    assert [resize_done(val_shards, 24, name) for name in filters] == list(filters)


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

