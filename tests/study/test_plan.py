"""Study files, their points and what they cost; the report of a study nothing has run for. No training here."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from colorize_dist.config import ConfigError
from colorize_dist.study.collect import report_metrics
from colorize_dist.study.config import load_study, study_names
from colorize_dist.study.plan import make_plan
from colorize_dist.study.record import last_error_line
from colorize_dist.training.costs import PointCost, mfu, peak_flops, point_cost
from tests.study.conftest import BROKEN, SMOKE, markdown_tables, run_cli


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_the_smoke_study_is_a_two_by_two_grid_on_shared_synthetic_data(tmp_path: Path) -> None:
    study, path = load_study("smoke")
    assert path == SMOKE
    plan = make_plan(study, path, tmp_path)
    assert [point.name for point in plan.points] == ["resolution=16, theta=0.0", "resolution=16, theta=0.2",
                                                     "resolution=32, theta=0.0", "resolution=32, theta=0.2"]
    assert plan.axes == ["data.resolution", "loss.theta"]
    assert [point.cfg.adversarial for point in plan.points] == [False, True, False, True]
    assert {point.cfg.train.max_steps for point in plan.points} == {30}
    assert plan.synthetic == tmp_path / "data" / "synthetic-160x32"  # made once, at the largest resolution
    assert {point.cfg.data.shards for point in plan.points} == {str(plan.synthetic.absolute())}
    assert plan.points[0].run_dir == tmp_path / "points" / "resolution=16-theta=0.0"
    assert not tmp_path.joinpath("points").exists()  # planning writes nothing


@pytest.mark.parametrize("name", study_names())
def test_every_shipped_study_plans(name: str, tmp_path: Path) -> None:
    study, path = load_study(name, ["data.shards=/data/faces"])
    plan = make_plan(study, path, tmp_path)
    assert len(plan.points) >= 4 and len({point.run_dir for point in plan.points}) == len(plan.points)
    for point in plan.points:
        assert point.cfg.train.max_steps > 0 or point.cfg.train.epochs > 0
        assert "tensorboard" in point.cfg.train.trackers  # the report reads its logs


def test_the_ladders_vary_resolution_and_gpus_with_the_batch() -> None:
    plan = make_plan(*load_study("resolution_ladder", ["data.shards=/data/ffhq"]))
    assert [point.cfg.data.resolution for point in plan.points] == [64, 128, 256, 512, 1024]
    images = {point.cfg.train.max_steps * point.cfg.train.batch_size for point in plan.points}
    assert min(images) >= 1_000_000 and max(images) - min(images) < 256  # the same images seen, in whole steps
    plan = make_plan(*load_study("node_ladder", ["data.shards=/data/ffhq"]))
    assert [point.num_processes for point in plan.points] == [1, 8, 16, 32, 64]
    assert {point.cfg.train.batch_size // point.num_processes for point in plan.points} == {32}


def test_named_points_cross_the_grid_and_a_budget_in_flops_buys_whole_steps(tmp_path: Path) -> None:
    path = write(tmp_path / "study.yaml", """
config: tiny
points:
  - {name: U-Net, overrides: {loss.theta: 0.0}}
  - {name: U-Net + GAN, overrides: {loss.theta: 0.2}}
  - {name: wide reference, overrides: {model.generator.ndims: 32, launch.tasks_per_node: 2}, cross: false}
grid:
  data.resolution: [32, 64]
