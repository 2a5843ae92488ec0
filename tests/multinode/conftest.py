"""Several machines on this host: `machines` (two network namespaces, tests/multinode/netns.py) for the trainer
launched by hand, and `multinode_partition` (tests/tools/local_cluster.sh up --nodes 2) for Slurm jobs.

Tests marked `multinode` skip, saying why, where these cannot be made (not root, no `ip netns`, no emulated Slurm
nodes), unless COLORIZE_DIST_REQUIRE_MULTINODE=1 (set by CI, which runs as root and brings the nodes up), where
they fail instead.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest

from tests.multinode import netns

REQUIRE_MULTINODE = "COLORIZE_DIST_REQUIRE_MULTINODE"
MULTINODE_PARTITION = "multinode"  # tests/tools/local_cluster.sh's partition of emulated nodes


def skip_or_fail(problem: str) -> None:
    if os.environ.get(REQUIRE_MULTINODE) == "1":
        pytest.fail(f"{REQUIRE_MULTINODE}=1 but {problem}")
    pytest.skip(problem)


@pytest.fixture
def machines() -> Iterator[netns.Machines]:
    """Two machines, colorize-node0 (10.231.0.1) and colorize-node1 (10.231.0.2); deleted after the test with
    every process left on them."""
    problem = netns.problem()
    if problem is not None:
        skip_or_fail(problem)
    with netns.Machines(2) as made:
        yield made


def partition_problem(partition: str, nodes: int) -> str | None:
    """Why `partition` cannot run a job of `nodes` nodes now, or None."""
    fix = f"run: bash tests/tools/local_cluster.sh up --nodes {nodes}"
    if shutil.which("sbatch") is None:
        return f"Slurm's commands are not installed ({fix})"
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        return f"the Slurm controller does not answer ({fix})"
    listed = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %T"], capture_output=True, text=True,
                            timeout=30).stdout.split("\n")
    usable = [line for line in listed if line.split()[1:2] and line.split()[1].rstrip("*~#") in
              {"idle", "mixed", "allocated", "completing"}]
    if len(usable) < nodes:
        return f"Slurm partition {partition} has {len(usable)} usable nodes, not {nodes} ({fix})"
    return None


@pytest.fixture(scope="session")
def multinode_partition() -> str:
    """The local cluster's partition of emulated nodes, with 2 of them up."""
    problem = partition_problem(MULTINODE_PARTITION, 2)
    if problem is not None:
        skip_or_fail(problem)
    return MULTINODE_PARTITION
