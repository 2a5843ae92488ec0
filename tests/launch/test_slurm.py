"""`colorize-dist submit` against a real Slurm cluster (tests/tools/local_cluster.sh): 2 CPU tasks with gloo.

The requeue tests interrupt jobs the ways a cluster does (the time-limit warning, the preemption signal,
`scontrol requeue`) and check that the run ends at its last step with the weights of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import io
import json
import pickle
import re
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colorize_dist import cli
from colorize_dist.config import ConfigError
from colorize_dist.launch import slurm
from colorize_dist.launch.resources import SlurmResources
from colorize_dist.launch.slurm import (
    RENDEZVOUS_PORTS,
    SUBMITIT_FOLDER,
    TrainingOutcome,
    accelerate_env,
    rendezvous_port,
    training_job,
)
from colorize_dist.training.config import load_training_config
from tests.training.helpers import TRAIN_SCRIPT, launch_script
from tests.training.helpers import tiny_overrides as training_tiny_overrides

REPO = Path(__file__).resolve().parents[2]
MAX_STEPS = 60
ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def tiny_overrides(shards: Path, **extra: object) -> list[str]:
    """The training tests' tiny model, for MAX_STEPS steps, validated and sampled only at the end."""
    return training_tiny_overrides(shards, **{
        "train.max_steps": MAX_STEPS, "train.log_every": 4, "train.sample_every": MAX_STEPS,
        "train.validate_every": MAX_STEPS, "train.checkpoint_every": 4, "train.trackers": "[]", **extra})


def run_cli(*argv: object) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = cli.main([str(arg) for arg in argv])
    return status, out.getvalue(), err.getvalue()


def submit_args(run_dir: Path, partition: str, shards: Path, *slurm_args: object, **overrides: object) -> list:
    return ["submit", "--config", REPO / "configs" / "tiny.yaml", "--run-dir", run_dir, "--partition", partition,
            "--gpus-per-node", 0, "--tasks-per-node", 2, "--cpus-per-task", 1, *slurm_args,
            *tiny_overrides(shards, **overrides)]


@pytest.fixture
def submit(partition: str, shards: Path) -> Iterator[Callable[..., str]]:
    """Submits a tiny 2-task training run and returns its job id; cancels what is left at the end of the test."""
    job_ids: list[str] = []

    def submit_run(run_dir: Path, *slurm_args: object, **overrides: object) -> str:
        status, out, err = run_cli(*submit_args(run_dir, partition, shards, *slurm_args, **overrides))
        assert status == 0, err
        job_ids.append(re.search(r"submitted job (\d+)", out).group(1))
        return job_ids[-1]

    yield submit_run
    for job_id in job_ids:
        subprocess.run(["scancel", job_id], check=False)


def job_info(job_id: str) -> dict[str, str]:
    text = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True,
                          check=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def logs(run_dir: Path) -> str:
    """Every task's log of the run, for failure messages."""
    return "\n".join(f"==> {path.name} <==\n{path.read_text()[-3000:]}"
                     for path in sorted((run_dir / SUBMITIT_FOLDER).glob("*_log.*")))


def wait_for(condition: Callable[[], bool], timeout: float, what: str, run_dir: Path, interval: float = 1.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} after {timeout:.0f} s\n{logs(run_dir)}")
        time.sleep(interval)


def wait_for_first_checkpoint(run_dir: Path) -> None:
    """Until the trainer is in its loop: its first step checkpoint (the run then has most of its steps left)."""
    wait_for(lambda: any((run_dir / "checkpoints").glob("step-*")), 300, "first checkpoint", run_dir, interval=0.1)


def stopped_at_step(task0_log: str) -> int:
    """The step at which the trainer saved on a stop request (it prints this once per stop)."""
    return int(re.search(r"stop requested: checkpoint at step (\d+) saved", task0_log).group(1))


