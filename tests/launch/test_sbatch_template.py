"""slurm/single_node.sbatch run as a user would submit it, on the local cluster's CPU node
(tests/tools/local_cluster.sh).

The template's own stop path, not submitit's: Slurm warns the batch script (B:USR1), the script passes SIGUSR1 to
the trainers and requeues the job only after they saved; the requeued job resumes.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

from colorize_dist.launch.slurm import SUBMITIT_FOLDER
from tests.launch.test_slurm import (
    MAX_STEPS,
    REPO,
    run_through_time_limit,
    stopped_at_step,
    tiny_overrides,
    wait_for_first_checkpoint,
)
from tests.training.helpers import subprocess_env

TEMPLATE = REPO / "slurm" / "single_node.sbatch"
CONFIG = "configs/tiny.yaml"


def submit_template(partition: str, run_dir: Path, overrides: list[str]) -> str:
    """The template unchanged, with the command-line options and environment a CPU node needs: no GPUs, so
    PROCESSES=2 trainers with gloo (ACCELERATE_USE_CPU=1); a 10-minute limit; the repository as working directory.
    The overrides are the script's arguments, which Slurm passes again to the requeued start. Its log goes to
    RUN/slurm/<job id>_log.out, where the shared helpers look for logs to show on a failure."""
    (run_dir / SUBMITIT_FOLDER).mkdir(parents=True)
    env = subprocess_env() | {"CONFIG": CONFIG, "RUN_DIR": str(run_dir), "PROCESSES": "2", "ACCELERATE_USE_CPU": "1"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--partition={partition}", "--gpus-per-node=0", "--cpus-per-task=2", "--time=10",
         f"--output={run_dir / SUBMITIT_FOLDER}/%j_log.out", f"--chdir={REPO}", str(TEMPLATE), *overrides],
        env=env, capture_output=True, text=True, check=True)
    return submitted.stdout.strip()


@pytest.mark.slurm
@pytest.mark.slow
def test_single_node_template_checkpoints_before_the_time_limit_requeues_and_resumes(partition: str, shards: Path,
                                                                                      tmp_path: Path) -> None:
    """As in test_slurm's time-limit test (`run_through_time_limit`), the warning the script gets this time."""
    run_dir = tmp_path / "run"
    job_id = submit_template(partition, run_dir, tiny_overrides(shards))
    log = run_dir / SUBMITIT_FOLDER / f"{job_id}_log.out"
    try:
        wait_for_first_checkpoint(run_dir)
        # The ranks and their data loader workers; not the launcher, whose command line names train.py too.
        trainers = f"-u colorize_dist/train.py --config {CONFIG} --run-dir {run_dir} "
        info = run_through_time_limit(job_id, run_dir, trainers, lambda: "time limit near" in log.read_text())
    finally:
        subprocess.run(["scancel", job_id], check=False)

    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", text
    warning = re.search(rf"time limit near: [^\n]*job {job_id} requeues", text).start()
    stopped_at = stopped_at_step(text)
    assert stopped_at < MAX_STEPS
    saved = text.index(f"stop requested: checkpoint at step {stopped_at} saved")
    restarted = text.index(f"job {job_id} start 1 ")
    assert warning < saved < restarted, text  # the requeue waited for the save
    assert re.search(rf"resumed from \S+ at step {stopped_at}\b", text[restarted:]), text
    assert len(set(re.findall(rf"job {job_id} start \d .*, port (\d+)", text))) == 2, text  # a new rendezvous
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["finished"], summary["step"]) == (True, MAX_STEPS), summary
