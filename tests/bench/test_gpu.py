"""colorize_dist.bench.gpu on a machine without a GPU: the wheel plan, its shell joiner, the report, the no-GPU exit."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement

from colorize_dist.bench import gpu

needs_sh = pytest.mark.skipif(any(subprocess.run(["which", tool], capture_output=True).returncode
                                  for tool in ("sh", "sha256sum", "awk")), reason="needs sh, sha256sum and awk")
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    gpu.add_arguments(parser)
    return parser.parse_args(argv)


def fake_wheels(folder: Path, sizes: dict[str, int], seed: int = 0) -> list[Path]:
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, size in sizes.items():
        path = folder / name
        path.write_bytes(rng.randbytes(size))
        paths.append(path)
    return paths


def carry(call_dir: Path, store: Path) -> str:
    """What a device call's `sh CALL/install.sh --receive` does there, with the store in a test folder."""
    process = subprocess.run(["sh", str(call_dir / "install.sh"), "--receive"], capture_output=True, text=True,
                             env={**os.environ, "GPU_WHEELS": str(store)}, check=True)
    return process.stdout


# --- the plan ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(20))
def test_plan_calls_cover_every_byte_within_the_limits(seed):
    rng = random.Random(seed)
    files = [(f"w{i}.whl", rng.choice([0, 1, rng.randrange(1, 5000), rng.randrange(5000, 40000)]))
             for i in range(rng.randrange(1, 8))]
    part_size, budget = rng.randrange(100, 6000), rng.randrange(500, 12000)
    calls = gpu.plan_calls(files, part_size=part_size, call_budget=budget)
    total = sum(size for _, size in files)
    assert len(calls) == max(1, math.ceil(total / budget))  # as few calls as the bytes allow
    for call in calls:
        assert sum(seg.length for seg in call) <= budget
        assert all(seg.length <= part_size for seg in call)
    for name, size in files:  # each file's segments are contiguous, in part order, and cover it exactly
        segments = [seg for call in calls for seg in call if seg.wheel == name]
        assert [seg.part for seg in segments] == [f"{name}.part{i:03d}" for i in range(len(segments))]
        offset = 0
        for seg in segments:
            assert seg.offset == offset
            offset += seg.length
        assert offset == size


@needs_sh
def test_prepared_parts_join_byte_exactly_and_no_call_exceeds_the_carry_limit(tmp_path):
    sizes = {"big-1.0-py3-none-any.whl": 23_456, "mid-2.0-py3-none-any.whl": 5_001, "tiny-0.1-py3-none-any.whl": 7}
    originals = fake_wheels(tmp_path / "downloads", sizes)
    dest, store = tmp_path / "repo" / ".whl", tmp_path / "store"
    call_limit, tree_bytes = 20_000, 1_500
    plan = gpu.write_plan(originals, dest, folder=".whl", part_size=4_000, call_limit=call_limit,
                          tree_bytes=tree_bytes, margin=8_192)

    carry_calls = [call for call in plan.calls if call["carry"]]
    assert len(carry_calls) >= 3 and len(plan.calls) == len(carry_calls) + len(gpu.RUN_GROUPS) - 1
    for call in carry_calls:
        call_dir = dest / f"call-{call['index']}"
        assert call["carry"] == [f".whl/call-{call['index']}"]
        assert gpu.folder_bytes(call_dir) == call["bytes"]
        assert call["bytes"] + tree_bytes <= call_limit  # parts, install.sh, SHA256SUMS, parts.txt, the tree
        assert all(path.stat().st_size <= 4_000 for path in call_dir.glob("*.part*"))
    assert carry_calls[-1]["command"].startswith(f"sh .whl/call-{len(carry_calls)}/install.sh --receive && sh ")
    assert carry_calls[-1]["command"].endswith("--stages tests,color,data,train256,memory")
    assert plan.calls[-1]["carry"] == [] and plan.calls[-1]["command"].endswith("--stages train512,converge")
    assert all(len(call["command"]) <= 2000 for call in plan.calls)  # the device tool's limit
    assert (dest / "plan.json").is_file() and "| 1 | `.whl/call-1` |" in (dest / "plan.md").read_text()

    for index in range(1, len(carry_calls) + 1):
        said = carry(dest / f"call-{index}", store)
        if index < len(carry_calls):
            assert f"still to carry: call(s) {' '.join(str(i) for i in range(index + 1, len(carry_calls) + 1))}" \
                in said
        else:
            assert "every part is in" in said
    joined = subprocess.run(["sh", str(store / "install.sh"), "--join-only"], capture_output=True, text=True)
    assert joined.returncode == 0, joined.stderr
    for original in originals:
        assert (store / original.name).read_bytes() == original.read_bytes()
    assert not list(store.glob("*.part*"))  # parts removed once their wheel checks out
    again = subprocess.run(["sh", str(store / "install.sh"), "--join-only"], capture_output=True, text=True)
    assert again.returncode == 0  # joining is idempotent: the next call may run it again


