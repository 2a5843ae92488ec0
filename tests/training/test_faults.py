"""Faults a careful user hits, each ending in one clear line, the documented exit status and no lost work:
poisoned weights, broken checkpoint folders, a full disk, inputs checked before the first step, two runs on one
run directory, an unusable run directory, a killed launcher, a spent time budget."""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import shutil
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import torch
from accelerate import Accelerator

from colorize_dist import cli
from colorize_dist.commands import train as command
from colorize_dist.config import ConfigError
from colorize_dist.training import checkpoint, milestones
from colorize_dist.training.checkpoint import Progress
from colorize_dist.training.config import load_training_config
from colorize_dist.training.divergence import DivergedError
from colorize_dist.training.resume import find_resume
from tests.training.helpers import (
    LAUNCH_ENV,
    REPO,
    TRAIN_SCRIPT,
    launch_command,
    launch_script,
    subprocess_env,
    tiny_overrides,
    train_once,
    train_process,
)

BOUND_S = 120  # every faulty run below must be over well within this


def error_line(result: subprocess.CompletedProcess) -> str:
    """stderr's lines from the trainer itself (libraries may warn above them); exactly one is expected."""
    lines = [line for line in result.stderr.splitlines() if line.startswith("train: ")]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    return lines[0]


def timed_run(run_dir: Path, overrides: list[str], *extra: str) -> tuple[subprocess.CompletedProcess, float]:
    started = time.perf_counter()
    result = train_once(run_dir, overrides, *extra, timeout=BOUND_S)
    return result, time.perf_counter() - started


# ---------------------------------------------------------------- checkpoint folders (no training needed)

def fake_checkpoint(root: Path, step: int, manifest: dict | None = None) -> Path:
    """A step folder with one file and, unless told otherwise, a correct manifest."""
    folder = root / checkpoint.step_name(step)
    folder.mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(bytes(range(step % 200)) * 3)
    if manifest is None:
        data = (folder / "model.safetensors").read_bytes()
        manifest = {"step": step, "files": {"model.safetensors": {"size": len(data),
                                                                  "sha256": hashlib.sha256(data).hexdigest()}}}
    (folder / checkpoint.MANIFEST).write_text(json.dumps(manifest))
    return folder


@pytest.mark.parametrize("manifest", [{"step": 20}, {"step": 20, "files": {}}, [1, 2],
                                      {"step": "20", "files": {"a": {"size": 1, "sha256": "x"}}},
                                      {"step": 20, "files": {"a": {"size": "1"}}}])
def test_a_manifest_of_the_wrong_shape_is_skipped_with_a_warning(tmp_path: Path, manifest, caplog) -> None:
    good = fake_checkpoint(tmp_path, 10)
    fake_checkpoint(tmp_path, 20, manifest)
    assert "not a checkpoint manifest" in checkpoint.check(tmp_path / "step-0000020")
    assert checkpoint.latest_valid(tmp_path) == good
    assert "skipping checkpoint" in caplog.text and "step-0000020" in caplog.text


def test_pruning_keeps_the_newest_valid_checkpoints_whatever_newer_broken_ones_exist(tmp_path: Path) -> None:
    for step in (10, 20, 30):
        fake_checkpoint(tmp_path, step)
    for step in (40, 50):  # the newest two are broken (a crash, a bad disk)
        (fake_checkpoint(tmp_path, step) / "model.safetensors").write_bytes(b"truncated")
    (tmp_path / ".tmp-step-0000060").mkdir()  # an interrupted save
    removed = checkpoint.prune(tmp_path, keep=2)
    assert sorted(path.name for path in removed) == [".tmp-step-0000060", "step-0000010"]
    assert [path.name for path in checkpoint.step_checkpoints(tmp_path)] == [
        "step-0000020", "step-0000030", "step-0000040", "step-0000050"]
    assert checkpoint.prune(tmp_path, keep=2) == []  # the valid ones written after a restart are never deleted
    assert checkpoint.latest_valid(tmp_path).name == "step-0000030"


