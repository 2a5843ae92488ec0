"""A wheel installed outside the checkout carries the presets and trains the embedded default."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_wheel_trains_without_a_config(tmp_path: Path) -> None:
    env = dict(os.environ, COLORIZE_DIST_CUDA="0", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(REPO)], check=True, env=env, timeout=600)
    (wheel,) = (tmp_path / "wheel").glob("colorize_dist-*.whl")
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(site), str(wheel)],
                   check=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    code = ("import sys, colorize_dist, colorize_dist.config as c; from colorize_dist.cli import main; "
            "print(colorize_dist.__file__, c.preset_dir()); sys.exit(main(sys.argv[1:]))")
    result = subprocess.run(
        [sys.executable, "-c", code, "train", "--run-dir", "run", "train.max_steps=4", "train.synth_images=64",
         "train.validate_every=4", "train.checkpoint_every=4", "train.sample_every=4"],
        cwd=outside, env=env | {"PYTHONPATH": str(site)}, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    package, presets = result.stdout.splitlines()[0].split()
    assert Path(package).is_relative_to(site) and Path(presets) == site / "colorize_dist" / "configs"
    assert (outside / "run" / "export" / "generator_final.safetensors").is_file()
    assert "done at step 4" in result.stdout
