"""`colorize-dist study run` on the local Slurm cluster (tests/tools/local_cluster.sh): the smoke grid plus a failing
point as one job array of 1-CPU tasks, waited for; a second run submits only the point that did not finish."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from tests.study.conftest import BROKEN, MISSING_WEIGHTS, run_cli

SLURM_ARGS = ["--time", "00:15:00", "--cpus-per-task", 1, "--signal-delay", 60, "--wait", "--poll", 2]


@pytest.mark.slurm
@pytest.mark.slow
def test_study_runs_as_a_job_array_and_reruns_only_what_did_not_finish(partition: str, smoke_with_failure: Path,
                                                                       tmp_path: Path) -> None:
    out = tmp_path / "study"
    status, stdout, stderr = run_cli("study", "run", smoke_with_failure, "--out", out, "--partition", partition,
                                     *SLURM_ARGS)
    assert status == 1, stdout + stderr  # one point failed
    job_ids = dict(re.findall(r"^(.+): submitted as Slurm job (\d+(?:_\d+)?)$", stdout, flags=re.MULTILINE))
    assert len(job_ids) == 5 and len({job_id.split("_")[0] for job_id in job_ids.values()}) == 1, stdout  # 1 array
    with open(out / "results.csv", newline="") as file:
        rows = {row["point"]: row for row in csv.DictReader(file)}
    assert [row["status"] for row in rows.values()] == ["done"] * 4 + ["failed"], rows
    for name, row in rows.items():
        if name != BROKEN:
            assert int(row["steps"]) == 30 and 5 < float(row["final_psnr_lab"]) < 60, row
            assert float(row["images_per_s"]) > 0 and float(row["peak_memory_mib"]) > 100, row
    assert MISSING_WEIGHTS in rows[BROKEN]["error"] and rows[BROKEN]["error"].startswith("train: "), rows[BROKEN]
    assert rows[BROKEN]["log"].endswith(f"{job_ids[BROKEN]}_0_log.err")
    report = (out / "report.md").read_text()
    assert "4 done, 1 failed" in report and MISSING_WEIGHTS in report
    assert (out / "plots" / "quality_vs_resolution.png").is_file()

    status, stdout, stderr = run_cli("study", "run", smoke_with_failure, "--out", out, "--partition", partition,
                                     *SLURM_ARGS)
    assert status == 1, stdout + stderr
    assert stdout.count("done, skipped") == 4, stdout
    resubmitted = re.findall(r"^(.+): submitted as Slurm job (\d+(?:_\d+)?)$", stdout, flags=re.MULTILINE)
    assert [name for name, _ in resubmitted] == [BROKEN], stdout
    assert resubmitted[0][1] != job_ids[BROKEN]
    assert "4 done, 1 failed" in (out / "report.md").read_text()