@needs_sh
def test_a_missing_part_names_the_call_that_carries_it(tmp_path):
    originals = fake_wheels(tmp_path / "downloads", {"a-1-py3-none-any.whl": 9_000, "b-1-py3-none-any.whl": 300})
    dest, store = tmp_path / ".whl", tmp_path / "store"
    plan = gpu.write_plan(originals, dest, folder=".whl", part_size=2_000, call_limit=14_000, tree_bytes=0,
                          margin=8_192)
    carried = [call for call in plan.calls if call["carry"]]
    assert len(carried) >= 2
    said = carry(dest / "call-1", store)  # the machine was recycled before call 2
    assert "still to carry: call(s) 2" in said
    joined = subprocess.run(["sh", str(store / "install.sh"), "--join-only"], capture_output=True, text=True)
    assert joined.returncode == 1
    assert "carry call 2 of plan.md" in joined.stderr


@needs_sh
def test_corrupted_part_is_refused(tmp_path):
    originals = fake_wheels(tmp_path / "downloads", {"a-1-py3-none-any.whl": 3_000})
    dest = tmp_path / ".whl"
    gpu.write_plan(originals, dest, folder=".whl", part_size=1_000, call_limit=20_000, tree_bytes=0, margin=8_192)
    part = dest / "call-1" / "a-1-py3-none-any.whl.part001"
    data = bytearray(part.read_bytes())
    data[0] ^= 1
    part.write_bytes(bytes(data))
    joined = subprocess.run(["sh", str(dest / "call-1" / "install.sh"), "--join-only"], capture_output=True, text=True)
    assert joined.returncode == 1 and "SHA-256 differs" in joined.stderr
    assert not (dest / "call-1" / "a-1-py3-none-any.whl").exists()


@needs_sh
def test_install_runs_pip_once_on_the_joined_wheels(tmp_path):
    originals = fake_wheels(tmp_path / "downloads", {"a-1-py3-none-any.whl": 3_000, "b-2-py3-none-any.whl": 10})
    dest, store, bin_dir = tmp_path / ".whl", tmp_path / "store", tmp_path / "bin"
    gpu.write_plan(originals, dest, folder=".whl", part_size=1_000, call_limit=20_000, tree_bytes=0, margin=8_192)
    carry(dest / "call-1", store)
    bin_dir.mkdir()
    (bin_dir / "python3").write_text('#!/bin/sh\necho "$@" >> "$(dirname "$0")/calls"\n')  # stands in for pip
    (bin_dir / "python3").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    for _ in range(2):
        done = subprocess.run(["sh", str(store / "install.sh")], capture_output=True, text=True, env=env)
        assert done.returncode == 0, done.stderr
    calls = (bin_dir / "calls").read_text().splitlines()
    assert calls == ["-m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check "
                     "a-1-py3-none-any.whl b-2-py3-none-any.whl"]
    assert "already installed" in done.stdout
    assert (store / "a-1-py3-none-any.whl").read_bytes() == originals[0].read_bytes()


