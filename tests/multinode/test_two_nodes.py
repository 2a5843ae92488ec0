"""The trainer on two machines: network namespaces on this host (tests/multinode/netns.py) that share one run
directory, as a cluster's nodes share a file system. `accelerate launch` with the shipped
configs/accelerate/multi_node.yaml (2 nodes × 1 process) and `torchrun` (2 nodes × 2 processes); mid-run, one node
is killed (kill -9) or frozen (SIGSTOP). The other node must end within a bounded time with one line naming what
was lost, the last checkpoint must be intact, and both nodes rerun with the same command resume from it and
finish with one checkpoint per interval.

GLOO_SOCKET_IFNAME is not set and the machines' host names resolve to nothing: the trainer picks the interface.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from colorize_dist.training import checkpoint
from tests.multinode.netns import Machine, Machines
from tests.training.helpers import REPO, TRAIN_SCRIPT, subprocess_env, tiny_overrides

MAX_STEPS = 40
EVERY = 4  # train.checkpoint_every
PORT = "29500"  # each machine has its own network: no other test's port to avoid
FROZEN_TIMEOUT_S = 20  # train.collective_timeout_s when a node freezes
KILLED_BOUND_S = 60  # a killed node: its peers' next collective fails at once ("Connection reset by peer")
FROZEN_SLACK_S = 40  # a frozen node: the timeout, then asking every rank (3 s), exiting, the launcher's shutdown
LOST_LINE = re.compile(r"^train: lost .*$", re.MULTILINE)


def overrides(shards: Path, **extra: object) -> list[str]:
    return tiny_overrides(shards, **{
        "train.max_steps": MAX_STEPS, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 100,
        "train.validate_every": MAX_STEPS, "train.sample_every": MAX_STEPS, "train.trackers": "[]", **extra})


def accelerate_launch(machine: Machine, master: Machine, run_dir: Path, settings: list[str]) -> list[str]:
    """The shipped multi-node config on CPU: the process count and precision overridden, gloo (ACCELERATE_USE_CPU)."""
    return [sys.executable, "-m", "accelerate.commands.launch",
            "--config_file", str(REPO / "configs" / "accelerate" / "multi_node.yaml"), "--num_processes", "2",
            "--machine_rank", str(machine.index), "--main_process_ip", master.address, "--main_process_port", PORT,
            "--mixed_precision", "no", str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *settings]


def torchrun(machine: Machine, master: Machine, run_dir: Path, settings: list[str]) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "2",
            "--node-rank", str(machine.index), "--master-addr", master.address, "--master-port", PORT,
            str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *settings]


@dataclass
class Node:
    machine: Machine
    process: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def start(machines: Machines, launcher: Callable[..., list[str]], run_dir: Path, settings: list[str],
          logs: Path) -> list[Node]:
    """The same command on every machine, as one would type it on each node; output to logs/nodeN.log."""
    logs.mkdir(parents=True)
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1"}
    for name in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return [Node(machine, machine.popen(launcher(machine, machines[0], run_dir, settings),
                                        log=logs / f"node{machine.index}.log", env=env, cwd=REPO),
                 logs / f"node{machine.index}.log")
            for machine in machines]


def tails(nodes: list[Node]) -> str:
    return "\n".join(f"==> {node.log} <==\n{node.output()[-4000:]}" for node in nodes)


def wait_for_first_checkpoint(run_dir: Path, nodes: list[Node], timeout: float = 300) -> None:
    """Until the run is in its loop with most of its steps ahead (its first periodic checkpoint)."""
    deadline = time.monotonic() + timeout
    while not list((run_dir / checkpoint.CHECKPOINTS).glob("step-*")):
        if any(node.process.poll() is not None for node in nodes) or time.monotonic() > deadline:
            pytest.fail(f"no checkpoint after {time.monotonic() - deadline + timeout:.0f} s\n{tails(nodes)}")
        time.sleep(0.1)


def wait(nodes: list[Node], timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    try:
        return [node.process.wait(timeout=max(0.1, deadline - time.monotonic())) for node in nodes]
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running after {timeout:.0f} s\n{tails(nodes)}")


def step_checkpoints(run_dir: Path) -> list[int]:
    return [int(folder.name.removeprefix("step-")) for folder in
            checkpoint.step_checkpoints(run_dir / checkpoint.CHECKPOINTS)]


def intact_checkpoints(run_dir: Path) -> Path:
    """Every step checkpoint left after the failure is complete (manifest and checksums); returns the newest."""
    root = run_dir / checkpoint.CHECKPOINTS
    for folder in checkpoint.step_checkpoints(root):
        assert checkpoint.check(folder) is None, folder
    last = checkpoint.latest_valid(root)
    assert last is not None
    return last


def rerun_resumes_and_finishes(machines: Machines, launcher: Callable[..., list[str]], run_dir: Path,
                               settings: list[str], logs: Path, last: Path, processes: int) -> None:
    """Both nodes again, the same command: rank 0 resumes from `last`; one checkpoint per interval in the end."""
    nodes = start(machines, launcher, run_dir, settings, logs)
    assert wait(nodes, 600) == [0, 0], tails(nodes)
    assert f"resumed from {last} at step {int(last.name.removeprefix('step-'))}" in nodes[0].output()
    assert step_checkpoints(run_dir) == list(range(EVERY, MAX_STEPS + 1, EVERY))
    assert not list((run_dir / checkpoint.CHECKPOINTS).glob(".tmp-*"))
    # Every rank of both machines wrote its part into the shared run directory.
    final = json.loads((run_dir / checkpoint.CHECKPOINTS / f"step-{MAX_STEPS:07d}" / checkpoint.MANIFEST).read_text())
    assert {f"random_states_{rank}.pkl" for rank in range(processes)} <= set(final["files"])


@pytest.mark.multinode
@pytest.mark.slow
def test_accelerate_launch_on_two_nodes_outlives_a_killed_node_and_resumes(machines: Machines, shards: Path,
                                                                            tmp_path: Path) -> None:
    run_dir, settings = tmp_path / "run", overrides(shards)
    first = start(machines, accelerate_launch, run_dir, settings, tmp_path / "first")
    wait_for_first_checkpoint(run_dir, first)
    killed = time.monotonic()
    machines[1].kill()  # every process of node 1: its launcher and its rank
    (status,) = wait(first[:1], KILLED_BOUND_S)
    elapsed = time.monotonic() - killed
    survivor = first[0].output()
    assert status != 0, tails(first)
    lines = LOST_LINE.findall(survivor)
    assert len(lines) == 1, tails(first)
    assert lines[0].startswith("train: lost rank 1 (node colorize-node1, 10.231.0.2) of 2 ranks"), lines
    assert "gloo: interface eth0 (10.231.0.1) towards MASTER_ADDR=10.231.0.1" in survivor
    last = intact_checkpoints(run_dir)
    assert lines[0].endswith(f"rerun every node to resume from {last}"), lines
    print(f"\nkilled node: the other ended {elapsed:.1f} s later with\n{lines[0]}")

    rerun_resumes_and_finishes(machines, accelerate_launch, run_dir, settings, tmp_path / "second", last, 2)


@pytest.mark.multinode
@pytest.mark.slow
def test_torchrun_on_two_nodes_of_two_outlives_a_frozen_node_and_resumes(machines: Machines, shards: Path,
                                                                          tmp_path: Path) -> None:
    """SIGSTOP: no connection breaks, the peers just stop answering; train.collective_timeout_s ends the wait."""
    run_dir = tmp_path / "run"
    settings = overrides(shards, **{"train.batch_size": 8, "train.collective_timeout_s": FROZEN_TIMEOUT_S})
    first = start(machines, torchrun, run_dir, settings, tmp_path / "first")
    wait_for_first_checkpoint(run_dir, first)
    frozen = time.monotonic()
    assert machines[1].signal(signal.SIGSTOP)
    try:
        (status,) = wait(first[:1], FROZEN_TIMEOUT_S + FROZEN_SLACK_S)
    finally:
        machines[1].kill()
    elapsed = time.monotonic() - frozen
    survivor = first[0].output()
    assert status != 0, tails(first)
    assert elapsed > FROZEN_TIMEOUT_S - 5, tails(first)  # it was the timeout that ended the wait
    lines = LOST_LINE.findall(survivor)
    assert len(lines) == 1, tails(first)  # one line for the node, from its lowest rank
    assert lines[0].startswith("train: lost ranks 2-3 (node colorize-node1, 10.231.0.2) of 4 ranks"), lines
    assert f"Timed out waiting {FROZEN_TIMEOUT_S * 1000}ms" in lines[0]
    last = intact_checkpoints(run_dir)
    assert lines[0].endswith(f"rerun every node to resume from {last}"), lines
    print(f"\nfrozen node, train.collective_timeout_s={FROZEN_TIMEOUT_S}: the other ended {elapsed:.1f} s later "
          f"with\n{lines[0]}")

    rerun_resumes_and_finishes(machines, torchrun, run_dir, settings, tmp_path / "second", last, 4)


@pytest.mark.multinode
def test_a_master_addr_that_no_interface_reaches_is_one_line(machines: Machines, shards: Path,
                                                             tmp_path: Path) -> None:
    """A node of a 2-node job whose MASTER_ADDR is on no network it has: one line naming what to set, at once."""
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1", "MASTER_ADDR": "203.0.113.7", "MASTER_PORT": PORT,
                              "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1", "RANK": "1", "LOCAL_RANK": "0"}
    env.pop("GLOO_SOCKET_IFNAME", None)
    log = tmp_path / "node1.log"
    process = machines[1].popen([sys.executable, str(TRAIN_SCRIPT), "--run-dir", str(tmp_path / "run"),
                                 *overrides(shards)], log=log, env=env, cwd=REPO)
    assert process.wait(timeout=120) == 2, log.read_text()
    last = log.read_text().strip().splitlines()[-1]
    errors = [line for line in log.read_text().splitlines() if line.startswith("train: ")]
    assert errors == [last], log.read_text()  # one line, the last
    assert "MASTER_ADDR='203.0.113.7'" in last and "GLOO_SOCKET_IFNAME" in last, last  # the value and the fix


@pytest.mark.slow
@pytest.mark.multinode
def test_a_killed_launcher_on_one_node_stops_every_trainer_and_the_rerun_resumes(machines: Machines, shards: Path,
                                                                                 tmp_path: Path) -> None:
    """SIGKILL of node 1's torchrun (2 × 2 processes) alone, as the OOM killer or a `kill -9` of that node's job
    step does: node 1's trainers, orphaned, stop as on SIGTERM; the ranks agree at their next logging step, every
    rank of both nodes checkpoints and exits, and nothing is left running on either node."""
    run_dir = tmp_path / "run"
    settings = overrides(shards, **{"train.batch_size": 8, "train.max_steps": 100000, "train.checkpoint_every": 10000,
                                    "train.sample_every": 4})
    first = start(machines, torchrun, run_dir, settings, tmp_path / "first")
    deadline = time.monotonic() + 300
    while not (run_dir / "samples" / "step-0000004.png").exists():  # the loop has taken 4 steps
        if any(node.process.poll() is not None for node in first) or time.monotonic() > deadline:
            pytest.fail(f"the loop did not get to step 4\n{tails(first)}")
        time.sleep(0.2)
    killed = time.monotonic()
    first[1].process.kill()  # node 1's launcher alone; its trainers live on, in sessions of their own
    while (machines[0].pids() or machines[1].pids()) and time.monotonic() < killed + 60:
        time.sleep(0.2)
    elapsed = time.monotonic() - killed
    assert not machines[0].pids() and not machines[1].pids(), tails(first)
    match = re.search(r"launcher gone \(a rank's parent process died\): checkpoint at step (\d+) saved",
                      first[0].output() + first[1].output())
    assert match, tails(first)
    last = run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(int(match.group(1)))
    assert checkpoint.check(last) is None
    print(f"\nkilled launcher of node 1: every process of both nodes gone {elapsed:.1f} s later")

    finish = overrides(shards, **{"train.batch_size": 8, "train.max_steps": int(match.group(1)) + 4})
    nodes = start(machines, torchrun, run_dir, finish, tmp_path / "second")
    assert wait(nodes, 600) == [0, 0], tails(nodes)
    assert f"resumed from {last} at step {int(match.group(1))}" in nodes[0].output()
