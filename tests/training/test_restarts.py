"""What the trainer says around torch elastic's restarts (training/elastic.py), and the shipped elastic launch files.
The restarts themselves, on two emulated machines: tests/multinode/test_elastic_nodes.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from colorize_dist.training import elastic
from tests.training.helpers import REPO

LAST = Path("/shared/run/checkpoints/step-0000012")


@pytest.mark.parametrize(("environ", "expected"), [
    ({}, f"rerun every node to resume from {LAST}"),  # a static launch: no restarts
    ({"TORCHELASTIC_RESTART_COUNT": "0", "TORCHELASTIC_MAX_RESTARTS": "0"}, f"rerun every node to resume from {LAST}"),
    ({"TORCHELASTIC_RESTART_COUNT": "1", "TORCHELASTIC_MAX_RESTARTS": "3"},
     f"torchrun restarts the workers on the nodes left (restart 2 of 3), which resume from {LAST}"),
    ({"TORCHELASTIC_RESTART_COUNT": "3", "TORCHELASTIC_MAX_RESTARTS": "3"},
     "torchrun's restart budget is spent (3 of --max-restarts 3): the job ends; rerun every node to resume from "
     f"{LAST}"),
])
def test_the_lost_rank_line_says_whether_the_launcher_restarts_or_the_budget_is_spent(environ, expected) -> None:
    assert elastic.after_loss(LAST, environ) == expected


def test_a_loss_is_reported_once_by_the_next_start(tmp_path: Path) -> None:
    assert elastic.restart_report(tmp_path, 0, 2) is None  # no loss: nothing to say
    elastic.record_loss(tmp_path, "rank 1 (node n1, 10.0.0.2)", step=13, world_size=2)
    line = elastic.restart_report(tmp_path, 12, 1, {"TORCHELASTIC_RESTART_COUNT": "1",
                                                     "TORCHELASTIC_MAX_RESTARTS": "3"})
    assert line.startswith("restart 1 of 3 after losing rank 1 (node n1, 10.0.0.2) at step 13: 1 process now "
                           "(2 before), resumed from step 12, 1 step lost; training again "), line
    assert re.search(r"training again [\d.]+ s after the loss was detected \(-?[\d.]+ s to this process's start, "
                     r"[\d.]+ s from there to the checkpoint loaded\)$", line), line
    assert not (tmp_path / elastic.LOST_RECORD).exists()
    assert elastic.restart_report(tmp_path, 12, 1) is None

    elastic.record_loss(tmp_path, "ranks 2-3 (node n1, 10.0.0.2)", step=None, world_size=4)  # lost during start-up
    line = elastic.restart_report(tmp_path, 8, 2)  # a rerun by hand
    assert line.startswith("rerun after losing ranks 2-3 (node n1, 10.0.0.2): 2 processes now (4 before), resumed "
                           "from step 8, steps lost unknown; "), line


def test_the_readme_accelerate_line_launches_torchrun_with_a_c10d_rendezvous_on_the_first_node() -> None:
    """What `accelerate launch --config_file multi_node.yaml --rdzv_backend c10d --max_restarts 3` hands torchrun, by
    Accelerate's own code. (Accelerate takes both from its command line only: a file's rdzv_backend is overridden by
    the flag's default, `static`.)"""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_multi_gpu_env

    args = launch_command_parser().parse_args([
        "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"), "--rdzv_backend", "c10d",
        "--max_restarts", "3", "--main_process_ip", "10.0.0.1", "colorize_dist/train.py"])
    args, _, _ = _validate_launch_command(args)
    prepare_multi_gpu_env(args)
    assert (args.rdzv_backend, args.rdzv_endpoint, args.max_restarts) == ("c10d", "10.0.0.1:29500", 3)
    assert args.nnodes == "2"  # a fixed number of nodes: Accelerate cannot express torchrun's MIN:MAX


def test_the_multi_node_template_refuses_a_minimum_beyond_its_nodes_in_one_line(tmp_path: Path) -> None:
    """The elastic branch of slurm/multi_node.sbatch checks MIN_NODES before starting anything."""
    if shutil.which("scontrol") is None:  # the template asks Slurm for the first node's name
        pytest.skip("Slurm's scontrol is not installed")
    env = {"PATH": os.environ["PATH"], "SLURM_JOB_NODELIST": "node[0-1]", "SLURM_JOB_NUM_NODES": "2",
           "SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "x", "PROCESSES": "1", "MIN_NODES": "3"}
    result = subprocess.run(["bash", str(REPO / "slurm" / "multi_node.sbatch")], env=env, capture_output=True,
                            text=True, timeout=30, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "MIN_NODES=3: expected 1 to 2 (the job's nodes)"
    assert "srun" not in result.stderr  # refused before launching anything