def test_prepare_refuses_a_folder_outside_the_repository(tmp_path):
    with pytest.raises(gpu.PrepareError, match="not inside the repository"):
        gpu.prepare(tmp_path / "wheels", cache=tmp_path / "cache", part_size=1000)


# --- which wheels --------------------------------------------------------------------------------------------------


def make_wheel(folder: Path, name: str, version: str, requires: list[str]) -> Path:
    path = folder / f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    metadata = "Metadata-Version: 2.1\n" + f"Name: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {line}\n" for line in requires)
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", metadata)
    return path


def test_resolve_wheels_follows_requirements_extras_and_markers(tmp_path):
    index = {
        "app": make_wheel(tmp_path, "app", "1.0", ["lib-a>=1", "Torch>=2", "old-only; python_version < '3.10'",
                                                   "codec[all]", "docs-tool; extra == 'docs'"]),
        "lib-a": make_wheel(tmp_path, "lib-a", "1.2", ["lib_b", "numpy"]),
        "lib-b": make_wheel(tmp_path, "lib-b", "0.3", []),
        "codec": make_wheel(tmp_path, "codec", "0.9", ["jpeg; extra == 'all'", "tiff; extra == 'tiff'"]),
        "jpeg": make_wheel(tmp_path, "jpeg", "13", ["codec"]),  # a cycle back to codec, without extras
    }
    fetched = []

    def fetch(requirement):
        fetched.append(gpu.canonical(requirement.name))
        return index[gpu.canonical(requirement.name)]

    wheels = gpu.resolve_wheels([Requirement("app")], fetch, present=frozenset({"torch", "numpy"}))
    assert [w.name.split("-")[0] for w in wheels] == ["app", "codec", "jpeg", "lib_a", "lib_b"]
    assert sorted(fetched) == sorted(set(fetched))  # each wheel fetched once


def test_cached_wheel_picks_the_newest_that_fits(tmp_path):
    for version in ("1.0", "1.5", "2.0"):
        make_wheel(tmp_path, "pkg", version, [])
    assert gpu.cached_wheel(tmp_path, Requirement("pkg<2")).name == "pkg-1.5-py3-none-any.whl"
    assert gpu.cached_wheel(tmp_path, Requirement("pkg==2.0")).name == "pkg-2.0-py3-none-any.whl"
    assert gpu.cached_wheel(tmp_path, Requirement("pkg>3")) is None
    assert gpu.cached_wheel(tmp_path, Requirement("other")) is None


def test_the_package_needs_dali_and_kornia_on_the_gpu_machine():
    names = {gpu.canonical(req.name) for req in gpu.package_requirements()}
    assert {"nvidia-dali-cuda130", "kornia", "deepspeed", "webdataset", "omegaconf"} <= names
    assert "pytest" not in names  # the dev extra stays behind


# --- the report ----------------------------------------------------------------------------------------------------


