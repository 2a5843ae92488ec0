"""bench gpu: the report of a real stage, a failed stage recorded while the next runs, an interrupted run's report,
the memory line fit, and the one-line refusal without a GPU."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys

import pytest
import torch

from colorize_dist import cli
from colorize_dist.bench import gpu
from colorize_dist.bench.names import GPU_STAGES

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
SMALL_DATA = {"images": 64, "data_resolutions": (32,), "data_threads": 1, "data_batch_size": 8, "data_epochs": 1}


def markdown_tables(text: str) -> list[list[list[str]]]:
    """Each markdown table of `text` as rows of cells (the separator row left out)."""
    tables = re.findall(r"(?:^\|.*\|\n?)+", text, flags=re.MULTILINE)
    return [[[cell.strip() for cell in line.strip()[1:-1].split("|")] for line in table.strip().splitlines()
             if not re.fullmatch(r"\|[-|: ]+\|", line.strip())] for table in tables]


def test_a_failed_stage_is_recorded_and_the_next_stage_runs(tmp_path):
    """train fails at once on an unknown override (any machine); data then measures both CPU loaders."""
    options = gpu.BenchOptions(out=tmp_path / "out", stages=("train", "data"), overrides=("train.no_such_key=1",),
                               **SMALL_DATA)
    assert gpu.run_benchmark(options) == 1

    results = json.loads((tmp_path / "out" / "results.json").read_text())
    train, data = results["stages"]["train"], results["stages"]["data"]
    assert train["status"] == "failed" and "no_such_key" in train["error"]
    assert data["status"] == "ok" and data["result"]["errors"] == []
    titles = [loader["title"] for loader in data["result"]["loaders"]]
    assert titles[:2] == ["reference", "DALI cpu"]
    (row,) = data["result"]["rows"]
    assert row["resolution"] == 32 and len(row["measured"]) == len(titles)
    assert all(rate > 0 and cpu_ms > 0 for rate, cpu_ms in row["measured"])

    report = (tmp_path / "out" / "report.md").read_text()
    tables = markdown_tables(report)
    assert all(len({len(line) for line in table}) == 1 for table in tables)  # every row as wide as its header
    stages = next(table for table in tables if table[0][0] == "stage")
    assert [line[:2] for line in stages[1:]] == [["train", "failed"], ["data", "ok"]]
    assert "no_such_key" in stages[1][3]
    loaders = next(table for table in tables if table[0][0] == "resolution")
    header, cells = loaders[0], dict(zip(loaders[0], loaders[1], strict=True))
    assert header[1:3] == titles[:2] and cells["resolution"] == "32²"
    (reference, _), (dali, _) = row["measured"][:2]
    ratio = "DALI/ref" if len(titles) == 2 else "DALI cpu/ref"
    assert cells[ratio] == f"{dali / reference:.2f}×"
    assert "## Training step" not in report  # no rows measured, no table


def test_sigterm_stops_the_run_and_keeps_the_report(tmp_path):
    """A job's time limit: the running stage is recorded as interrupted, exit status 130, no traceback."""
    out = tmp_path / "out"
    options = {**SMALL_DATA, "images": 100_000}  # writing its shards outlasts the signal
    script = ("import sys; from pathlib import Path; from colorize_dist.bench import gpu; "
              f"sys.exit(gpu.run_benchmark(gpu.BenchOptions(out=Path({str(out)!r}), stages=('data',), **{options!r})))")
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    for line in process.stderr:  # waits for the stage to start
        if line.startswith("bench gpu: data ..."):
            break
    process.send_signal(signal.SIGTERM)
    stderr = process.stderr.read()
    assert process.wait(timeout=60) == 130
    assert "Traceback" not in stderr and "bench gpu: data interrupted" in stderr, stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["stages"]["data"]["status"] == "interrupted"
    assert ["data", "interrupted"] in [line[:2] for line in markdown_tables((out / "report.md").read_text())[0]]


def test_memory_fit_is_the_line_through_two_batches():
    rows = [{"config": "res512", "batch_size": 8, "peak_memory_mib": 12000.0, "status": "ok"},
            {"config": "res512", "batch_size": 32, "peak_memory_mib": 40000.0, "status": "ok"},
            {"config": "res1024", "batch_size": 4, "peak_memory_mib": 30000.0, "status": "ok"},
            {"config": "res1024", "batch_size": 16, "status": "OOM"}]
    ((config, per_image, fixed, largest),) = gpu.memory_fits(rows, total_mib=81559)  # res1024: one point, no line
    assert config == "res512"
    assert per_image == pytest.approx(28000 / 24) and fixed == pytest.approx(12000 - 8 * 28000 / 24)
    assert largest == 60  # (0.9 × 81559 − 2666.7) / 1166.7 = 60.6
    assert fixed + per_image * largest <= gpu.MEMORY_HEADROOM * 81559 < fixed + per_image * (largest + 1)


@no_cuda
def test_without_a_gpu_it_says_so_in_one_line_and_exits_2(tmp_path):
    out = tmp_path / "out"
    process = subprocess.run([sys.executable, "-m", "colorize_dist", "bench", "gpu", "--out", str(out)],
                             capture_output=True, text=True)
    assert process.returncode == gpu.EXIT_NO_GPU
    assert len(process.stderr.strip().splitlines()) == 1 and "no CUDA device" in process.stderr
    assert process.stdout == "" and not out.exists()


def test_the_stages_to_choose_from_are_the_ones_that_run_after_env():
    """`bench gpu --stages` offers names.GPU_STAGES (its --help loads no torch); they must be the stages gpu.py runs."""
    assert tuple(gpu.STAGES) == ("env", *GPU_STAGES)


def test_unknown_stage_is_one_line_naming_it(capsys, tmp_path):
    assert cli.main(["bench", "gpu", "--stages", "color,bogus", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "unknown bogus" in err and "color,data,train,memory" in err
    assert not (tmp_path / "out").exists()
