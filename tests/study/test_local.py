"""`colorize-dist study run --local` end to end: the smoke grid plus a failing point, trained one after another in
child processes, then results.csv, report.md and the plots; a second run skips what finished and resumes the rest."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.study.conftest import BROKEN, MISSING_WEIGHTS, markdown_tables, run_cli

GRID = ["resolution=16, theta=0.0", "resolution=16, theta=0.2", "resolution=32, theta=0.0", "resolution=32, theta=0.2"]
PLOTS = ["quality_vs_resolution", "quality_vs_compute", "throughput_memory_vs_resolution", "learning_curves"]
STEPS = 30


def read_rows(out: Path) -> dict[str, dict[str, str]]:
    with open(out / "results.csv", newline="") as file:
        return {row["point"]: row for row in csv.DictReader(file)}


def assert_plausible(row: dict[str, str]) -> None:
    """What 30 steps of a tiny model on synthetic data can show: sane ranges, not a learned colorizer."""
    assert row["status"] == "done" and row["error"] == "", row
    assert int(row["steps"]) == int(row["total_steps"]) == STEPS
    assert int(row["images_seen"]) == STEPS * int(row["batch_size"])
    assert 5 < float(row["final_psnr_lab"]) < 60 and 0 < float(row["final_ssim_lab"]) <= 1
    assert 0 < float(row["final_ssim_ab"]) <= 1 and 0 < float(row["final_ssim_rgb"]) <= 1
    assert float(row["best_psnr_lab"]) >= float(row["final_psnr_lab"])
    assert float(row["images_per_s"]) > 0 and float(row["step_time_s"]) > 0 and 0 <= float(row["data_wait"]) < 1
    assert 100 < float(row["peak_memory_mib"]) < 20_000 and row["memory"] == "peak RSS"
    assert int(row["params_generator"]) > 1000 and float(row["train_flops"]) > 0
    assert (int(row["params_discriminator"]) > 0) == (row["gan"] == "True")
    assert row["mfu"] == "" and row["device"] == "cpu"  # MFU only on GPUs


@pytest.fixture(scope="module")
def first_run(smoke_with_failure: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int, str, str]:
    out = tmp_path_factory.mktemp("local") / "study"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        status, stdout, stderr = run_cli("study", "run", smoke_with_failure, "--local", "--out", out)
    return out, status, stdout, stderr


@pytest.mark.slow
def test_local_study_trains_every_point_and_reports_the_failing_one(first_run) -> None:
    out, status, stdout, stderr = first_run
    assert status == 1, stdout + stderr  # one point failed
    rows = read_rows(out)
    assert list(rows) == [*GRID, BROKEN]  # every point, in the study's order
    for name in GRID:
        assert_plausible(rows[name])
    assert {rows[name]["resolution"] for name in GRID} == {"16", "32"}
    broken = rows[BROKEN]
    assert broken["status"] == "failed" and MISSING_WEIGHTS in broken["error"], broken
    assert broken["log"].endswith("study.log") and MISSING_WEIGHTS in Path(broken["log"]).read_text()
    assert f"{BROKEN}: FAILED" in stdout and MISSING_WEIGHTS in stdout

    report = (out / "report.md").read_text()
    assert report.startswith("# Study: smoke_with_failure")
    assert "4 done, 1 failed" in report and "## Failed and unfinished points" in report
    tables = markdown_tables(report)
    assert [(row["point"], row["status"]) for row in tables["Quality"]] == [
        *[(name, "done") for name in GRID], (BROKEN, "failed")]
    (trouble,) = tables["Failed and unfinished points"]
    assert (trouble["point"], trouble["status"]) == (BROKEN, "failed") and MISSING_WEIGHTS in trouble["error"]
    assert [row["steps"] for row in tables["Quality"][:4]] == [f"{STEPS}/{STEPS}"] * 4
    (not_drawn,) = [line for line in report.splitlines() if line.startswith("Not drawn: ")]
    assert "weak scaling" in not_drawn and "quality vs resolution" not in not_drawn, not_drawn
    for name in PLOTS:
        png = out / "plots" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000, png
        assert f"](plots/{name}.png)" in report
    # Each point's run dir holds its resolved config and the trainer's outputs; the synthetic data is shared.
    run_dir = out / "points" / "resolution=32-theta=0.2"
    assert {"config.yaml", "summary.json", "logs", "checkpoints", "export", "study.log"} <= {
        path.name for path in run_dir.iterdir()}
    assert not (run_dir / "synthetic").exists() and len(list((out / "data").iterdir())) == 1


@pytest.mark.slow
def test_second_run_skips_finished_points_and_resumes_the_others(first_run, smoke_with_failure: Path) -> None:
    out, *_ = first_run
    points = out / "points"
    resumed = points / "resolution=16-theta=0.2"  # as if stopped after its last checkpoint, before its summary
    (resumed / "summary.json").unlink()
    finished = {path: path.read_text() for path in points.glob("resolution=*/summary.json")}
    assert len(finished) == 3

    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        status, stdout, stderr = run_cli("study", "run", smoke_with_failure, "--local", "--out", out)
    assert status == 1, stdout + stderr
    assert stdout.count("done, skipped") == 3, stdout
    assert f"{BROKEN}: FAILED" in stdout  # failed points are tried again, and reported again
    assert {path: path.read_text() for path in finished} == finished  # the finished points were not touched
    assert f"resumed from {resumed / 'checkpoints' / f'step-{STEPS:07d}'}" in (resumed / "study.log").read_text()
    assert json.loads((resumed / "summary.json").read_text())["finished"] is True
    rows = read_rows(out)
    assert [row["status"] for row in rows.values()] == ["done"] * 4 + ["failed"]