RESULTS = {
    "command": "python3 -m colorize_dist.bench.gpu --stages tests,color,data,train256",
    "started": "2026-11-22T10:00:00+00:00", "finished": "2026-11-22T10:08:00+00:00",
    "stages": {
        "build": {"status": "ok", "seconds": 21.0, "budget_s": 180,
                  "result": {"arch": "sm_90", "rebuilt": True, "seconds": 20.1,
                             "command": "COLORIZE_DIST_CUDA=1 COLORIZE_DIST_CUDA_ARCHS=90 python3 setup.py build_ext "
                                        "--inplace"}},
        "env": {"status": "ok", "seconds": 9.0, "budget_s": 90,
                "result": {"date": "2026-11-22T10:00:30+00:00", "gpu": "NVIDIA H100 80GB HBM3", "driver": "580.159.04",
                           "torch": "2.11.0+cu130", "torch_cuda": "13.0", "nvcc": "release 13.0", "cudnn": 91300,
                           "dali": "2.4.0", "python": "3.12.3", "matmul_bf16_tflops": 790.0, "copy_gb_s": 3000.0}},
        "tests": {"status": "ok", "seconds": 40.0, "budget_s": 150,
                  "result": {"command": "python3 -m pytest tests/test_color.py -k cuda", "summary": "13 passed",
                             "counts": {"passed": 13},
                             "checks": [{"check": "rgb_to_lab: CUDA vs CPU kernel", "max_abs_diff": 0.0001,
                                         "limit": 0.001, "ok": True}]}},
        "color": {"status": "ok", "seconds": 30.0, "budget_s": 90,
                  "result": {"megapixels_per_call": 32.0, "targets": {"copy_fraction": 0.8, "kornia_speedup": 10.0},
                             "rows": [{"size": 256, "batch": 488, "megapixels": 32.0, "ours_mp_s": 180000.0,
                                       "kornia_mp_s": 9000.0, "ours_gb_s": 2700.0, "copy_gb_s": 3000.0,
                                       "ours_err": 0.000292, "kornia_err": 6.1e-05, "copy_fraction": 0.9,
                                       "kornia_speedup": 20.0}]}},
        "data": {"status": "ok", "seconds": 60.0, "budget_s": 150,
                 "result": {"batch_size": 32, "epochs": 2, "dali_threads": 8, "reference_workers": 16,
                            "rows": [{"resolution": 256, "images": 4096, "reference": 2000.0, "dali_cpu": 2500.0,
                                      "dali_mixed": 9000.0, "reference_cpu_ms": 6.5, "dali_cpu_cpu_ms": 3.25,
                                      "dali_mixed_cpu_ms": 0.5, "errors": {}},
                                     {"resolution": 512, "images": 1024, "reference": 500.0, "dali_cpu": 600.0,
                                      "dali_mixed": None, "errors": {"dali_mixed": "RuntimeError: nvjpeg"}}]}},
        "train256": {"status": "timeout", "seconds": 260.0, "budget_s": 260,
                     "error": "stopped after its 260 s budget; results so far are kept",
                     "result": {"config": "res256", "resolution": 256, "batch_size": 32, "steps": 30, "warmup": 10,
                                "overrides": ["train.batch_size=32", "loss.beta=0"], "flops_per_image": 2.0e11,
                                "matmul_bf16_tflops": 790.0,
                                "rows": [{"variant": "fp32 eager", "batch_size": 32, "steps_per_s": 3.0,
                                          "images_per_s": 96.0, "data_wait": 0.01, "peak_memory_mib": 20480.0,
                                          "memory": "cuda max_memory_allocated", "mfu_measured": 0.0243,
                                          "mfu_spec": "28.7%"},
                                         {"variant": "bf16 + channels_last + compile",
                                          "error": "the bf16 + channels_last + compile run took longer than 90 s"}]}},
        "converge": {"status": "ok", "seconds": 190.0, "budget_s": 200,
                     "result": {"config": "res256", "max_steps": 3000, "steps_done": 2400, "finished": False,
                                "wall_s": 150.0, "images_per_s": 600.0, "psnr_lab": 27.5, "psnr_lab_gray": 24.0,
                                "peak_memory_mib": 30000.0, "curve": [[500, 25.0], [1000, 26.5]],
                                "command": "python3 colorize_dist/train.py --config res256"}},
        "memory": {"status": "ok", "seconds": 100.0, "budget_s": 140,
                   "result": {"gpu_memory_mib": 81559, "steps": 3,
                              "rows": [{"config": "res512", "resolution": 512, "batch_size": 8,
                                        "peak_memory_mib": 12000.0, "status": "ok"},
                                       {"config": "res512", "resolution": 512, "batch_size": 32,
                                        "peak_memory_mib": 40000.0, "status": "ok"},
                                       {"config": "res1024", "resolution": 1024, "batch_size": 4,
                                        "peak_memory_mib": 30000.0, "status": "ok"},
                                       {"config": "res1024", "resolution": 1024, "batch_size": 16,
                                        "peak_memory_mib": None, "status": "OOM"}]}},
        "train512": {"status": "not run", "budget_s": 5, "error": "5 s of the call's budget left"},
    },
}


