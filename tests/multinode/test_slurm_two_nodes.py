"""`colorize-dist submit --nodes 2` on the local cluster's emulated nodes (`tests/tools/local_cluster.sh up --nodes 2`):
a real two-node job, each node its own network namespace, hostname and address, preempted, requeued and resumed.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from colorize_dist.launch.slurm import SUBMITIT_FOLDER
from colorize_dist.training import checkpoint
from tests.launch.test_slurm import (
    MAX_STEPS,
    job_info,
    run_cli,
    stopped_at_step,
    tiny_overrides,
    wait_for,
    wait_for_first_checkpoint,
    wait_until_ended,
)

REPO = Path(__file__).resolve().parents[2]


def task_logs(run_dir: Path) -> str:
    return "\n".join(f"==> {path.name} <==\n{path.read_text(errors='replace')}"
                     for path in sorted((run_dir / SUBMITIT_FOLDER).glob("*_log.*")))


@pytest.mark.slurm
@pytest.mark.multinode
@pytest.mark.slow
def test_submit_on_two_nodes_is_preempted_requeued_and_resumes(multinode_partition: str, shards: Path,
                                                                tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    status, out, err = run_cli("submit", "--config", REPO / "configs" / "tiny.yaml", "--run-dir", run_dir,
                               "--partition", multinode_partition, "--nodes", 2, "--gpus-per-node", 0,
                               "--tasks-per-node", 1, "--cpus-per-task", 1, "--time", "00:10:00",
                               *tiny_overrides(shards))
    assert status == 0, err
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    try:
        wait_for_first_checkpoint(run_dir)
        info = job_info(job_id)
        assert (info["NumNodes"], info["NodeList"]) == ("2", "colorize-n[1-2]"), info
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)  # what preemption sends (submitit)
        wait_for(lambda: job_info(job_id)["Restarts"] == "1" and job_info(job_id)["JobState"] == "RUNNING", 300,
                 "restart after the preemption signal", run_dir)
        info = wait_until_ended(job_id, run_dir)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    logs = task_logs(run_dir)
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", logs
    assert f"Requeued job {job_id}" in logs
    assert stopped_at_step(logs) < MAX_STEPS
    assert len(re.findall(r"resumed from \S+ at step", logs)) == 2, logs  # once per node (its local rank 0)
    # Both starts ran a rank on each node, each finding its own interface towards the first node.
    for address in ("10.232.0.11", "10.232.0.12"):
        assert logs.count(f"gloo: interface eth0 ({address}) towards MASTER_ADDR=colorize-n1") == 2, logs
    last = run_dir / checkpoint.CHECKPOINTS / f"step-{MAX_STEPS:07d}"
    assert checkpoint.check(last) is None
    files = json.loads((last / checkpoint.MANIFEST).read_text())["files"]
    assert {"random_states_0.pkl", "random_states_1.pkl"} <= set(files)
