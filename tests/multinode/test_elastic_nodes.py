"""The trainer under torch elastic on two machines (network namespaces, tests/multinode/netns.py): `torchrun --nnodes
1:2 --max-restarts N --rdzv-backend c10d`, 2 nodes × 1 process, the rendezvous on node 0. Node 1 is killed mid-run:

- the job goes on by itself on node 0 and finishes; the final weights equal those of one uninterrupted process;
- node 1 started again joins at the next re-formation; killed once more beyond the restart budget, the job ends with
  one line per loss and the checkpoints intact, and rerunning both nodes finishes equal to the uninterrupted run;
- slurm/multi_node.sbatch with MIN_NODES, and `colorize-dist submit --elastic`, on the local cluster's emulated
  nodes: a killed node's launcher and trainer, and the job still ends COMPLETED by itself, equal.

Both compare with one uninterrupted run (one plain process: the global batch makes every step the same samples on
any number of processes, tests/training/test_elastic.py). The machines have a prefix and a subnet of their own.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from colorize_dist import cli
from colorize_dist.launch.slurm import SUBMITIT_FOLDER, TrainingOutcome
from colorize_dist.training import checkpoint, elastic
from tests.launch.test_slurm import job_info, logs, run_cli, wait_for_first_checkpoint, wait_until_ended
from tests.multinode import netns
from tests.multinode.conftest import skip_or_fail
from tests.multinode.test_two_nodes import LOST_LINE, Node, intact_checkpoints, tails, wait
from tests.training.helpers import REPO, TRAIN_SCRIPT, subprocess_env, tiny_overrides, train_once

# The tiny GAN amplifies float noise, the more the larger its learning rate: at the tests' lr of 1e-3, a run resumed
# on 1 process from 2 processes' checkpoint at step 4 (where D starts) is 1.5e-5 from one uninterrupted process at
# step 10 and 1e-3 at step 16, though the two differ by 6e-8 at the resume. At LR = 2e-4 they stay within 1.2e-7 up
# to step 16 (and one process and two, both uninterrupted, too) on the batches of one sample per read; on those of
# the default order (runs of 8 neighbours) one process and two, uninterrupted, are 5e-4 apart at step 16, so the
# runs keep data.samples_per_read=1 (the order is the same for any number of processes either way). The runs stop
# at 16 steps, where equality means something, and checkpoint every 2 so that there is room for two losses and a
# return.
LR = 2e-4
MAX_STEPS = 16
EVERY = 2  # train.checkpoint_every
RENDEZVOUS_PORT = 29400
LAST_CALL_S = 2  # how long a re-formation waits for more nodes once it has MIN (torch's default: 30 s)
KILLED_BOUND_S = 300  # from a kill to the end of the survivor's job: detection, re-rendezvous, a start, the steps left
TOLERANCE = {"rtol": 0.0, "atol": 1e-5}  # see MAX_STEPS
REPORT = re.compile(r"^train: restart (\d+) of (\d+) after losing (.*) at step (\d+): (\d+) process(?:es)? now "
                    r"\((\d+) before\), resumed from step (\d+), (\d+) steps? lost; training again ([\d.]+) s after "
                    r"the loss was detected \(([\d.]+) s to this process's start, ([\d.]+) s from there to the "
                    r"checkpoint loaded\)$",
                    re.MULTILINE)


@pytest.fixture(scope="module")
def even_shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """68 training images: 17 whole batches of 4 per epoch."""
    out = tmp_path_factory.mktemp("elastic") / "shards"
    assert cli.main(["shards", "synth", str(out), "--n", "83", "--resolution", "16", "--format", "png",
                     "--shard-size", "40", "--val-fraction", "0.2", "--workers", "1"]) == 0
    return out


def settings(shards: Path) -> list[str]:
    return tiny_overrides(shards, **{
        "train.max_steps": MAX_STEPS, "train.checkpoint_every": EVERY, "train.keep_checkpoints": 100,
        "train.validate_every": MAX_STEPS, "train.sample_every": MAX_STEPS, "train.trackers": "[]", "optim.lr": LR,
        "data.samples_per_read": 1})  # the order LR was chosen on (see LR)


@pytest.fixture(scope="module")
def uninterrupted(even_shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, every step, no failure: the run each elastic run must end equal to."""
    run_dir = tmp_path_factory.mktemp("uninterrupted") / "run"
    result = train_once(run_dir, settings(even_shards))
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir


@pytest.fixture
def machines() -> Iterator[netns.Machines]:
    problem = netns.problem()
    if problem is not None:
        skip_or_fail(problem)
    with netns.Machines(2, prefix="colorize-elastic", subnet="10.233.0") as made:
        yield made


def elastic_torchrun(machine: netns.Machine, master: netns.Machine, run_dir: Path, overrides: list[str],
                     max_restarts: int) -> list[str]:
    """The README's elastic torchrun line. The machines' host names resolve to nothing here, so each names its own
    address (--local-addr) and whether it hosts the rendezvous (is_host), which torchrun otherwise finds by name."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1:2", "--nproc-per-node", "1",
            "--max-restarts", str(max_restarts), "--rdzv-backend", "c10d", "--rdzv-id", "elastic-test",
            "--rdzv-endpoint", f"{master.address}:{RENDEZVOUS_PORT}", "--local-addr", machine.address,
            "--rdzv-conf", f"last_call_timeout={LAST_CALL_S},is_host={int(machine is master)}",
            "--monitor-interval", "0.5", str(TRAIN_SCRIPT), "--run-dir", str(run_dir), *overrides]


def start(machines: netns.Machines, machine: netns.Machine, run_dir: Path, overrides: list[str], max_restarts: int,
          log: Path) -> Node:
    env = subprocess_env() | {"ACCELERATE_USE_CPU": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}  # see the README
    for name in ("GLOO_SOCKET_IFNAME", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = elastic_torchrun(machine, machines[0], run_dir, overrides, max_restarts)
    return Node(machine, machine.popen(command, log=log, env=env, cwd=REPO), log)


def wait_until(condition, nodes: list[Node], what: str, timeout: float = 300) -> float:
    """Poll `condition` until true; fails (with the logs) when a node's launcher ends first or time is up."""
    deadline = time.monotonic() + timeout
    while not condition():
        if any(node.process.poll() is not None for node in nodes) or time.monotonic() > deadline:
            pytest.fail(f"{what}: not after {timeout - deadline + time.monotonic():.0f} s\n{tails(nodes)}")
        time.sleep(0.1)
    return time.monotonic()


def saved_by(run_dir: Path) -> dict[int, int]:
    """Each complete step checkpoint's step → the number of processes that saved it."""
    root = run_dir / checkpoint.CHECKPOINTS
    return {json.loads((folder / checkpoint.MANIFEST).read_text())["step"]:
            json.loads((folder / checkpoint.MANIFEST).read_text())["world_size"]
            for folder in checkpoint.step_checkpoints(root)}


def assert_same_final_weights(reference: Path, run_dir: Path) -> float:
    """G and D of the last checkpoint and the exported EMA generator; returns the largest difference."""
    last = run_dir / checkpoint.CHECKPOINTS / checkpoint.step_name(MAX_STEPS)
    pairs = [(reference / checkpoint.CHECKPOINTS / checkpoint.step_name(MAX_STEPS) / name, last / name)
             for name in ("model.safetensors", "model_1.safetensors")]
    export = Path("export") / "generator_final.safetensors"
    pairs.append((reference / export, run_dir / export))
    largest = 0.0
    for expected_file, actual_file in pairs:
        expected, actual = load_file(expected_file), load_file(actual_file)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], **TOLERANCE,
                                       msg=lambda m, key=key, f=actual_file: f"{f.name} {key}: {m}")
            largest = max(largest, (actual[key].float() - expected[key].float()).abs().max().item())
    return largest


def lost_lines(node: Node) -> list[str]:
    return LOST_LINE.findall(node.output())