def test_resume_names_what_it_was_given_instead_of_a_checkpoint(tmp_path: Path) -> None:
    """Before: each of these read "no manifest.json (the save did not finish)"."""
    accelerator = Accelerator(cpu=True)
    run, nowhere = tmp_path / "run", tmp_path / "nowhere"
    newest = fake_checkpoint(run / "checkpoints", 10)
    cases = {
        nowhere: f"--resume {nowhere}: not a usable checkpoint: {nowhere} does not exist; pass a checkpoint folder",
        run: (f"--resume {run}: not a usable checkpoint: {run} is a run folder, not a checkpoint; continue the run "
              f"with --run-dir {run} --resume auto, or name one of its checkpoints (e.g. --resume {newest})"),
        run / "checkpoints": f"{run / 'checkpoints'} is the checkpoints folder of a run, not a checkpoint;",
    }
    for resume, words in cases.items():
        with pytest.raises(ConfigError) as raised:
            find_resume(accelerator, tmp_path / "another-run", str(resume))
        assert words in str(raised.value) and "\n" not in str(raised.value)


def test_a_run_whose_checkpoints_are_all_damaged_is_refused_unless_resume_none(tmp_path: Path, capsys) -> None:
    """Before: a warning per checkpoint, then training from step 0 without a word (replacing them as it went)."""
    accelerator = Accelerator(cpu=True)
    root = tmp_path / "checkpoints"
    for step in (10, 20):
        (fake_checkpoint(root, step) / "model.safetensors").write_bytes(b"truncated")
    with pytest.raises(ConfigError) as raised:
        find_resume(accelerator, tmp_path, "auto")
    assert str(raised.value) == (f"--resume auto: all 2 step checkpoints in {root} are damaged (newest step-0000020: "
                                 "model.safetensors does not match its checksum (corrupted or partly written); see "
                                 "the warnings above); restore one, or start afresh with --resume none")
    assert find_resume(accelerator, tmp_path, "none") is None
    assert "training starts afresh at step 0" in capsys.readouterr().out
    assert find_resume(accelerator, tmp_path / "fresh", "auto") is None  # no checkpoint at all: a first start


# ---------------------------------------------------------------- checked before the first step

@pytest.mark.parametrize("override", ["optim.lr=inf", "optim.lr=nan", "loss.alpha=-inf", "optim.betas=[0.5,nan]"])
def test_non_finite_numbers_in_the_config_are_refused(override: str, tmp_path: Path, capsys) -> None:
    assert cli.run("train", command.main, command.parse(["--run-dir", str(tmp_path), override])) == 2
    error = capsys.readouterr().err
    assert error.startswith("train: ") and "must be a finite number" in error and error.count("\n") == 1
    assert not (tmp_path / "config.yaml").exists()


@pytest.mark.slow
def test_inputs_that_would_fail_late_are_refused_before_the_first_step(shards: Path, tmp_path: Path) -> None:
    cases = {
        "train.fid_weights": (f"{tmp_path}/nowhere/inception.pth", "FID Inception weights not found at"),
        "train.batch_size": (4096, "train.batch_size=4096 is larger than the training split"),
    }
    for key, (value, message) in cases.items():
        run_dir = tmp_path / key
        result, seconds = timed_run(run_dir, tiny_overrides(shards, **{key: value}))
        assert result.returncode == 2 and message in error_line(result) and seconds < BOUND_S
        assert not (run_dir / "checkpoints").exists()