budget: {flops: 1.0e12}
""")
    plan = make_plan(*load_study(path))
    assert [point.name for point in plan.points] == [
        "U-Net, resolution=32", "U-Net, resolution=64", "U-Net + GAN, resolution=32", "U-Net + GAN, resolution=64",
        "wide reference"]
    assert [point.slug for point in plan.points][-2:] == ["U-Net-GAN-resolution=64", "wide-reference"]
    assert [point.num_processes for point in plan.points] == [1, 1, 1, 1, 2]
    for point in plan.points:
        cost = point_cost(point.cfg)
        steps = point.cfg.train.max_steps
        assert cost.run_flops(steps) >= 1e12 > cost.run_flops(steps - 1)
    assert plan.points[0].cfg.train.max_steps > plan.points[1].cfg.train.max_steps  # 4× the pixels, ~4× fewer steps


def test_fid_is_reported_when_the_points_validate_with_inception_weights(tmp_path: Path) -> None:
    assert report_metrics(make_plan(*load_study("smoke"), tmp_path))[-1] == "ssim_rgb"
    plan = make_plan(*load_study("smoke", ["train.fid_weights=/weights/pt_inception.pth"]), tmp_path)
    assert report_metrics(plan) == ["psnr_lab", "ssim_lab", "psnr_ab", "ssim_ab", "psnr_rgb", "ssim_rgb", "fid"]


def test_training_flops_count_the_warm_up_without_the_discriminator() -> None:
    cost = PointCost(params_generator=1, params_discriminator=1, flops_generator=10, flops_discriminator=5,
                     adversarial=True, pretrain_steps=2, batch_size=4)
    assert cost.flops_per_image == 3 * 10 + 8 * 5
    assert cost.run_flops(5) == 4 * (2 * 30 + 3 * 70)
    assert cost.steps_for(cost.run_flops(5)) == 5 and cost.steps_for(cost.run_flops(5) + 1) == 6
    assert cost.steps_for(1) == 1


def test_mfu_uses_the_gpus_dense_peak_at_the_runs_precision() -> None:
    assert peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.4e12
    assert peak_flops("NVIDIA A100-SXM4-80GB", "no") == 156e12  # fp32 convolutions run in TF32
    assert peak_flops("NVIDIA A10", "bf16") == 125e12 and peak_flops("NVIDIA L40S", "fp16") == 362e12
    assert peak_flops("cpu", "no") is None
    assert mfu(1000, 1e12, 8, "NVIDIA H100 80GB HBM3", "bf16") == pytest.approx(1e15 / (8 * 989.4e12))
    assert mfu(1000, 1e12, 8, "cpu", "no") is None
    assert mfu(1000, 1e12, 2, "cpu", "no", peak_tflops=100) == pytest.approx(5.0)


@pytest.mark.parametrize(("text", "problem"), [
    ("config: tiny\nno_such: 1\n", "no_such"),
    ("config: tiny\nbudget: {steps: 10, epochs: 2}\n", "budget: give one of steps, epochs, images or flops"),
    ("config: tiny\nmetrics: [psnr_lab, accuracy]\n", "'accuracy' is not one of"),
    ("config: tiny\ngrid: {data.resolution: 64}\n", "grid.data.resolution"),
    ("config: tiny\npoints: [{name: a}, {name: a}]\n", "a given twice"),
])
def test_a_bad_study_file_is_one_line(tmp_path: Path, text: str, problem: str) -> None:
    with pytest.raises(ConfigError, match=None) as error:
        load_study(write(tmp_path / "bad.yaml", text))
    assert problem in str(error.value) and "\n" not in str(error.value), error.value


@pytest.mark.parametrize(("text", "problem"), [
    ("grid: {model.generator.no_such: [1, 2]}\n", "point 'no_such=1': override model.generator.no_such=1"),
    ("grid: {data.resolution: [36]}\n", "resolution 36 does not fit generator.depth=3"),
    ("overrides: {train.batch_size: 6, launch.tasks_per_node: 4}\n", "train.batch_size=6 is not divisible"),
    ("overrides: {launch.gpus: 2}\n", "launch: Key 'gpus' not in"),
])
def test_a_bad_point_names_itself_before_anything_runs(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path / "bad.yaml", "config: tiny\n" + text)
    status, _, err = run_cli("study", "run", path, "--local", "--out", tmp_path / "out")
    assert status == 2 and problem in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "out").exists()


def test_a_value_left_to_the_command_line_is_asked_for() -> None:
    status, _, err = run_cli("study", "run", "seed000_table1", "--dry-run")
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert "data.shards must be given" in err and "study run seed000_table1 data.shards=" in err, err  # the fix
    status, out, err = run_cli("study", "run", "seed000_table1", "data.shards=/data/celeba-hq", "--dry-run")
    assert status == 0, err
    assert "U-Net(depth=4) + GAN: U-Net-depth=4-GAN, 128², batch 64, 100 epochs" in out


def test_slurm_needs_a_partition() -> None:
    status, _, err = run_cli("study", "run", "smoke", "--dry-run")
    assert status == 0, err
    status, _, err = run_cli("study", "run", "smoke")
    assert status == 2 and len(err.strip().splitlines()) == 1 and "--local" in err and "--partition" in err, err


def test_the_report_of_a_study_not_run_yet_lists_every_point(smoke_with_failure: Path, tmp_path: Path) -> None:
    status, out, err = run_cli("study", "report", smoke_with_failure, "--out", tmp_path)
    assert status == 0, err
    assert "5 points: 5 not started" in out
    with open(tmp_path / "results.csv", newline="") as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["not started"] * 5 and rows[-1]["point"] == BROKEN
    tables = markdown_tables((tmp_path / "report.md").read_text())
    for heading in ("Quality", "Failed and unfinished points"):
        assert [(row["point"], row["status"]) for row in tables[heading]] == [
            (row["point"], "not started") for row in rows], heading
    report = (tmp_path / "report.md").read_text()
    assert "Not drawn: quality vs resolution" in report


def test_the_last_error_line_is_the_trainers_message() -> None:
    log = ("  3%|▎         | 1/30 [00:00<00:28,  1.00step/s]\r 50%|█████     | 15/30 [00:01<00:01]\n"
           "[2026-11-21 19:13:53] [WARNING] [real_accelerator.py:213] Setting accelerator to CPU.\n"
           "train: VGG16 weights not found at /x/vgg16.pth; put them in $TORCH_HOME/hub/checkpoints\n")
    assert last_error_line(log) == ("train: VGG16 weights not found at /x/vgg16.pth; put them in "
                                    "$TORCH_HOME/hub/checkpoints")
    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1, in <module>\nRuntimeError: boom\n"
    assert last_error_line(traceback) == "RuntimeError: boom"
    assert last_error_line("just a line\n") == "just a line" and last_error_line("") is None