@pytest.mark.multinode
@pytest.mark.slow
def test_a_killed_node_leaves_the_job_to_finish_on_the_survivor_equal_to_an_uninterrupted_run(
        machines: netns.Machines, even_shards: Path, uninterrupted: Path, tmp_path: Path) -> None:
    run_dir, overrides = tmp_path / "run", settings(even_shards)
    nodes = [start(machines, machine, run_dir, overrides, 3, tmp_path / f"node{machine.index}.log")
             for machine in machines]
    wait_until(lambda: saved_by(run_dir), nodes, "a first checkpoint")
    killed = time.monotonic()
    machines[1].kill()
    detected = wait_until(lambda: lost_lines(nodes[0]), nodes[:1], "the lost-rank line", 60)
    (status,) = wait(nodes[:1], KILLED_BOUND_S)
    assert status == 0, tails(nodes)

    survivor = nodes[0].output()
    (line,) = lost_lines(nodes[0])
    assert line.startswith("train: lost rank 1 (node colorize-elastic-node1, 10.233.0.2) of 2 ranks"), line
    match = re.search(r"restart 1 of 3\), which resume from (\S+)$", line)
    assert match, line
    resumed_from = int(Path(match.group(1)).name.removeprefix("step-"))
    (report,) = REPORT.findall(survivor)
    restart, budget, who, at, now, before, step, lost, seconds, relaunch, start_up = report
    assert (restart, budget, who, now, before) == ("1", "3", "rank 1 (node colorize-elastic-node1, 10.233.0.2)",
                                                   "1", "2"), report
    assert int(step) == resumed_from and int(lost) == int(at) - resumed_from >= 0, report
    assert not (run_dir / elastic.LOST_RECORD).exists()  # reported once

    counts = saved_by(run_dir)
    assert sorted(counts) == list(range(EVERY, MAX_STEPS + 1, EVERY))
    assert counts[MAX_STEPS] == 1 and counts[EVERY] == 2, counts  # finished by the survivor alone
    largest = assert_same_final_weights(uninterrupted, run_dir)
    print(f"\nkilled node 1 at step {at}: lost-rank line {detected - killed:.1f} s after the kill; resumed from step "
          f"{step} ({lost} steps lost), training again {seconds} s after the detection ({relaunch} s to the new "
          f"process, {start_up} s to start it); largest weight difference "
          f"to the uninterrupted run {largest:.2g}\n{line}\n{REPORT.search(survivor).group(0)}")


@pytest.mark.multinode
@pytest.mark.slow
def test_a_returning_node_rejoins_and_a_failure_beyond_the_restart_budget_ends_the_job_in_one_line(
        machines: netns.Machines, even_shards: Path, uninterrupted: Path, tmp_path: Path) -> None:
    """--max-restarts 1: the first loss is restarted; node 1 comes back and joins (a membership change, which costs
    no restart); the second loss spends the budget. Rerunning both nodes then finishes the run."""
    run_dir, overrides = tmp_path / "run", settings(even_shards)
    nodes = [start(machines, machine, run_dir, overrides, 1, tmp_path / "first" / f"node{machine.index}.log")
             for machine in machines]
    wait_until(lambda: saved_by(run_dir), nodes, "a first checkpoint")
    machines[1].kill()
    wait_until(lambda: lost_lines(nodes[0]), nodes[:1], "the first lost-rank line", 60)
    first_loss = max(saved_by(run_dir))
    nodes[1] = start(machines, machines[1], run_dir, overrides, 1, tmp_path / "first" / "node1-back.log")

    # Back: a checkpoint after the loss saved by both processes means node 1 joined the re-formed group.
    wait_until(lambda: any(step > first_loss and size == 2 for step, size in saved_by(run_dir).items()), nodes,
               "node 1 rejoining")
    killed = time.monotonic()
    machines[1].kill()
    (status,) = wait(nodes[:1], KILLED_BOUND_S)
    ended = time.monotonic() - killed
    assert status != 0, tails(nodes)
    first, second = lost_lines(nodes[0])  # one line per loss
    assert first.endswith(f"(restart 1 of 1), which resume from {run_dir / checkpoint.CHECKPOINTS}/"
                          f"{checkpoint.step_name(first_loss)}"), first
    last = intact_checkpoints(run_dir)
    assert second.startswith("train: lost rank 1 (node colorize-elastic-node1, 10.233.0.2) of 2 ranks"), second
    assert second.endswith("torchrun's restart budget is spent (1 of --max-restarts 1): the job ends; rerun every "
                           f"node to resume from {last}"), second
    assert max(saved_by(run_dir)) < MAX_STEPS

    # Rerun every node, as the line says: it resumes from `last` and ends as the uninterrupted run.
    nodes = [start(machines, machine, run_dir, overrides, 1, tmp_path / "rerun" / f"node{machine.index}.log")
             for machine in machines]
    assert wait(nodes, 600) == [0, 0], tails(nodes)
    assert f"resumed from {last} at step {int(last.name.removeprefix('step-'))}" in nodes[0].output()
    assert re.search(r"^train: rerun after losing rank 1 \(node colorize-elastic-node1, 10\.233\.0\.2\) at step \d+: "
                     r"2 processes now \(2 before\)", nodes[0].output(), re.MULTILINE), tails(nodes)
    assert saved_by(run_dir)[MAX_STEPS] == 2
    largest = assert_same_final_weights(uninterrupted, run_dir)
    print(f"\nsecond loss beyond the budget: the job ended {ended:.1f} s after the kill with\n{second}\n"
          f"rerun: largest weight difference to the uninterrupted run {largest:.2g}")