def test_report_has_one_table_per_stage():
    report = gpu.render_report(RESULTS)
    lines = report.splitlines()
    assert lines[0] == "# GPU benchmarks: `colorize-dist bench gpu`"
    assert "| NVIDIA H100 80GB HBM3 | 580.159.04 | 2.11.0+cu130 | 13.0 | release 13.0 | 91300 | 2.4.0 | 3.12.3 | 790 " \
           "| 3,000 |" in lines
    assert "| train256 | timeout | 260 | 260 | stopped after its 260 s budget; results so far are kept |" in lines
    assert "| train512 | not run | – | 5 | 5 s of the call's budget left |" in lines
    assert "| rgb_to_lab: CUDA vs CPU kernel | 0.0001 | 0.001 | yes |" in lines
    assert ("| size | images | ours MP/s | ours GB/s | copy GB/s | ours / copy | kornia MP/s | ours / kornia "
            "| ours max err | kornia max err |") in lines
    assert "| 256² | 488 | 180,000 | 2,700 | 3,000 | 90% | 9,000 | 20.0× | 0.00029 | 6.1e-05 |" in lines
    assert "| 256² | 4096 | 2,000 | 2,500 | 9,000 | 4.50× | 6.5 / 3.25 / 0.5 |" in lines
    assert "| 512² | 1024 | 500 | 600 | – | – | – / – / – |" in lines
    assert "- 512² dali_mixed: RuntimeError: nvjpeg" in lines
    assert "| fp32 eager | 3 | 96 | 0.01 | 20,480 | 2.4% | 28.7% |  |" in lines
    assert any(line.startswith("| bf16 + channels_last + compile | – |") and "longer than 90 s" in line
               for line in lines)
    assert "| 2400 / 3000 | no | 150 | 600 | 27.5 | 24 | 3.5 | 30,000 |" in lines
    assert "Validation PSNR (Lab, dB) by step: 500: 25.00, 1000: 26.50." in lines
    assert "| res512 | 512² | 32 | 40,000 | 49% | ok |" in lines
    assert "| res1024 | 1024² | 16 | – | – | OOM |" in lines
    # 12000 MiB at 8, 40000 at 32: 1166.7 MiB per image, 2667 fixed; (0.9 × 81559 − 2667) / 1166.7 = 60.6
    assert "| res512 | 1,167 | 2,667 | 60 |" in lines
    assert not any(line.startswith("| res1024 | 1,") for line in lines)  # one measured point: no line
    # Every table's rows have as many cells as its header.
    for table in re.findall(r"(?:^\|.*\n?)+", report, flags=re.MULTILINE):
        widths = {len(re.split(r"(?<!\\)\|", line.strip())) for line in table.strip().splitlines()}
        assert len(widths) == 1, table


def test_report_of_several_calls_merges_their_stages(tmp_path):
    first = {"command": "call A", "started": "2026-11-22T10:00:00+00:00", "finished": "2026-11-22T10:09:00+00:00",
             "stages": {"env": RESULTS["stages"]["env"], "color": RESULTS["stages"]["color"]}}
    second = {"command": "call B", "started": "2026-11-22T10:10:00+00:00", "finished": "2026-11-22T10:19:00+00:00",
              "stages": {"env": RESULTS["stages"]["env"], "memory": RESULTS["stages"]["memory"],
                         "color": {"status": "not run", "budget_s": 3, "error": "3 s left"}}}
    paths = []
    for index, results in enumerate((first, second)):
        paths.append(tmp_path / f"r{index}.json")
        paths[-1].write_text(json.dumps(results))
    assert gpu.main(parse("--report", *map(str, paths), "--out", str(tmp_path / "out"))) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "call A ; call B" in report
    assert "## RGB → Lab on the GPU" in report and "## Peak GPU memory per batch size" in report
    assert "| color | ok |" in report  # a later call's "not run" does not hide an earlier result


# --- running without a GPU -------------------------------------------------------------------------------------------


@no_cuda
def test_no_cuda_device_exits_2_with_one_line(capsys, tmp_path):
    assert gpu.main(parse("--out", str(tmp_path))) == gpu.EXIT_NO_GPU
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("bench gpu: no CUDA device here")
    assert not list(tmp_path.iterdir())


