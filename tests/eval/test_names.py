"""Metric names: a light module the training config uses to check train.best_metric and pick its direction."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from colorize_dist.config import ConfigError
from colorize_dist.eval.names import DIRECTION, INCEPTION_METRICS, LABELS, LPIPS_METRICS, PER_IMAGE_METRICS
from colorize_dist.training.config import load_training_config


def test_the_training_config_imports_no_metric_library():
    code = ("import sys, colorize_dist.training.config; "
            "print(sorted(m for m in ('torchmetrics', 'pytorch_fid', 'torch_fidelity', 'skimage') "
            "if m in sys.modules))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert loaded.strip() == "[]"


def test_every_metric_has_a_label_and_the_directions_are_sensible():
    assert set(LABELS) == {*PER_IMAGE_METRICS, *LPIPS_METRICS, *INCEPTION_METRICS}
    assert set(DIRECTION) <= set(LABELS)
    assert {name for name, way in DIRECTION.items() if way == "min"} == {"delta_e", "lpips", "fid", "kid"}


@pytest.mark.parametrize(("metric", "mode"), [("psnr_ab", "max"), ("delta_e", "min"), ("ssim_lab", "max")])
def test_best_mode_defaults_to_the_metrics_direction(metric: str, mode: str):
    assert load_training_config(None, [f"train.best_metric={metric}"]).train.best_mode == mode


def test_inception_metrics_need_weights_and_fid_is_minimised(tmp_path):
    for metric in ("kid", "inception_score"):
        with pytest.raises(ConfigError, match=f"train.best_metric={metric} needs train.fid_weights"):
            load_training_config(None, [f"train.best_metric={metric}"])
    cfg = load_training_config(None, ["train.best_metric=fid", f"train.fid_weights={tmp_path / 'w.pth'}"])
    assert cfg.train.best_mode == "min"


@pytest.mark.parametrize(("overrides", "message"), [
    (["train.best_metric=delta_e", "train.best_mode=max"],
     "train.best_mode=max contradicts train.best_metric=delta_e (better is min); leave train.best_mode unset"),
    (["train.best_metric=lpips"], "train.best_metric=lpips: validation does not compute LPIPS"),
    (["train.best_metric=psnr_lab_gray"], "train.best_metric='psnr_lab_gray' is not one of psnr_lab"),
    (["train.init_generator=' '"], "train.init_generator must name a run directory or an exported generator"),
])
def test_bad_best_metric_settings_are_one_clear_line(overrides: list[str], message: str):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_training_config(None, overrides)