def wait_until_ended(job_id: str, run_dir: Path, timeout: float = 400) -> dict[str, str]:
    wait_for(lambda: job_info(job_id)["JobState"] in ENDED, timeout, f"end of job {job_id}", run_dir)
    return job_info(job_id)


def task_outcomes(job_id: str, run_dir: Path) -> list[TrainingOutcome]:
    """What each task's TrainingJob returned, from submitit's result pickles."""
    outcomes = []
    for path in sorted((run_dir / SUBMITIT_FOLDER).glob(f"{job_id}_*_result.pkl")):
        kind, value = pickle.loads(path.read_bytes())
        assert kind == "success", value
        outcomes.append(value)
    return outcomes


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    """The exported EMA generator and the last checkpoint's generator and discriminator."""
    last = run_dir / "checkpoints" / f"step-{MAX_STEPS:07d}"
    weights = {f"ema.{k}": v for k, v in load_file(run_dir / "export" / "generator_final.safetensors").items()}
    for name in ("model.safetensors", "model_1.safetensors"):
        weights |= {f"{name}.{k}": v for k, v in load_file(last / name).items()}
    return weights


def assert_same_weights(run_dir: Path, reference_dir: Path) -> None:
    got, expected = final_weights(run_dir), final_weights(reference_dir)
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, msg=lambda message, key=key: f"{key}: {message}")