def job_processes(job_id: str, node: str, markers: tuple[str, ...] = ("torchrun", "train.py")) -> list[int]:
    """The launcher and trainer processes of Slurm job `job_id` on `node` (not Slurm's own: slurmd, slurmstepd), by
    words of their command lines."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            environ = dict(item.split("=", 1) for item in (entry / "environ").read_text().split("\0") if "=" in item)
            command = (entry / "cmdline").read_text().replace("\0", " ")
        except (OSError, ValueError):
            continue
        if (environ.get("SLURM_JOB_ID") == job_id and environ.get("SLURMD_NODENAME") == node
                and any(marker in command for marker in markers)):
            found.append(int(entry.name))
    return found


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.slow
def test_the_elastic_slurm_template_finishes_on_the_node_left(multinode_partition: str, even_shards: Path,
                                                              uninterrupted: Path, tmp_path: Path) -> None:
    """slurm/multi_node.sbatch with MIN_NODES=1 on the local cluster's two emulated nodes; the launcher and trainer
    of the second node killed (as a crash would) after the first checkpoint. The job ends 0 by itself, equal."""
    run_dir = tmp_path / "run"
    (run_dir / SUBMITIT_FOLDER).mkdir(parents=True)
    env = subprocess_env() | {"MIN_NODES": "1", "MAX_RESTARTS": "1", "CONFIG": "configs/tiny.yaml",
                              "RUN_DIR": str(run_dir), "PROCESSES": "1", "ACCELERATE_USE_CPU": "1"}
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--no-kill", f"--partition={multinode_partition}", "--nodes=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=10", f"--output={run_dir / SUBMITIT_FOLDER}/%j_log.out", f"--chdir={REPO}",
         str(REPO / "slurm" / "multi_node.sbatch"), *settings(even_shards)],
        env=env, capture_output=True, text=True, check=True)
    job_id = submitted.stdout.strip()
    try:
        wait_for_first_checkpoint(run_dir)
        second = kill_second_node(job_id, run_dir)
        info = wait_until_ended(job_id, run_dir, timeout=KILLED_BOUND_S)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    log = (run_dir / SUBMITIT_FOLDER / f"{job_id}_log.out").read_text(errors="replace")
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{log[-3000:]}"
    assert re.search(rf"^train: lost rank \d \(node {second}, [\d.]+\) of 2 ranks: .*restart 1 of 1\), which resume",
                     log, re.MULTILINE), log[-3000:]
    assert re.search(r"^train: restart 1 of 1 after losing .* 1 process now \(2 before\)", log,
                     re.MULTILINE), log[-3000:]
    assert saved_by(run_dir)[MAX_STEPS] == 1
    assert_same_final_weights(uninterrupted, run_dir)


def kill_second_node(job_id: str, run_dir: Path, markers: tuple[str, ...] = ("torchrun", "train.py")) -> str:
    """SIGKILL to the launcher and trainer of the job's second node (as a crash would); its name."""
    second = subprocess.run(["scontrol", "show", "hostnames", job_info(job_id)["NodeList"]], capture_output=True,
                            text=True, check=True).stdout.split()[1]
    victims = job_processes(job_id, second, markers)
    assert victims, logs(run_dir)
    for pid in victims:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return second