@pytest.mark.slow
def test_resuming_with_another_model_shape_is_one_line(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    assert train_once(run_dir, tiny_overrides(shards, **{"train.max_steps": 5})).returncode == 0
    result, _ = timed_run(run_dir, tiny_overrides(shards, **{"train.max_steps": 10, "model.generator.ndims": 8}))
    assert result.returncode == 2
    line = error_line(result)
    assert "step-0000005 does not fit this config" in line and "--resume none or another --run-dir" in line
    assert checkpoint.check(run_dir / "checkpoints" / "step-0000005") is None


@pytest.mark.slow
def test_resume_mistakes_end_in_one_line_naming_the_cause(shards: Path, tmp_path: Path) -> None:
    """A path that is not there, a run folder, a DDP checkpoint under ZeRO-2 (before: "does not fit this config
    (AssertionError)"), a run whose every checkpoint is damaged (before: retrained from step 0 without a word)."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shards, **{"train.max_steps": 4, "train.checkpoint_every": 2})
    assert train_once(run_dir, tiny_overrides(shards, **{"train.max_steps": 2})).returncode == 0
    for resume, words in ((tmp_path / "nowhere", "does not exist"), (run_dir, "is a run folder, not a checkpoint")):
        result, seconds = timed_run(tmp_path / "another", overrides, "--resume", str(resume))
        assert result.returncode == 2 and seconds < BOUND_S and words in error_line(result)

    started = time.perf_counter()  # one process under the ZeRO-2 config (DeepSpeed's first start builds an op: 2×)
    zero = launch_script("deepspeed_cpu_2proc.yaml", [str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *overrides],
                         "--num_processes", "1", timeout=2 * BOUND_S)
    assert zero.returncode != 0 and time.perf_counter() - started < 2 * BOUND_S
    assert not re.search(r'File ".*colorize_dist', zero.stderr), zero.stderr  # the launcher's report follows, no more
    assert [line for line in zero.stderr.splitlines() if line.startswith("train: ")] == [(
        f"train: checkpoint {run_dir / 'checkpoints' / 'step-0000002'} was saved without DeepSpeed (DDP or one "
        "process) and this run uses DeepSpeed ZeRO-2, which loads only DeepSpeed checkpoints; resume it with the "
        "accelerate config it was saved with (not a configs/accelerate/deepspeed_*.yaml), or start afresh with "
        "--resume none or another --run-dir")]

    for weights in (run_dir / "checkpoints").glob("step-*/model.safetensors"):
        weights.write_bytes(weights.read_bytes()[:-100] + bytes(100))
    result, seconds = timed_run(run_dir, overrides)
    assert result.returncode == 2 and seconds < BOUND_S
    assert "are damaged" in error_line(result) and "start afresh with --resume none" in error_line(result)
    result, _ = timed_run(run_dir, overrides, "--resume", "none")
    assert result.returncode == 0 and "training starts afresh at step 0" in result.stdout, result.stderr
    assert checkpoint.latest_valid(run_dir / "checkpoints").name == "step-0000004"


# ---------------------------------------------------------------- during the run

def test_a_background_save_is_never_seen_half_done_and_prunes_once_complete(tmp_path: Path) -> None:
    """Rank 0 hashes, renames and prunes after the step goes on: meanwhile the newest valid checkpoint is the
    previous one or the new one, never a partial folder; after `wait_for_saves`, exactly the newest `keep`."""
    accelerator = Accelerator(cpu=True)
    accelerator.prepare(torch.nn.Linear(64, 64))
    names = [checkpoint.step_name(step) for step in range(1, 5)]
    for index, name in enumerate(names):
        checkpoint.save_checkpoint(accelerator, tmp_path / name, background=True, keep=2, step=index + 1)
        latest = checkpoint.latest_valid(tmp_path)
        assert latest is None or latest.name in names[max(0, index - 1):index + 1]
    checkpoint.wait_for_saves(accelerator)
    assert [folder.name for folder in checkpoint.step_checkpoints(tmp_path)] == names[-2:]
    assert all(checkpoint.check(tmp_path / name) is None for name in names[-2:])
    assert not list(tmp_path.glob(".tmp-*"))


@pytest.mark.slow
def test_a_diverged_run_stops_in_one_line_before_it_is_called_finished(shards: Path, tmp_path: Path) -> None:
    """optim.lr=1e9: the losses stay finite (D's WGAN terms reach 1e19, G's tanh saturates), so the NaN guard never
    fires. Before: the run ended "finished" with its exports; now it stops at the logging step after the jump."""
    run_dir = tmp_path / "run"
    result, seconds = timed_run(run_dir, tiny_overrides(shards, **{"optim.lr": 1e9, "train.max_steps": 40}))
    assert result.returncode == DivergedError.exit_status == 1 and seconds < BOUND_S, result.stderr
    line = error_line(result)
    match = re.fullmatch(r"train: the losses diverged at step (\d+): their magnitude \S+ is \S+ times their running "
                         r"level \S+; the learning rate is the likely cause \(optim.lr=1e\+09\): lower it, or set "
                         r"optim.grad_clip > 0. The step was not checkpointed or exported", line)
    assert match and 4 < int(match.group(1)) < 40, line  # after the generator's 4 steps alone, when D joins
    step = int(match.group(1))
    assert not (run_dir / "summary.json").exists() and not (run_dir / "export" / "generator_final.safetensors").exists()
    assert all(checkpoint.check(folder) is None and int(folder.name[5:]) < step
               for folder in checkpoint.step_checkpoints(run_dir / "checkpoints"))


def test_weights_gone_non_finite_are_never_checkpointed(tmp_path: Path) -> None:
    """The guard itself (optim.lr=inf, the way a user got there, is refused by the config now)."""
    accelerator = Accelerator(cpu=True)
    model = accelerator.prepare(torch.nn.Linear(2, 2))
    cfg = load_training_config("tiny")
    root = tmp_path / "checkpoints"
    milestones.save_step_checkpoint(accelerator, cfg, root, Progress(step=5), model)
    with torch.no_grad():
        model.weight[0, 1] = math.inf
    with pytest.raises(milestones.NonFiniteLossError, match=re.escape(
            f"the weights became NaN/inf by step 10 and were not checkpointed; the last good checkpoint is "
            f"{root / 'step-0000005'}")):
        milestones.save_step_checkpoint(accelerator, cfg, root, Progress(step=10), model)
    assert [path.name for path in root.iterdir()] == ["step-0000005"]


@pytest.mark.slow
def test_a_second_run_on_the_same_run_dir_is_refused(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shards, **{"train.max_steps": 100000, "train.checkpoint_every": 10000,
                                          "train.validate_every": 10000, "train.sample_every": 10000})
    first = train_process(run_dir, overrides)
    try:
        deadline = time.monotonic() + BOUND_S
        while not (run_dir / "config.yaml").exists() and time.monotonic() < deadline:
            time.sleep(0.2)
        config_before = (run_dir / "config.yaml").read_text()
        second, seconds = timed_run(run_dir, tiny_overrides(shards, **{"train.max_steps": 3}))
        assert second.returncode == 2 and seconds < BOUND_S
        line = error_line(second)
        assert f"run dir {run_dir} is in use by another training run (pid {first.pid} on " in line
        assert (run_dir / "config.yaml").read_text() == config_before  # the running job's files are untouched
        assert first.poll() is None
    finally:
        first.kill()
        first.communicate()
    after_kill, _ = timed_run(run_dir, tiny_overrides(shards, **{"train.max_steps": 3}), "--resume", "none")
    assert after_kill.returncode == 0, after_kill.stderr  # a killed run leaves no stale lock


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_keeps_the_previous_one(shards: Path, tmp_path: Path) -> None:
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        run_dir = disk / "run"
        overrides = tiny_overrides(shards, **{"train.max_steps": 100000, "train.checkpoint_every": 20,
                                              "train.validate_every": 100000, "train.sample_every": 100000,
                                              "train.log_every": 100000, "train.keep_checkpoints": 5})
        process = train_process(run_dir, overrides)
        first = run_dir / "checkpoints" / "step-0000020"
        deadline = time.monotonic() + BOUND_S
        while checkpoint.check(first) is not None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.1)
        size = sum(path.stat().st_size for path in first.rglob("*"))
        free = shutil.disk_usage(disk).free
        with (disk / "filler").open("wb") as filler:  # leave room for half a checkpoint
            filler.write(bytes(free - size // 2))
        started = time.perf_counter()
        _, stderr = process.communicate(timeout=BOUND_S)
        assert time.perf_counter() - started < BOUND_S
        result = subprocess.CompletedProcess(process.args, process.returncode, "", stderr)
        assert result.returncode == 2
        # Which save hit the full disk depends on how far training got while the filler was written.
        match = re.fullmatch(rf"train: no space left on {re.escape(str(run_dir / 'checkpoints'))} to save checkpoint "
                             r"(step-\d+) \(.* needed\); free space or move the run dir, then rerun to resume; "
                             r"(\S+) is intact", error_line(result))
        assert match, error_line(result)
        failed, intact = match.group(1), Path(match.group(2))
        kept = checkpoint.step_checkpoints(run_dir / "checkpoints")
        assert kept and kept[-1] == intact and checkpoint.check(intact) is None and intact.name < failed
        assert all(checkpoint.check(folder) is None for folder in kept)
        assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # nothing partial left
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


def alive(processes: list[psutil.Process]) -> list[psutil.Process]:
    """Those still running (an exited process nobody has reaped yet is a zombie: it runs nothing)."""
    running = []
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            if process.status() != psutil.STATUS_ZOMBIE:
                running.append(process)
    return running


@pytest.mark.slow
def test_trainers_whose_launcher_is_killed_checkpoint_and_exit(shards: Path, tmp_path: Path) -> None:
    """SIGKILL of `accelerate launch` (the OOM killer, a `kill -9` of the job's main process) of a 2-process run: its
    trainers, each in a session of its own, notice, checkpoint at their next logging step and exit, with their
    loader workers, within 60 s; rerunning resumes from that checkpoint."""
    run_dir = tmp_path / "run"
    overrides = tiny_overrides(shards, **{"train.batch_size": 8, "train.max_steps": 100000,
                                          "train.checkpoint_every": 10000, "train.validate_every": 10000,
                                          "train.sample_every": 10000, "data.num_threads": 2})
    command = launch_command("cpu_2proc.yaml", [str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *overrides])
    with (tmp_path / "out.log").open("w") as out, (tmp_path / "err.log").open("w") as err:  # pipes nobody drains
        launcher = subprocess.Popen(command, stdout=out, stderr=err, cwd=REPO, start_new_session=True,
                                    env=subprocess_env() | LAUNCH_ENV["cpu_2proc.yaml"])
    try:
        deadline = time.monotonic() + BOUND_S
        while not list((run_dir / "logs").rglob("events.out.tfevents.*")) and time.monotonic() < deadline:
            time.sleep(0.2)  # the tracker starts after set-up: the loop is about to run
        processes = psutil.Process(launcher.pid).children(recursive=True)  # trainers and their loader workers
        running = [process for process in processes if str(TRAIN_SCRIPT) in process.cmdline()]
        trainers = [process for process in running  # a forked loader worker keeps its trainer's command line
                    if process.ppid() not in {other.pid for other in running}]
        assert len(trainers) == 2
        launcher.kill()
        launcher.wait()
        killed = time.monotonic()
        while alive(processes) and time.monotonic() < killed + 60:
            time.sleep(0.2)
        assert not alive(processes), (tmp_path / "err.log").read_text()[-3000:]
        print(f"every trainer and worker exited {time.monotonic() - killed:.1f} s after the launcher's kill")
    finally:
        for process in alive(psutil.Process(launcher.pid).children(recursive=True) if launcher.poll() is None
                             else []):
            process.kill()
    stdout = (tmp_path / "out.log").read_text()
    match = re.search(r"launcher gone \(a rank's parent process died\): checkpoint at step (\d+) saved", stdout)
    assert match, stdout[-3000:] + (tmp_path / "err.log").read_text()[-3000:]
    step = int(match.group(1))
    assert checkpoint.check(run_dir / "checkpoints" / checkpoint.step_name(step)) is None
    assert json.loads((run_dir / "summary.json").read_text())["finished"] is False

    rerun = train_once(run_dir, [*overrides, f"train.max_steps={step + 2}"], timeout=BOUND_S)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"at step {step}" in rerun.stdout and f"done at step {step + 2}" in rerun.stdout


@pytest.mark.slow
def test_max_time_stops_resumably_and_the_summary_adds_up_over_starts(shards: Path, tmp_path: Path) -> None:
    """train.max_time: a checkpoint and exit status 75 once the budget is spent; the rerun finishes, and
    RUN/summary.json's wall time and images seen count both starts (images: those of an uninterrupted run)."""
    run_dir, straight = tmp_path / "run", tmp_path / "straight"
    overrides = tiny_overrides(shards, **{"train.max_steps": 100000, "train.checkpoint_every": 10000,
                                          "train.validate_every": 10000, "train.sample_every": 10000})
    first, _ = timed_run(run_dir, [*overrides, "train.max_time=4s"])
    assert first.returncode == command.EXIT_RESUMABLE, first.stderr[-3000:]
    match = re.search(r"train.max_time=4s spent: checkpoint at step (\d+) saved; resume with --resume auto",
                      first.stdout)
    assert match, first.stdout[-3000:]
    step, before = int(match.group(1)), json.loads((run_dir / "summary.json").read_text())
    assert before["finished"] is False and before["step"] == step and before["wall_s"] >= 4.0

    finish, _ = timed_run(run_dir, [*overrides, f"train.max_steps={step + 3}"])
    assert finish.returncode == 0, finish.stderr[-3000:]
    after = json.loads((run_dir / "summary.json").read_text())
    assert after["finished"] is True and after["wall_s"] > before["wall_s"]
    assert train_once(straight, [*overrides, f"train.max_steps={step + 3}"], timeout=BOUND_S).returncode == 0
    assert after["images_seen"] == json.loads((straight / "summary.json").read_text())["images_seen"]


@pytest.mark.parametrize("value", ["2x", "-5m", "0"])
def test_a_bad_max_time_is_one_line(value: str, tmp_path: Path, capsys) -> None:
    args = command.parse(["--run-dir", str(tmp_path / "run"), f"train.max_time={value}"])
    assert cli.run("train", command.main, args) == 2
    line = capsys.readouterr().err.strip()
    assert line.startswith("train: train.max_time") and "\n" not in line


def test_a_run_dir_that_is_a_file_is_one_line(shards: Path, tmp_path: Path) -> None:
    taken = tmp_path / "taken"
    taken.write_text("a file the user keeps\n")
    result, seconds = timed_run(taken, tiny_overrides(shards, **{"train.max_steps": 1}))
    assert result.returncode == 2 and seconds < BOUND_S
    line = error_line(result)
    assert f"--run-dir {taken} is an existing file" in line
    assert taken.read_text() == "a file the user keeps\n"


@pytest.mark.slow
def test_a_run_dir_on_a_read_only_file_system_is_one_line(shards: Path, tmp_path: Path) -> None:
    disk = tmp_path / "readonly"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(disk)],
                      capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        result, seconds = timed_run(disk / "run", tiny_overrides(shards, **{"train.max_steps": 1}))
        assert result.returncode == 2 and seconds < BOUND_S
        line = error_line(result)
        assert f"--run-dir {disk / 'run'} cannot be written (Read-only file system" in line
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
