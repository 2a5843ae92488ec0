"""Configs: presets by name, `base:` composition, one-line errors naming the file or override, atomic save."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from colorize_dist.config import ConfigError, preset_dir, preset_names, resolve_config, save_config
from colorize_dist.training.config import Config, load_training_config

REPO = Path(__file__).resolve().parents[1]


def test_presets_are_the_checkouts_configs() -> None:
    assert preset_dir() == REPO / "configs"
    assert {"tiny", "seed000", "seed000_depth4", "seed000_ndims32", "seed000_unet", "seed001", "res256", "res512",
            "res1024"} <= set(preset_names())
    assert resolve_config("seed000") == resolve_config("seed000.yaml") == REPO / "configs" / "seed000.yaml"


def test_variants_change_only_what_they_name() -> None:
    base, depth4, unet, seed001 = (load_training_config(name) for name in
                                   ("seed000", "seed000_depth4", "seed000_unet", "seed001"))
    assert depth4.model.generator.depth == 4 and depth4.model.generator.ndims == base.model.generator.ndims == 16
    assert (unet.loss.theta, unet.loss.beta, unet.train.epochs) == (0.0, 10.0, 100)
    assert (seed001.loss.beta, seed001.loss.theta, seed001.train.epochs) == (1.0, 0.08, 120)
    assert seed001.optim == base.optim and seed001.model == base.model
    res512, res1024 = load_training_config("res512"), load_training_config("res1024")
    assert (res512.data.resolution, res512.model.generator.depth, res512.train.batch_size) == (512, 6, 128)
    assert (res1024.model.generator.ndims, res1024.model.generator.max_width) == (16, 512)  # max_width from res256
    assert res1024.optim.schedule == "cosine" and res1024.train.mixed_precision == "bf16"


def test_a_user_file_can_start_from_a_preset_or_a_relative_file(tmp_path: Path) -> None:
    (tmp_path / "mine.yaml").write_text("base: seed000\ntrain: {batch_size: 32}\n")
    (tmp_path / "mine_wide.yaml").write_text("base: mine.yaml\nmodel: {generator: {ndims: 32}}\n")
    cfg = load_training_config(tmp_path / "mine_wide.yaml", ["optim.lr=1e-4"])
    assert (cfg.train.batch_size, cfg.model.generator.ndims, cfg.optim.lr, cfg.train.epochs) == (32, 32, 1e-4, 100)


@pytest.mark.parametrize(("files", "message"), [
    ({"a.yaml": "base: b.yaml\n", "b.yaml": "base: a.yaml\n"}, "base a.yaml includes itself"),
    ({"a.yaml": "base: nonexistent_preset\n"}, "config nonexistent_preset is neither a file nor a preset; presets: "),
    ({"a.yaml": "base: [seed000]\n"}, "base must be a preset name or a path"),
    ({"a.yaml": "train: {batch_sise: 3}\n"}, "config error in "),
])
def test_bad_files_are_one_line_naming_the_file(tmp_path: Path, files: dict[str, str], message: str) -> None:
    for name, text in files.items():
        (tmp_path / name).write_text(text)
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        load_training_config(tmp_path / "a.yaml")
    assert "\n" not in str(error.value)


def test_override_errors_name_the_override_not_the_file() -> None:
    with pytest.raises(ConfigError, match=re.escape("override train.batch_sise=8: Key 'batch_sise' not in")):
        load_training_config("seed000", ["train.batch_sise=8"])
    with pytest.raises(ConfigError, match="neither a file nor a preset"):
        load_training_config("seed0000")


def test_saved_config_loads_back_equal(tmp_path: Path) -> None:
    cfg = load_training_config("res512", ["train.batch_size=64"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_training_config(tmp_path / "config.yaml") == cfg
    assert yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]["resolution"] == 512
    assert [path.name for path in tmp_path.iterdir()] == ["config.yaml"]  # no temporary left behind
    assert isinstance(cfg, Config)