def elastic_submit_args(partition: str, shards: Path, run_dir: Path) -> list:
    return ["submit", "--config", REPO / "configs" / "tiny.yaml", "--run-dir", run_dir, "--partition", partition,
            "--nodes", 2, "--gpus-per-node", 0, "--tasks-per-node", 1, "--cpus-per-task", 1, "--time", 10,
            "--elastic", "1:1", *settings(shards)]


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.slow
def test_submit_elastic_finishes_on_the_node_left(multinode_partition: str, even_shards: Path, uninterrupted: Path,
                                                 tmp_path: Path) -> None:
    """`colorize-dist submit --elastic 1:1` on the two emulated nodes: one torchrun agent per node; the second node's
    agent and trainer killed after the first checkpoint. The job ends COMPLETED by itself, equal."""
    run_dir = tmp_path / "run"
    submit = elastic_submit_args(multinode_partition, even_shards, run_dir)
    status, out, err = run_cli(*submit, "--dry-run")
    assert status == 0, err
    script = out[out.index("#!/bin/bash"):]
    assert {"#SBATCH --no-kill", "#SBATCH --ntasks-per-node=1"} <= set(script.splitlines()), script
    assert " --kill-on-bad-exit=0 " in script.splitlines()[-1], script
    test = subprocess.run(["sbatch", "--test-only"], input=script, capture_output=True, text=True)
    assert test.returncode == 0 and "to start at" in test.stderr, test.stderr
    status, out, err = run_cli(*submit)
    assert status == 0, err
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    try:
        wait_for_first_checkpoint(run_dir)
        second = kill_second_node(job_id, run_dir, ("torch.distributed.run", "colorize_dist.train"))
        info = wait_until_ended(job_id, run_dir, timeout=KILLED_BOUND_S)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    log = "\n".join(path.read_text(errors="replace") for path in sorted((run_dir / SUBMITIT_FOLDER).glob("*_log.*")))
    assert (info["JobState"], info["ExitCode"]) == ("COMPLETED", "0:0"), f"{info}\n{logs(run_dir)}"
    assert re.search(rf"^train: lost rank \d \(node {second}, [\d.]+\) of 2 ranks: .*restart 1 of 1\), which resume",
                     log, re.MULTILINE), logs(run_dir)
    assert re.search(r"^train: restart 1 of 1 after losing .* 1 process now \(2 before\)", log,
                     re.MULTILINE), logs(run_dir)
    # the first node's task: the run finished (the second node's task failed with its killed agent)
    first_task = pickle.loads((run_dir / SUBMITIT_FOLDER / f"{job_id}_0_result.pkl").read_bytes())
    assert first_task == ("success", TrainingOutcome(run_dir.absolute(), finished=True)), first_task
    assert saved_by(run_dir)[MAX_STEPS] == 1
    assert_same_final_weights(uninterrupted, run_dir)


@pytest.mark.multinode
@pytest.mark.slurm
@pytest.mark.slow
def test_submit_elastic_checkpoints_and_requeues_on_the_preemption_signal(multinode_partition: str,
                                                                          even_shards: Path, uninterrupted: Path,
                                                                          tmp_path: Path) -> None:
    """submitit's warning signal to an elastic job: every node's agent stops its trainer, which saves, instead of
    restarting it; the job requeues itself, resumes on both nodes and ends COMPLETED, equal."""
    run_dir = tmp_path / "run"
    status, out, err = run_cli(*elastic_submit_args(multinode_partition, even_shards, run_dir))
    assert status == 0, err
    job_id = re.search(r"submitted job (\d+)", out).group(1)
    try:
        wait_for_first_checkpoint(run_dir)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True)
        info = wait_until_ended(job_id, run_dir, timeout=KILLED_BOUND_S)
    finally:
        subprocess.run(["scancel", job_id], check=False)
    log = "\n".join(path.read_text(errors="replace") for path in sorted((run_dir / SUBMITIT_FOLDER).glob("*_log.*")))
    assert (info["JobState"], info["Restarts"]) == ("COMPLETED", "1"), f"{info}\n{logs(run_dir)}"
    # the first node's agent exited once the trainers had saved on SIGUSR1, before the requeue (no SIGTERM needed)
    assert re.search(r"^launch: the trainer exited with status 1 on the warning; requeueing$", log, re.MULTILINE), log
    assert f"Requeued job {job_id}" in log and "stop requested: checkpoint at step" in log, logs(run_dir)
    assert "restart 1 of 1" not in log, logs(run_dir)  # the agents stopped; none restarted its trainer
    outcomes = [pickle.loads(path.read_bytes()) for path in sorted((run_dir / SUBMITIT_FOLDER).glob(
        f"{job_id}_*_result.pkl"))]
    assert outcomes == [("success", TrainingOutcome(run_dir.absolute(), finished=True))] * 2, outcomes
    assert saved_by(run_dir)[MAX_STEPS] == 2
    assert_same_final_weights(uninterrupted, run_dir)
