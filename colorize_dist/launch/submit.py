"""Submit training to Slurm with submitit; the job checkpoints and requeues itself at time limits and preemption.

    colorize-dist submit --config res256 --run-dir runs/res256 data.shards=/data/ffhq \\
        --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00
    colorize-dist submit ... --dry-run     # print the resolved config and the sbatch script, submit nothing
    colorize-dist submit --config tiny --run-dir runs/cpu --gpus-per-node 0 --tasks-per-node 2 \\
        --partition debug --time 00:30:00  # CPU processes (gloo), e.g. on tests/tools/local_cluster.sh
    colorize-dist submit --config res1024 --accelerate-config configs/accelerate/deepspeed_zero2.yaml ...

The config, its overrides, --run-dir and --resume are the trainer's (`colorize-dist train`); the config is
checked here and written to RUN/config.yaml, which every start of the job trains with. Slurm runs one task per
GPU (--tasks-per-node CPU processes without GPUs), each running `python -m colorize_dist.train` with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT from Slurm. --accelerate-config FILE runs them as `accelerate
launch --config_file FILE` would (DeepSpeed, its ZeRO stage and offload, mixed precision: the ACCELERATE_*
variables Accelerate's launcher computes); the number of processes and machines is Slurm's, whatever the file
says. Without it the processes run DDP (gloo on CPUs). Logs and submitit's files go to RUN/slurm.
Before the time limit (--signal-delay seconds ahead) or on preemption the trainer saves a checkpoint and the job
requeues itself with --resume auto, up to --max-timeouts times, so a run longer than one allocation needs no
action. Exit status: 0 submitted; 1 Slurm refused the job or is not installed; 2 bad configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import math
import shlex
import sys
from pathlib import Path

import submitit
import yaml
from submitit.core.utils import FailedJobError, FailedSubmissionError

from colorize_dist.config import ConfigError
from colorize_dist.launch import slurm
from colorize_dist.training.command import add_arguments as add_training_arguments
from colorize_dist.training.config import Config, default_run_dir, load_training_config

EXIT_SLURM = 1
EXIT_USAGE = 2


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument("--accelerate-config", type=Path, metavar="FILE",
                        help="run the processes as `accelerate launch --config_file FILE` does, e.g. "
                             "configs/accelerate/deepspeed_zero2.yaml (default: DDP)")
    group = parser.add_argument_group("Slurm")
    group.add_argument("--partition", required=True, help="Slurm partition")
    group.add_argument("--time", required=True, type=time_limit_minutes, metavar="[D-]HH:MM:SS",
                       help="time limit of each allocation (the job requeues itself as often as needed)")
    group.add_argument("--nodes", type=positive_int, default=1, help="nodes (default 1)")
    group.add_argument("--gpus-per-node", type=int, required=True, metavar="G",
                       help="GPUs per node, one task each; 0: CPU training with --tasks-per-node processes")
    group.add_argument("--tasks-per-node", type=positive_int,
                       help="processes per node (default: --gpus-per-node, or 1 without GPUs)")
    group.add_argument("--cpus-per-task", type=positive_int, help="CPUs per process (data workers + 1 or more)")
    group.add_argument("--mem", help="memory per node, sbatch syntax (e.g. 64G)")
    group.add_argument("--account", help="account to charge")
    group.add_argument("--qos", help="quality of service")
    group.add_argument("--constraint", help="node features (sbatch --constraint)")
    group.add_argument("--exclusive", action="store_true", help="whole nodes only")
    group.add_argument("--job-name", help="job name (default: colorize-<run dir name>)")
    group.add_argument("--signal-delay", type=positive_int, default=120, metavar="SECONDS",
                       help="warn the job this long before its time limit, to checkpoint and requeue (default 120)")
    group.add_argument("--max-timeouts", type=int, default=20,
                       help="requeues after time limits before the job gives up (default 20; preemptions are free)")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the sbatch script; submit nothing, write nothing")


def main(args: argparse.Namespace) -> int:
    try:
        cfg = load_training_config(args.config, args.overrides)
        run_dir = args.run_dir or default_run_dir(cfg, args.config)
        resources = slurm_resources(args, run_dir)
        job = slurm.training_job(cfg, run_dir, resources, args.resume, args.accelerate_config)
    except ConfigError as exc:
        print(f"submit: {exc}", file=sys.stderr)
        return EXIT_USAGE
    try:
        if args.dry_run:
            print_dry_run(cfg, job, resources)
            return 0
        # submitit prints sbatch's stderr itself before raising; the message is printed once, below.
        with contextlib.redirect_stderr(io.StringIO()):
            submitted = slurm.submit(cfg, job, resources)
    except (FailedJobError, FailedSubmissionError) as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        print(f"submit: Slurm refused the job: {message}", file=sys.stderr)
        return EXIT_SLURM
    except RuntimeError as exc:  # submitit's "Could not detect srun": no Slurm here
        print(f"submit: {exc}", file=sys.stderr)
        return EXIT_SLURM
    print_submitted(submitted, job, resources)
    return 0


def slurm_resources(args: argparse.Namespace, run_dir: Path) -> slurm.SlurmResources:
    if args.gpus_per_node < 0:
        raise ConfigError(f"--gpus-per-node must be 0 or more, got {args.gpus_per_node}")
    if args.signal_delay * 2 > args.time * 60:
        raise ConfigError(f"--signal-delay {args.signal_delay} s must be at most half the time limit "
                          f"({args.time} min): Slurm may send the warning before the job can act on it")
    return slurm.SlurmResources(
        partition=args.partition, time_min=args.time, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
        tasks_per_node=args.tasks_per_node or max(1, args.gpus_per_node), cpus_per_task=args.cpus_per_task,
        mem=args.mem, account=args.account, qos=args.qos, constraint=args.constraint, exclusive=args.exclusive,
        signal_delay_s=args.signal_delay, max_timeouts=args.max_timeouts,
        job_name=args.job_name or f"colorize-{run_dir.absolute().name}",
    )


def print_dry_run(cfg: Config, job: slurm.TrainingJob, resources: slurm.SlurmResources) -> None:
    script = slurm.sbatch_script(job, resources)
    print(f"# resolved config (written to {job.run_dir / slurm.CONFIG_NAME} on submission)")
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    print(f"# each of the {resources.num_tasks} tasks runs, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and "
          "MASTER_PORT from Slurm:")
    if job.accelerate_config is not None:
        env = slurm.accelerate_env(job.accelerate_config)
        variables = " ".join(f"{key}={value}" for key, value in sorted(env.items()))
        print(f"#   and, as `accelerate launch --config_file {job.accelerate_config}` "
              f"({slurm.describe_accelerate_env(env)}): {variables}")
    print(f"#   {shlex.join(job.trainer_command(job.resume))}")
    print(f"# sbatch script (saved in {job.run_dir / slurm.SUBMITIT_FOLDER} on submission):")
    print(script, end="")


def print_submitted(submitted: submitit.Job, job: slurm.TrainingJob, resources: slurm.SlurmResources) -> None:
    paths = submitted.paths
    print(f"submitted job {submitted.job_id} ({resources.nodes} node(s) × {resources.tasks_per_node} task(s), "
          f"partition {resources.partition}): run dir {job.run_dir}")
    print(f"  logs:   {paths.stdout}  {paths.stderr}  (task 0; other tasks: {submitted.job_id}_<task>_log.*)")
    print(f"  follow: tail -f {paths.stdout}")
    print(f"  status: squeue -j {submitted.job_id}     cancel: scancel {submitted.job_id}")


def time_limit_minutes(text: str) -> int:
    """Slurm's [D-]HH:MM:SS (or MM) as whole minutes, rounded up: submitit counts the limit in minutes."""
    days, _, clock = text.rpartition("-")
    try:
        parts = [int(part) for part in clock.split(":")]
        if len(parts) == 1 and not days:
            hours, minutes, seconds = 0, parts[0], 0
        elif len(parts) == 3:
            hours, minutes, seconds = parts
        else:
            raise ValueError
        total = (int(days or 0) * 24 + hours) * 60 + minutes + math.ceil(seconds / 60)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a time limit like 24:00:00 or 2-00:00:00") from None
    if total < 1 or min(hours, minutes, seconds) < 0:
        raise argparse.ArgumentTypeError(f"time limit {text!r} must be at least one minute")
    return total


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value