@no_cuda
def test_no_cuda_device_from_the_command_line_is_not_a_traceback(tmp_path):
    process = subprocess.run([sys.executable, "-m", "colorize_dist.bench.gpu", "--stages", "color,memory"],
                             capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert process.returncode == 2
    assert "Traceback" not in process.stderr
    assert process.stderr.strip().splitlines() == [process.stderr.strip()]


def test_unknown_stage_is_one_line(capsys):
    assert gpu.main(parse("--stages", "color,bogus")) == 2
    assert "unknown bogus" in capsys.readouterr().err


def test_stages_always_start_with_build_and_env():
    assert gpu.selected_stages("memory,color") == ["build", "env", "color", "memory"]
    assert gpu.selected_stages("all") == list(gpu.STAGES)
    stages = [s for group in gpu.RUN_GROUPS for s in group]  # the device calls run every stage once
    assert sorted(stages) == sorted(s for s in gpu.STAGES if s not in gpu.ALWAYS)
    assert all(gpu.selected_stages(",".join(group))[2:] == list(group) for group in gpu.RUN_GROUPS)


@no_cuda
def test_failed_stages_are_recorded_and_the_rest_still_run(tmp_path):
    """Without a GPU every stage fails at once: each failure is a row of the report, not the end of the run."""
    out, work = tmp_path / "out", tmp_path / "work"
    code = gpu.run_stages(["build", "env"], out=out, work=work, budget=100, options={})
    assert code == 1
    results = json.loads((out / "results.json").read_text())
    assert [results["stages"][name]["status"] for name in ("build", "env")] == ["failed", "failed"]
    assert all("exit status 1" in results["stages"][name]["error"] for name in ("build", "env"))
    assert "| build | failed |" in (out / "report.md").read_text()
    assert "===== env =====" in (out / "log.txt").read_text()


def live_members(group: int) -> list[int]:
    """Processes of a process group that are not zombies (/proc/PID/stat: state is field 3, group field 5)."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == group and fields[0] != "Z":
                members.append(int(stat.parent.name))
    return members


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_stop_group_ends_the_stage_and_its_children():
    process = subprocess.Popen(["sh", "-c", "sleep 60 & sleep 60 & wait"], start_new_session=True)
    deadline = time.monotonic() + 10  # the shell and both sleeps (a loaded machine forks slowly)
    while len(live_members(process.pid)) < 3 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert len(live_members(process.pid)) == 3
    started = time.monotonic()
    gpu.stop_group(process)
    assert process.returncode == -signal.SIGTERM and time.monotonic() - started < 5
    assert live_members(process.pid) == []


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="reads /proc")
def test_sigterm_stops_the_running_stage_and_keeps_the_report(tmp_path):
    """The device tool ends a call at its limit: the stage's process group goes too, and the report stays."""
    fake = tmp_path / "fake-python"  # stands in for the stage worker: a process group that would outlive us
    fake.write_text("#!/bin/sh\nsleep 31.5 & sleep 31.5\n")
    fake.chmod(0o755)
    script = (f"import sys; from pathlib import Path; from colorize_dist.bench import gpu; "
              f"gpu.sys.executable = {str(fake)!r}; "
              f"sys.exit(gpu.run_stages(['build', 'env'], out=Path({str(tmp_path / 'out')!r}), "
              f"work=Path({str(tmp_path / 'work')!r}), budget=100, options={{}}))")
    process = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 30
    while not sleepers() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sleepers(), "the fake stage did not start"
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 1
    assert "SIGTERM during the build stage" in stderr
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert results["stages"]["build"]["status"] == "interrupted" and "env" not in results["stages"]
    assert "| build | interrupted |" in (tmp_path / "out" / "report.md").read_text()
    assert sleepers() == []


def sleepers() -> list[int]:
    """Live (not zombie) `sleep 31.5` processes: the fake stage's."""
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError):
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
            if (proc / "cmdline").read_bytes() == b"sleep\x0031.5\x00" and state != "Z":
                found.append(int(proc.name))
    return found
