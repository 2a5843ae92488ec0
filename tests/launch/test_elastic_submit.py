"""`colorize-dist submit --elastic`: the torchrun agent each node's task runs, its environment, the sbatch script, and
the bounds refused before anything is submitted. The sbatch script and the job on the local cluster's emulated nodes:
tests/multinode/test_elastic_nodes.py.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import submitit
from torch.distributed.run import get_args_parser

from colorize_dist.config import ConfigError
from colorize_dist.launch.resources import SlurmResources
from colorize_dist.launch.slurm import (
    CONFIG_NAME,
    ELASTIC_ENV,
    ElasticLaunch,
    rendezvous_port,
    torchrun_command,
    training_job,
)
from colorize_dist.training.config import load_training_config
from tests.launch.test_slurm import REPO, run_cli, submit_args, tiny_overrides

RESOURCES = SlurmResources(partition="debug", time="00:30:00", nodes=2, gpus_per_node=0, tasks_per_node=2,
                           cpus_per_task=3, signal_delay=120)


def slurm_task(monkeypatch: pytest.MonkeyPatch, node: int, restarts: int) -> submitit.JobEnvironment:
    """submitit's view of task `node` of a 2-node job with one task per node, from the variables Slurm sets."""
    for key, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "4242", "SLURM_NTASKS": "2",
                       "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "gpu[07-08]", "SLURM_NODEID": str(node),
                       "SLURM_PROCID": str(node), "SLURM_LOCALID": "0", "SLURM_RESTART_COUNT": str(restarts),
                       "SLURM_CPUS_PER_TASK": "6"}.items():
        monkeypatch.setenv(key, value)
    return submitit.JobEnvironment()


def elastic_job(shards: Path, run_dir: Path, spec: str = "1:2"):
    cfg = load_training_config(REPO / "configs" / "tiny.yaml", tiny_overrides(shards))
    return training_job(cfg, run_dir, RESOURCES, "none", elastic=ElasticLaunch.parse(spec))


@pytest.mark.parametrize("restarts", [0, 1])
def test_each_node_runs_one_torchrun_agent_meeting_on_the_first_node(monkeypatch: pytest.MonkeyPatch, shards: Path,
                                                                     tmp_path: Path, restarts: int) -> None:
    job = elastic_job(shards, tmp_path / "run")
    commands = []
    for node in (0, 1):
        command, env = job.launch(slurm_task(monkeypatch, node, restarts), restarts, {"SLURM_CPUS_PER_TASK": "6"})
        assert command[1:3] == ["-m", "torch.distributed.run"]
        commands.append(command)
        # torchrun sets each trainer's RANK, WORLD_SIZE and MASTER_*; the task passes none of the static ones
        assert env == {"SLURM_CPUS_PER_TASK": "6", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1",
                       "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "3"}  # 6 CPUs for 2 trainers
    assert commands[0] == commands[1]  # the same agent on every node: no node rank
    args = get_args_parser().parse_args(commands[0][3:])  # as torchrun reads it
    assert (args.nnodes, args.nproc_per_node, args.max_restarts) == ("1:2", "2", 2)
    assert (args.rdzv_backend, args.rdzv_id) == ("c10d", "4242")
    assert args.rdzv_endpoint == f"gpu07:{rendezvous_port('4242', restarts)}"  # a new port at every requeue
    assert "SIGUSR1" in args.signals_to_handle.split(",") and args.shutdown_timeout == 100  # signal_delay - 20
    assert args.module and args.training_script == "colorize_dist.train"
    run_dir = (tmp_path / "run").absolute()
    assert args.training_script_args == ["--config", str(run_dir / CONFIG_NAME), "--run-dir", str(run_dir),
                                         "--resume", "none" if restarts == 0 else "auto"]


def test_the_restart_budget_defaults_to_three_and_bad_bounds_are_one_line(shards: Path, tmp_path: Path) -> None:
    assert ElasticLaunch.parse("2") == ElasticLaunch(min_nodes=2, max_restarts=3)
    assert ElasticLaunch.parse("1:0") == ElasticLaunch(min_nodes=1, max_restarts=0)
    for spec in ("", "x", "1:2:3", "-1", "0", "1:-2"):
        with pytest.raises(ConfigError, match=f"^--elastic {spec}: "):
            ElasticLaunch.parse(spec)
    run_dir = tmp_path / "run"
    cases = [  # submit's flags, the global batch → the one line it answers with (status 2, nothing written)
        (("--nodes", 2, "--elastic", "3"), 4, "submit: --elastic 3: MIN_NODES must be at most --nodes 2"),
        (("--nodes", 2, "--elastic", "one"), 4,
         "submit: --elastic one: expected MIN_NODES or MIN_NODES:MAX_RESTARTS"),
        # 3 nodes × 2 processes divide the batch of 6, the 2 nodes × 2 left after a loss do not
        (("--nodes", 3, "--elastic", "1"), 6, "submit: --elastic 1: on 2 node(s) left, train.batch_size=6 is not "
                                              "divisible by processes × train.grad_accum = 4 × 1 = 4"),
    ]
    for flags, batch_size, line in cases:
        status, _, err = run_cli(*submit_args(run_dir, "debug", shards, "--time", "00:10:00", *flags,
                                              **{"train.batch_size": batch_size}))
        assert status == 2 and err.count("\n") == 1 and err.startswith(line), err
    assert not run_dir.exists()



def test_the_multi_node_template_runs_the_same_agent() -> None:
    """slurm/multi_node.sbatch with MIN_NODES and `submit --elastic`: the same torchrun options and environment."""
    text = (REPO / "slurm" / "multi_node.sbatch").read_text()
    template = shlex.split(re.search(r"exec torchrun (.*?) colorize_dist/train\.py", text.replace("\\\n", " "),
                                     re.DOTALL).group(1))
    ours = torchrun_command(ElasticLaunch(1, 3), 2, 8, "node1:29400", "7", 100, [])[3:-2]  # before -m MODULE
    template_options, our_options = (dict(zip(words[::2], words[1::2], strict=True)) for words in (template, ours))
    assert list(template_options) == list(our_options)
    for option in ("--rdzv-backend", "--signals-to-handle", "--shutdown-timeout"):  # the rest: the job's numbers
        assert template_options[option] == our_options[option], option
    assert all(f"{key}={value}" in text for key, value in ELASTIC_ENV.items())
