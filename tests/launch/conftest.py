"""The local Slurm cluster (tests/tools/local_cluster.sh) and synthetic shards for the launcher's tests.

Tests marked `slurm` need a reachable cluster. Without one they skip, saying why, unless
COLORIZE_DIST_REQUIRE_SLURM=1 (set by CI, which brings the cluster up), where they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

REQUIRE_SLURM = "COLORIZE_DIST_REQUIRE_SLURM"


def slurm_problem() -> str | None:
    """Why no Slurm job can run here, or None when the controller answers and the default partition is up."""
    if shutil.which("sbatch") is None:
        return "Slurm's commands are not installed (run: bash tests/tools/local_cluster.sh up)"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        last_line = (ping.stdout + ping.stderr).strip().splitlines()[-1:] or ["no output"]
        return f"the Slurm controller does not answer ({last_line[0]}); run: bash tests/tools/local_cluster.sh up"
    partitions = subprocess.run(["sinfo", "-h", "-o", "%P %a"], capture_output=True, text=True, timeout=30).stdout
    rows = (line.split() for line in partitions.splitlines())
    if not any(name.endswith("*") and available == "up" for name, available in rows):
        return f"no default Slurm partition is up (sinfo: {partitions.strip() or 'nothing'})"
    return None


@pytest.fixture(scope="session")
def partition() -> str:
    """The cluster's default partition; skips (or fails under COLORIZE_DIST_REQUIRE_SLURM=1) without Slurm."""
    problem = slurm_problem()
    if problem is not None:
        if os.environ.get(REQUIRE_SLURM) == "1":
            pytest.fail(f"{REQUIRE_SLURM}=1 but {problem}")
        pytest.skip(problem)
    lines = subprocess.run(["sinfo", "-h", "-o", "%P"], capture_output=True, text=True, check=True).stdout.split()
    return next(name.rstrip("*") for name in lines if name.endswith("*"))
