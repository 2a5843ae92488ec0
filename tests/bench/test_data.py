"""bench data: the table's columns on a CPU and on a GPU, its ratios, and a real run of the command."""

from __future__ import annotations

import re

import pytest
import torch

from colorize_dist.bench.data import LoaderRun, throughput_table, time_loaders
from colorize_dist.cli import main as cli_main
from tests.data.servers import require_nginx


def rows_of(table: str) -> list[list[str]]:
    """The simple table's rows split at runs of two or more spaces (headers hold single spaces)."""
    return [re.split(r" {2,}", line.strip()) for line in table.splitlines() if not set(line) <= {"-", " "}]


def test_cpu_table_has_one_dali_column_and_its_ratios():
    header, row = rows_of(throughput_table(["reference", "DALI cpu"], [(256, [(500.0, 2.0), (1250.0, 0.8)])]))
    assert header == ["resolution", "reference", "DALI cpu", "DALI/ref", "CPU reference", "CPU DALI", "CPU ref/DALI"]
    assert row == ["256²", "500", "1250", "2.50×", "2.00", "0.80", "2.50×"]


def test_gpu_table_adds_dali_mixed_and_marks_a_loader_that_did_not_run():
    titles = ["reference", "DALI cpu", "DALI mixed"]
    header, row = rows_of(throughput_table(titles, [(512, [(100.0, 8.0), None, (400.0, 1.0)])]))
    assert header == ["resolution", *titles, "DALI cpu/ref", "DALI mixed/ref", "CPU reference", "CPU DALI cpu",
                      "CPU DALI mixed", "CPU ref/DALI cpu", "CPU ref/DALI mixed"]
    assert row == ["512²", "100", "–", "400", "–", "4.00×", "8.00", "–", "1.00", "–", "8.00×"]


def test_bench_data_command_prints_both_tables(capsys):
    assert cli_main(["bench", "data", "--resolutions", "32", "--images", "48", "--batch-size", "8", "--epochs", "1",
                     "--threads", "1", "--resume-at", "0.5"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("images/s and CPU ms per image"):].splitlines()  # after what writing the shards says
    throughput = rows_of("\n".join(lines[1:4]))
    header, row = throughput[0], dict(zip(throughput[0], throughput[1], strict=True))
    assert header[:3] == ["resolution", "reference", "DALI cpu"] and row["resolution"] == "32²"
    ratio = "DALI/ref" if "DALI/ref" in row else "DALI cpu/ref"
    assert float(row[ratio].rstrip("×")) == pytest.approx(float(row["DALI cpu"]) / float(row["reference"]), rel=0.01,
                                                          abs=0.01)
    resume = rows_of("\n".join(lines[lines.index("") + 2:]))
    assert resume[0] == ["resolution", "loader", "batch", "exact start", "replay"]
    assert [line[1] for line in resume[1:]] == header[1:header.index(ratio)]  # one row per loader
    assert all(line[2] == "3/6" for line in resume[1:])  # 48 images in batches of 8, resumed at half


@pytest.mark.slow
def test_bench_data_over_http_prints_disk_and_each_latency(capsys):
    require_nginx()
    assert cli_main(["bench", "data", "--resolutions", "32", "--images", "48", "--batch-size", "8", "--epochs", "1",
                     "--threads", "1", "--latency", "0", "20", "--samples-per-read", "1", "8"]) == 0
    out = capsys.readouterr().out
    lines = out[out.index("images/s and CPU ms per image of DALI"):].splitlines()
    header, *rows = rows_of("\n".join(lines[1:5]))
    assert header[:4] == ["resolution", "disk", "HTTP 0 ms", "HTTP 20 ms"] and "HTTP 20 ms/disk" in header
    assert [row[0] for row in rows] == ["32² 1/read", "32² 8/read"]  # a line per data.samples_per_read
    for row in rows:
        row = dict(zip(header, row, strict=True))
        assert float(row["HTTP 20 ms/disk"].rstrip("×")) == pytest.approx(
            float(row["HTTP 20 ms"]) / float(row["disk"]), rel=0.01, abs=0.01)


def test_time_loaders_measures_each_loader_at_each_resolution_and_resumes_at_the_asked_batch():
    runs = [LoaderRun("reference", "reference", 1, torch.device("cpu"))]
    timings = time_loaders(runs, [32], shards=None, images=48, threads=1, batch_size=8, epochs=1, resume_at=0.5)
    assert timings.runs == runs and [resolution for resolution, _ in timings.rows] == [32]
    (rate, cpu_ms), = timings.rows[0][1]
    assert rate > 0 and cpu_ms > 0
    resume, = timings.resumes
    assert (resume.resolution, resume.loader, resume.start_batch, resume.batches) == (32, "reference", 3, 6)
    assert resume.exact_s > 0 and resume.replay_s > 0
