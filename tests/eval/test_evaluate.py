"""`colorize-dist eval` end to end on CPU: table, metrics.json, sample grid, and the FID weights error."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from colorize_dist import cli
from colorize_dist.eval import PER_IMAGE_METRICS
from colorize_dist.eval.fid import FID_WEIGHTS_FILENAME


def test_eval_writes_metrics_and_samples(val_shards: Path, generator_file: Path, capsys: pytest.CaptureFixture):
    run_dir = generator_file.parents[1]
    assert cli.main(["eval", "--checkpoint", str(run_dir), "--shards", str(val_shards), "--batch-size", "4",
                     "--backend", "reference"]) == 0
    report = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert report["images"] == 15 and report["checkpoint"] == str(generator_file)
    assert list(report["metrics"]) == list(PER_IMAGE_METRICS)
    assert "PSNR Lab (dB)" in capsys.readouterr().out
    with Image.open(run_dir / "eval" / "samples.png") as grid:
        assert grid.size == (3 * 34 + 2, 4 * 34 + 2)  # 3 columns × 4 valid samples of the first batch, 2 px gaps


def test_missing_fid_weights_is_one_clear_line(val_shards: Path, generator_file: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture):
    missing = tmp_path / FID_WEIGHTS_FILENAME
    assert cli.main(["eval", "--checkpoint", str(generator_file), "--shards", str(val_shards),
                     "--fid-weights", str(missing), "--out", str(tmp_path / "eval")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"eval: FID Inception weights not found at {missing}: download ")
    assert "\n" not in error