@pytest.fixture(scope="module")
def reference_run(partition: str, shards: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """An uninterrupted run: (run dir, job id)."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    status, out, err = run_cli(*submit_args(run_dir, partition, shards, "--time", "00:10:00"))
    assert status == 0, err
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    try:
        info = wait_until_ended(job_id, run_dir)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    assert info["JobState"] == "COMPLETED", logs(run_dir)
    return run_dir, job_id


@pytest.mark.slurm
@pytest.mark.slow
def test_submit_trains_to_completion_and_the_checkpoint_evaluates(reference_run, shards: Path) -> None:
    run_dir, job_id = reference_run
    assert job_info(job_id)["Restarts"] == "0"
    assert [outcome.finished for outcome in task_outcomes(job_id, run_dir)] == [True, True]
    slurm_files = {path.name for path in (run_dir / SUBMITIT_FOLDER).iterdir()}
    assert {f"{job_id}_submission.sh", f"{job_id}_0_log.out", f"{job_id}_1_log.out"} <= slurm_files
    task_log = (run_dir / SUBMITIT_FOLDER / f"{job_id}_1_log.out").read_text()
    # The launcher's line: submitit's JobEnvironment (rank 1 of 2), the rendezvous and the trainer's command.
    assert re.search(r"launch: JobEnvironment\(.*global_rank=1\(2\)\), start 0, rendezvous \S+:\d+: ", task_log), \
        logs(run_dir)
    assert (run_dir / "checkpoints" / f"step-{MAX_STEPS:07d}" / "manifest.json").is_file()

    status, _, err = run_cli("eval", "--checkpoint", run_dir, "--shards", shards, "--cpu", "--batch-size", 8)
    assert status == 0, err
    metrics = json.loads((run_dir / "eval" / "metrics.json").read_text())
    assert metrics["metrics"]["psnr_lab"] > 0, metrics


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_and_requeued_job_resumes_to_the_uninterrupted_weights(submit, reference_run,
                                                                          tmp_path: Path) -> None:
    """submitit's preemption signal (what `SlurmJob._interrupt()` sends): the trainer checkpoints, the job requeues
    itself and resumes. Then a Slurm-side `scontrol requeue` (SIGTERM to every process of the job, without warning):
    the restart resumes from the newest valid checkpoint, whether or not the trainers managed to save on SIGTERM."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "--time", "00:10:00")
    checkpoints = run_dir / "checkpoints"

    wait_for_first_checkpoint(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    wait_for(lambda: job_info(job_id)["Restarts"] == "1" and job_info(job_id)["JobState"] == "RUNNING", 300,
             "restart after the preemption signal", run_dir)
    task0_log = (run_dir / SUBMITIT_FOLDER / f"{job_id}_0_log.out").read_text()
    assert f"Requeued job {job_id}" in task0_log, logs(run_dir)
    stopped_at = stopped_at_step(task0_log)
    assert stopped_at < MAX_STEPS

    # Once the resumed trainer has saved again, Slurm requeues the job by itself: SIGTERM to every process.
    wait_for(lambda: any(int(path.name.removeprefix("step-")) > stopped_at for path in checkpoints.glob("step-*")),
             300, "checkpoint after the resume", run_dir, interval=0.1)
    subprocess.run(["scontrol", "requeue", job_id], check=True)
    info = wait_until_ended(job_id, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "2", logs(run_dir)
    task0_log = (run_dir / SUBMITIT_FOLDER / f"{job_id}_0_log.out").read_text()
    assert task0_log.count("resumed from") == 2, logs(run_dir)
    assert len(set(re.findall(r"rendezvous \S+:(\d+)", task0_log))) == 3  # a fresh rendezvous at every start
    assert all(outcome.finished for outcome in task_outcomes(job_id, run_dir))
    assert_same_weights(run_dir, reference_run[0])


@pytest.mark.slurm
@pytest.mark.slow
def test_deepspeed_job_is_preempted_requeues_and_finishes_with_the_same_step_count(submit, shards: Path,
                                                                                    tmp_path: Path) -> None:
    """`submit --accelerate-config deepspeed_zero2.yaml`: each task runs as `accelerate launch` would start it
    (DeepSpeed ZeRO-2, two engines; fp32 from the training config), checkpoints on the preemption signal, requeues,
    resumes from DeepSpeed's checkpoint and ends at the same step as an uninterrupted ZeRO-2 run of 2 processes,
    with its weights. Not the DDP run's: DDP's fused Adam and ZeRO's Adam over flat partitions round differently
    in the last bit, which this tiny GAN amplifies to 9e-3 over MAX_STEPS steps (6e-8 apart at step 8)."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "--time", "00:10:00", "--accelerate-config",
                    REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml")
    assert (run_dir / "accelerate.yaml").read_text() == (REPO / "configs/accelerate/deepspeed_zero2.yaml").read_text()
    wait_for_first_checkpoint(run_dir)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
    info = wait_until_ended(job_id, run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs(run_dir)
    task0_log = (run_dir / SUBMITIT_FOLDER / f"{job_id}_0_log.out").read_text()
    assert task0_log.count("DeepSpeed ZeRO-2, bf16 from") == 2, logs(run_dir)  # the file's precision: fp32 wins
    assert stopped_at_step(task0_log) < MAX_STEPS and "resumed from" in task0_log
    assert all(outcome.finished for outcome in task_outcomes(job_id, run_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["finished"], summary["step"], summary["mixed_precision"]) == (True, MAX_STEPS, "no")
    last = run_dir / "checkpoints" / f"step-{MAX_STEPS:07d}"
    assert {path.name for path in last.iterdir()} >= {"pytorch_model", "pytorch_model_1"}  # DeepSpeed's engines
    uninterrupted = tmp_path / "uninterrupted"
    launched = launch_script("deepspeed_cpu_2proc.yaml", [str(TRAIN_SCRIPT), "--run-dir", str(uninterrupted),
                                                          *tiny_overrides(shards)], timeout=900)
    assert launched.returncode == 0, launched.stderr[-3000:]
    ema = load_file(run_dir / "export" / "generator_final.safetensors")
    reference = load_file(uninterrupted / "export" / "generator_final.safetensors")
    for key, value in reference.items():
        torch.testing.assert_close(ema[key], value, rtol=0, atol=1e-6, msg=lambda message, key=key: f"{key}: {message}")


def test_an_accelerate_config_becomes_the_variables_accelerate_launch_sets(tmp_path: Path) -> None:
    env = accelerate_env(REPO / "configs" / "accelerate" / "deepspeed_zero2.yaml")
    expected = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2",
                "ACCELERATE_MIXED_PRECISION": "bf16"}
    assert {key: env[key] for key in expected} == expected
    assert all(key.startswith("ACCELERATE_") for key in env)  # devices, threads, rendezvous: Slurm's
    assert accelerate_env(REPO / "configs" / "accelerate" / "multi_gpu.yaml").get("ACCELERATE_USE_DEEPSPEED") is None
    broken = tmp_path / "broken.yaml"
    broken.write_text("distributed_type: NO_SUCH_THING\n")
    with pytest.raises(ConfigError, match=f"accelerate config {broken}: "):
        accelerate_env(broken)


def run_through_time_limit(job_id: str, run_dir: Path, trainer_pattern: str, warned: Callable[[], bool]
                           ) -> dict[str, str]:
    """Bring a running 10-minute job to its time-limit warning, then let it requeue and run to its end; returns its
    final job info. The trainers (processes matching `trainer_pattern`: the ranks and their data loader workers) are
    held with SIGSTOP until `warned()`, and the limit is set to end 60 to 120 s from now: within a 120 s warning,
    with time left to save and requeue."""
    trainers = subprocess.run(["pgrep", "-f", "--", trainer_pattern], capture_output=True, text=True,
                              check=True).stdout.split()
    assert len(trainers) >= 2
    subprocess.run(["kill", "-STOP", *trainers], check=True)
    try:
        elapsed_min = int(job_info(job_id)["RunTime"].split(":")[-2])
        subprocess.run(["scontrol", "update", f"JobId={job_id}", f"TimeLimit={elapsed_min + 2}"], check=True)
        wait_for(warned, 60, "time-limit warning", run_dir)
    finally:
        subprocess.run(["kill", "-CONT", *trainers], check=False)
    wait_for(lambda: job_info(job_id)["Restarts"] == "1", 120, "requeue", run_dir)
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "TimeLimit=10"], check=True)
    return wait_until_ended(job_id, run_dir)


@pytest.mark.slurm
@pytest.mark.slow
def test_time_limit_checkpoints_requeues_and_resumes_to_the_uninterrupted_weights(submit, reference_run,
                                                                                    tmp_path: Path) -> None:
    """Slurm's own warning before a time limit. Slurm checks limits every 30 s, so the test sets the limit with
    `scontrol update` once the run is under way and holds the trainers (SIGSTOP) until the warning has reached
    submitit: a run this small would otherwise finish first."""
    run_dir = tmp_path / "run"
    job_id = submit(run_dir, "--time", "00:10:00", "--signal-delay", 120)
    wait_for_first_checkpoint(run_dir)
    task0_log = run_dir / SUBMITIT_FOLDER / f"{job_id}_0_log.out"
    info = run_through_time_limit(job_id, run_dir, f"colorize_dist.train --config {run_dir}/config.yaml",
                                  lambda: "Caught signal SIGUSR2" in task0_log.read_text())
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs(run_dir)
    assert stopped_at_step(task0_log.read_text()) < MAX_STEPS
    assert all(outcome.finished for outcome in task_outcomes(job_id, run_dir))
    assert_same_weights(run_dir, reference_run[0])


@pytest.mark.slurm
@pytest.mark.slow
def test_a_sweep_runs_as_one_job_array(partition: str, shards: Path, tmp_path: Path) -> None:
    resources = SlurmResources(partition=partition, time="10", cpus_per_task=1, job_name="sweep")
    runs = []
    for seed in (0, 1):
        overrides = tiny_overrides(shards, **{"train.seed": seed, "train.max_steps": 8})
        cfg = load_training_config(REPO / "configs" / "tiny.yaml", overrides)
        runs.append((cfg, training_job(cfg, tmp_path / f"seed{seed}", resources)))
    jobs = slurm.submit(runs, resources, tmp_path / SUBMITIT_FOLDER)
    array_id = jobs[0].job_id.split("_")[0]
    assert [job.job_id for job in jobs] == [f"{array_id}_0", f"{array_id}_1"]
    for job, (_, training) in zip(jobs, runs, strict=True):
        assert wait_until_ended(job.job_id, tmp_path)["JobState"] == "COMPLETED", logs(tmp_path)
        assert task_outcomes(job.job_id, tmp_path) == [TrainingOutcome(training.run_dir, finished=True)]
        assert (training.run_dir / "export" / "generator_final.safetensors").is_file()


@pytest.mark.slurm
def test_dry_run_prints_a_valid_sbatch_script_and_writes_nothing(partition: str, shards: Path,
                                                                  tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    status, out, err = run_cli(*submit_args(run_dir, partition, shards, "--time", "1-00:00:00", "--dry-run"))
    assert status == 0, err
    assert f"max_steps: {MAX_STEPS}" in out  # the resolved config, overrides applied
    script = out[out.index("#!/bin/bash"):]
    assert "#SBATCH --ntasks-per-node=2" in script and "#SBATCH --time=1440" in script
    assert "#SBATCH --signal=USR2@120" in script
    test = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    assert not run_dir.exists()


@pytest.mark.slurm
def test_bad_partition_is_slurms_error_on_one_line(partition: str, shards: Path, tmp_path: Path) -> None:
    status, _, err = run_cli(*submit_args(tmp_path / "run", "no-such-partition", shards, "--time", "00:10:00"))
    assert status == 1
    assert err.startswith("submit: Slurm refused the job: sbatch: error: ") and err.count("\n") == 1, err
    assert "Invalid partition name specified" in err


@pytest.mark.slurm
@pytest.mark.parametrize("template", sorted((REPO / "slurm").glob("*.sbatch")), ids=lambda path: path.name)
def test_sbatch_templates_are_valid(partition: str, template: Path) -> None:
    """The templates ask for GPUs; here the command line overrides them to fit the local cluster."""
    test = subprocess.run(["sbatch", "--test-only", f"--partition={partition}", "--gpus-per-node=0",
                           "--cpus-per-task=1", "--nodes=1", "--mem=1G", str(template)],
                          capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr


def test_bad_config_is_one_line_and_submits_nothing(shards: Path, tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    status, _, err = run_cli(*submit_args(run_dir, "debug", shards, "--time", "00:10:00", **{"train.batch_size": 3}))
    assert status == 2 and len(err.strip().splitlines()) == 1, err
    assert err.startswith("submit: train.batch_size=3 ") and "2 × 1 = 2" in err, err  # 2 tasks × grad_accum 1
    status, _, err = run_cli(*submit_args(run_dir, "debug", shards, "--time", "00:10:00", **{"train.no_such": 1}))
    assert status == 2 and len(err.strip().splitlines()) == 1 and "no_such" in err, err
    assert not run_dir.exists()


def test_every_restart_gets_a_new_rendezvous_port_outside_the_ephemeral_range() -> None:
    """Ports the kernel hands out to outgoing connections (ip_local_port_range) could be taken by any socket."""
    ports = {rendezvous_port("1234", restarts) for restarts in range(20)}
    low, high = map(int, Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    assert len(ports) == 20 and all(1024 < port < low or port > high for port in ports)
    assert all(1024 < port < 32768 for port in RENDEZVOUS_PORTS)  # Linux's default range is 32768-60999
    for template in sorted((REPO / "slurm").glob("*.sbatch")):  # the templates' formula, for its extremes
        formula = re.search(r"PORT=\$\(\((\d+) \+ \(.*\) % (\d+)\)\)", template.read_text())
        first, count = int(formula.group(1)), int(formula.group(2))
        assert first > 1024 and first + count <= 32768, template.name
