"""`colorize-dist submit`: training submitted to Slurm with submitit; the job checkpoints and requeues itself at
time limits and preemption.

The config is checked here and written to RUN/config.yaml, which every start of the job trains with. With
--accelerate-config the tasks get the ACCELERATE_* variables Accelerate's launcher would compute, while the number of
processes and machines stays Slurm's. --elastic runs one torchrun agent per node (training/elastic.py)."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from colorize_dist.commands.resources import add_resource_arguments, resources_from_arguments
from colorize_dist.commands.train import add_arguments as add_training_arguments
from colorize_dist.launch.resources import SlurmResources

if TYPE_CHECKING:
    import submitit

    from colorize_dist.launch import slurm
    from colorize_dist.training.config import Config


DESCRIPTION = """\
Submit training to Slurm. The config, its overrides, --run-dir and --resume are those of `colorize-dist train`;
the resolved config goes to RUN/config.yaml, logs to RUN/slurm. Slurm runs one process per GPU (--tasks-per-node CPU
processes without GPUs), as DDP or, with --accelerate-config FILE, as `accelerate launch` would (DeepSpeed ZeRO,
mixed precision). Before --time runs out (--signal-delay seconds ahead) or on preemption the run saves a checkpoint
and requeues itself, up to --max-timeouts times. --elastic MIN_NODES[:MAX_RESTARTS] keeps training over lost nodes
(README "Surviving node failures").

  colorize-dist submit --config res256 --run-dir runs/res256 data.shards=/data/ffhq \\
      --nodes 2 --gpus-per-node 8 --partition gpu --time 24:00:00
  colorize-dist submit ... --dry-run     # print the resolved config and the sbatch script, submit nothing
  colorize-dist submit ... --nodes 4 --elastic 2:3   # goes on over node losses (down to 2 nodes)

Exit status: 0 submitted; 1 Slurm refused the job or is not installed; 2 bad configuration.
"""  # `colorize-dist submit --help`, for users

def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_training_arguments(parser)
    parser.add_argument("--accelerate-config", type=Path, metavar="FILE",
                        help="run the processes as `accelerate launch --config_file FILE` does, e.g. "
                             "configs/accelerate/deepspeed_zero2.yaml (default: DDP)")
    parser.add_argument("--elastic", metavar="MIN_NODES[:MAX_RESTARTS]",
                        help="torch elastic: one torchrun agent per node; the job goes on while MIN_NODES nodes are "
                             "left, over at most MAX_RESTARTS node losses (default 3)")
    add_resource_arguments(parser, "Slurm", required=("partition", "time", "gpus_per_node"))
    parser.add_argument("--dry-run", action="store_true",
                        help="print the resolved config and the sbatch script; submit nothing, write nothing")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.launch import slurm
    from colorize_dist.training.config import default_run_dir, load_training_config

    cfg = load_training_config(args.config, args.overrides)
    run_dir = args.run_dir or default_run_dir(cfg, args.config)
    resources = resources_from_arguments(args, SlurmResources(job_name=f"colorize-{run_dir.absolute().name}"))
    elastic = slurm.ElasticLaunch.parse(args.elastic) if args.elastic is not None else None
    job = slurm.training_job(cfg, run_dir, resources, args.resume, args.accelerate_config, elastic)
    if args.dry_run:
        print_dry_run(cfg, job, resources)
        return 0
    (submitted,) = slurm.submit([(cfg, job)], resources, job.run_dir / slurm.SUBMITIT_FOLDER)
    print_submitted(submitted, job, resources)
    return 0


def print_dry_run(cfg: Config, job: slurm.TrainingJob, resources: SlurmResources) -> None:
    import yaml

    from colorize_dist.launch import slurm

    script = slurm.sbatch_script(job, resources)
    print(f"# resolved config (written to {job.run_dir / slurm.CONFIG_NAME} on submission)")
    print(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False), end="")
    if job.elastic is not None:
        command = slurm.torchrun_command(job.elastic, resources.nodes, resources.processes_per_node,
                                         "<first node>:<port>", "<job id>", job.save_timeout_s,
                                         job.trainer_arguments(job.resume))
        variables = " ".join(f"{key}={value}" for key, value in slurm.ELASTIC_ENV.items())
        print(f"# each of the {resources.nodes} nodes runs one torchrun agent, with {variables}:")
        print(f"#   {shlex.join(command)}")
    else:
        print(f"# each of the {resources.num_processes} tasks runs, with RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR "
              "and MASTER_PORT from Slurm:")
    if job.accelerate_config is not None:
        env = slurm.accelerate_env(job.accelerate_config)
        variables = " ".join(f"{key}={value}" for key, value in sorted(env.items()))
        print(f"#   and, as `accelerate launch --config_file {job.accelerate_config}` "
              f"({slurm.describe_accelerate_env(env)}): {variables}")
    if job.elastic is None:
        print(f"#   {shlex.join(job.trainer_command(job.resume))}")
    print(f"# sbatch script (saved in {job.run_dir / slurm.SUBMITIT_FOLDER} on submission):")
    print(script, end="")


def print_submitted(submitted: submitit.Job, job: slurm.TrainingJob, resources: SlurmResources) -> None:
    paths = submitted.paths
    per_node = (f"1 torchrun agent × {resources.processes_per_node} process(es), elastic down to "
                f"{job.elastic.min_nodes} node(s)" if job.elastic is not None
                else f"{resources.processes_per_node} task(s)")
    print(f"submitted job {submitted.job_id} ({resources.nodes} node(s) × {per_node}, partition "
          f"{resources.partition}): run dir {job.run_dir}")
    print(f"  logs:   {paths.stdout}  {paths.stderr}  (task 0; other tasks: {submitted.job_id}_<task>_log.*)")
    print(f"  follow: tail -f {paths.stdout}")
    print(f"  status: squeue -j {submitted.job_id}     cancel: scancel {submitted.job_id}")
