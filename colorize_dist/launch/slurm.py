"""Training as a submitit job on Slurm: one task per GPU (or per CPU process), checkpoint and requeue.

Every Slurm task runs a `TrainingJob`. It derives torch.distributed's `env://` variables from submitit's
JobEnvironment and runs the trainer (`python -m colorize_dist.train`, the same command line as by hand) as a
child process, so that this process's signal handler can wait for the trainer to save. With an accelerate config
(`submit --accelerate-config FILE`, copied to RUN/accelerate.yaml), each trainer also gets the ACCELERATE_*
variables that `accelerate launch --config_file FILE` gives the processes it starts (DeepSpeed and its ZeRO stage,
offload, mixed precision), computed by Accelerate's own launcher code; the process count and machines are Slurm's.

Before a time limit (Slurm's `--signal=USR2@signal_delay`) or on preemption (`scancel --signal=USR2 JOB`):
  1. Slurm sends submitit's warning signal (USR2) to the job's processes; the trainers ignore it.
  2. submitit's handler on global rank 0 calls `TrainingJob.checkpoint()`, which sends SIGUSR1 to its trainer.
  3. The trainer's ranks agree to stop at the next step boundary (one all-reduce per step), all save the step
     checkpoint and exit with EXIT_RESUMABLE.
  4. `checkpoint()` returns a fresh submission of the job with `--resume auto`; submitit pickles it in place of
     the submitted one, runs `scontrol requeue` and exits.
  5. Slurm starts the job again, possibly on other nodes; every task derives a fresh rendezvous (master = first
     node of the new allocation, port from the job id and SLURM_RESTART_COUNT) and the trainer resumes.
A requeue that Slurm does by itself (`scontrol requeue`, preemption with PreemptMode=REQUEUE) sends SIGTERM:
the trainers save on it, and the restarted job resumes because every start after the first uses `--resume auto`.

Elastic (`submit --elastic MIN_NODES[:MAX_RESTARTS]`, README "Surviving node failures"): one task per node, each
running a torchrun agent (`torchrun_command`, as slurm/multi_node.sbatch with MIN_NODES) that starts the node's
trainers and restarts them on the nodes left when one is lost. The job is submitted with --no-kill and its tasks with
srun --kill-on-bad-exit=0, so that a lost node's task does not end the others. At step 2 above `checkpoint()` sends
SIGUSR1 to every process of the job (`scancel --signal=USR1`), not to its own child only: each agent stops its
trainers (which save) and exits, instead of restarting them. The submitit task processes ignore SIGUSR1.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import submitit
from submitit.core.utils import FailedJobError, FailedSubmissionError

from colorize_dist.config import ConfigError, save_config
from colorize_dist.data.store import redact
from colorize_dist.errors import UserError
from colorize_dist.files import first_line
from colorize_dist.launch.resources import SlurmResources
from colorize_dist.training.config import Config, TrainConfig, check_launch
from colorize_dist.training.stop import EXIT_RESUMABLE
from colorize_dist.training.summary import SUMMARY

CONFIG_NAME = "config.yaml"  # the resolved config in the run dir; every start of the job trains with it
SUBMITIT_FOLDER = "slurm"  # RUN/slurm: sbatch scripts, pickles and per-task logs of the run's jobs
ACCELERATE_CONFIG_NAME = "accelerate.yaml"  # RUN/accelerate.yaml: the accelerate config every start of the job uses
# Below Linux's ephemeral range (32768-60999 by default, /proc/sys/net/ipv4/ip_local_port_range), from which the
# kernel picks the local ports of outgoing connections: a rendezvous port there can be taken by any socket.
RENDEZVOUS_PORTS = range(20000, 32768)
# torchrun forwards these to its trainers and exits instead of restarting them (SIGUSR1: checkpoint, then requeue).
TORCHRUN_SIGNALS = "SIGTERM,SIGINT,SIGHUP,SIGQUIT,SIGUSR1"
# torch 2.14: a node that comes back never meets the others while torchrun shares its rendezvous store with the
# trainers (the new node waits for keys the others do not write again); this opts out of the sharing.
ELASTIC_ENV = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


class TrainerFailedError(RuntimeError):
    """The trainer exited with an error; its message is in the task's log."""


class SlurmError(UserError, RuntimeError):
    """Slurm refused the job, or is not installed here; the message is one line."""

    exit_status = 1


@dataclass(frozen=True)
class TrainingOutcome:
    run_dir: Path
    finished: bool  # False: stopped early with a checkpoint (e.g. cancelled); resubmitting continues it


@dataclass(frozen=True)
class ElasticLaunch:
    """torch elastic's bounds: the job goes on while at least `min_nodes` nodes are left, over at most
    `max_restarts` losses."""

    min_nodes: int
    max_restarts: int = 3

    @classmethod
    def parse(cls, text: str) -> ElasticLaunch:
        """`MIN_NODES[:MAX_RESTARTS]`, e.g. "1" or "1:3"; ConfigError naming --elastic."""
        parts = text.split(":")
        if len(parts) > 2 or not all(part.strip().isdigit() for part in parts):
            raise ConfigError(f"--elastic {text}: expected MIN_NODES or MIN_NODES:MAX_RESTARTS, e.g. 1:3")
        launch = cls(*(int(part) for part in parts))
        if launch.min_nodes < 1:
            raise ConfigError(f"--elastic {text}: MIN_NODES must be at least 1")
        return launch

    def check(self, train: TrainConfig, resources: SlurmResources) -> None:
        """ConfigError, in one line, for bounds the job cannot keep: MIN_NODES above --nodes, or a number of nodes
        from MIN_NODES to --nodes whose processes do not divide the global batch."""
        if self.min_nodes > resources.nodes:
            raise ConfigError(f"--elastic {self.min_nodes}: MIN_NODES must be at most --nodes {resources.nodes}")
        for nodes in range(self.min_nodes, resources.nodes + 1):
            try:
                check_launch(train, nodes * resources.processes_per_node)
            except ConfigError as exc:
                raise ConfigError(f"--elastic {self.min_nodes}: on {nodes} node(s) left, {exc}") from None


def torchrun_command(elastic: ElasticLaunch, max_nodes: int, processes_per_node: int, endpoint: str,
                     rendezvous_id: str, shutdown_timeout_s: float, trainer_args: Sequence[str]) -> list[str]:
    """One node's torchrun agent for an elastic job: c10d rendezvous at `endpoint` (the first node), MIN:MAX nodes,
    bounded restarts; on TORCHRUN_SIGNALS it stops its trainers (waiting `shutdown_timeout_s` for their checkpoint)
    and exits."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", f"{elastic.min_nodes}:{max_nodes}",
            "--nproc-per-node", str(processes_per_node), "--max-restarts", str(elastic.max_restarts),
            "--rdzv-backend", "c10d", "--rdzv-endpoint", endpoint, "--rdzv-id", rendezvous_id,
            "--signals-to-handle", TORCHRUN_SIGNALS, "--shutdown-timeout", f"{shutdown_timeout_s:.0f}",
            "-m", "colorize_dist.train", *trainer_args]


@dataclass
class TrainingJob:
    """The callable submitit runs in every task of the job; `checkpoint()` makes it requeue itself."""

    run_dir: Path  # absolute; holds CONFIG_NAME, checkpoints/ and SUBMITIT_FOLDER
    resume: str = "auto"  # the trainer's --resume for the first start; every restart uses auto
    use_cpu: bool = False  # no GPUs: Accelerate's MULTI_CPU mode with gloo (DeepSpeed: its CPU accelerator, gloo)
    # The processes run as `accelerate launch --config_file` this starts them; submit() copies the file to
    # RUN/accelerate.yaml and submits the job with that copy, so that every start uses the same.
    accelerate_config: Path | None = None
    save_timeout_s: float = 100.0  # how long checkpoint() waits for the trainer to save before requeueing anyway
    elastic: ElasticLaunch | None = None  # None: one task per process (static rendezvous); else one agent per node
    processes_per_node: int = 1  # the trainers each elastic agent starts
    _trainer: subprocess.Popen | None = field(default=None, init=False, repr=False, compare=False)

    def trainer_arguments(self, resume: str) -> list[str]:
        return ["--config", str(self.run_dir / CONFIG_NAME), "--run-dir", str(self.run_dir), "--resume", resume]

    def trainer_command(self, resume: str) -> list[str]:
        return [sys.executable, "-u", "-m", "colorize_dist.train", *self.trainer_arguments(resume)]

    def launch(self, job: submitit.JobEnvironment, restarts: int, environ: dict[str, str]
               ) -> tuple[list[str], dict[str, str]]:
        """This task's command and environment: the trainer (static), or the node's torchrun agent (elastic)."""
        rendezvous = distributed_env(job, restarts)
        env = environ | (ELASTIC_ENV if self.elastic is not None else rendezvous)
        if self.accelerate_config is not None:
            env |= accelerate_env(self.accelerate_config, job, rendezvous["MASTER_ADDR"],
                                  int(rendezvous["MASTER_PORT"]))
        if self.use_cpu and env.get("ACCELERATE_USE_DEEPSPEED") != "true":
            env["ACCELERATE_USE_CPU"] = "true"
        if "SLURM_CPUS_PER_TASK" in environ:  # elastic: the node's task holds the CPUs of all its trainers
            threads = int(environ["SLURM_CPUS_PER_TASK"]) // (self.processes_per_node if self.elastic else 1)
            env.setdefault("OMP_NUM_THREADS", str(max(1, threads)))
        resume = self.resume if restarts == 0 else "auto"
        if self.elastic is None:
            return self.trainer_command(resume), env
        endpoint = f"{rendezvous['MASTER_ADDR']}:{rendezvous['MASTER_PORT']}"
        return torchrun_command(self.elastic, job.num_nodes, self.processes_per_node, endpoint, str(job.job_id),
                                self.save_timeout_s, self.trainer_arguments(resume)), env

    def __call__(self) -> TrainingOutcome:
        job = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        started = time.time()
        command, env = self.launch(job, restarts, dict(os.environ))
        rendezvous = distributed_env(job, restarts)
        accelerate = (f", {describe_accelerate_env(env)} from {self.accelerate_config}"
                      if self.accelerate_config is not None else "")
        print(f"launch: {job}, start {restarts}, rendezvous {rendezvous['MASTER_ADDR']}:{rendezvous['MASTER_PORT']}"
              f"{accelerate}: {shlex.join(command)}", flush=True)
        if self.elastic is not None:  # checkpoint() signals the whole job; only the agents and trainers act on it
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
        self._trainer = subprocess.Popen(command, env=env, preexec_fn=_ignore_warning_signal)
        try:
            # Polling rather than wait(): checkpoint() waits for the trainer from a signal handler on this thread,
            # and a wait() interrupted here would hold the Popen's lock.
            while (status := self._trainer.poll()) is None:
                time.sleep(1.0)
        finally:
            if self._trainer.poll() is None:  # submitit exits this process after requeueing
                self._trainer.kill()
        if status == 0:
            return TrainingOutcome(self.run_dir, finished=True)
        if status == EXIT_RESUMABLE:
            return TrainingOutcome(self.run_dir, finished=False)
        if self.elastic is not None and (outcome := self._summary_since(started)) is not None:
            return outcome  # torchrun reports a checkpointed stop as 1, and other nodes may have finished the run
        raise TrainerFailedError(f"the trainer exited with status {status} on rank {job.global_rank}; its error is "
                                 "above in this task's log")

    def checkpoint(self) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on global rank 0 when Slurm warns of the time limit or preemption.

        The trainer saves a checkpoint on SIGUSR1 (all ranks agree to stop); then the job requeues itself as a new
        submission that resumes from it. Should the save not finish in time, the requeued job resumes from the last
        periodic checkpoint instead.
        """
        trainer = self._trainer
        if trainer is not None and trainer.poll() is None:
            if self.elastic is not None:  # the agents' trainers save together: this node's exit means it is saved
                _signal_job(submitit.JobEnvironment().job_id, trainer)
            else:
                trainer.send_signal(signal.SIGUSR1)
            try:
                status = trainer.wait(timeout=self.save_timeout_s)
                print(f"launch: the trainer exited with status {status} on the warning; requeueing", flush=True)
            except subprocess.TimeoutExpired:
                print(f"launch: the trainer did not exit within {self.save_timeout_s:.0f} s of SIGUSR1; requeueing "
                      "anyway", file=sys.stderr, flush=True)
        return submitit.helpers.DelayedSubmission(replace(self, resume="auto"))

    def _summary_since(self, started: float) -> TrainingOutcome | None:
        """The run's outcome from RUN/summary.json when this start wrote it (on any node), else None."""
        summary = self.run_dir / SUMMARY
        try:
            if summary.stat().st_mtime < started:
                return None
            return TrainingOutcome(self.run_dir, finished=bool(json.loads(summary.read_text())["finished"]))
        except (OSError, ValueError, KeyError):
            return None


def _signal_job(job_id: str, agent: subprocess.Popen) -> None:
    """SIGUSR1 to every process of the job's steps: each node's agent stops its trainers, which save, and exits.
    Should scancel fail, this node's agent alone gets it (its trainers' stop request reaches every rank)."""
    result = subprocess.run(["scancel", "--signal=USR1", str(job_id)], capture_output=True, text=True)
    if result.returncode != 0:
        print(f"launch: scancel --signal=USR1 {job_id} failed ({first_line(result.stderr) or result.returncode}); "
              "signalling this node's agent only", file=sys.stderr, flush=True)
        if agent.poll() is None:
            agent.send_signal(signal.SIGUSR1)


def distributed_env(job: submitit.JobEnvironment, restarts: int) -> dict[str, str]:
    """torch.distributed's env:// variables for this task (Accelerate reads them), from Slurm through submitit.

    The rendezvous is new at every start: the master is the first node of the current allocation, and the port
    depends on the restart count, so a requeued job never meets the previous start's socket.
    """
    return {
        "MASTER_ADDR": job.hostnames[0],
        "MASTER_PORT": str(rendezvous_port(job.job_id, restarts)),
        "WORLD_SIZE": str(job.num_tasks),
        "RANK": str(job.global_rank),
        "LOCAL_RANK": str(job.local_rank),
        "LOCAL_WORLD_SIZE": str(job.num_tasks // job.num_nodes),
    }


def rendezvous_port(job_id: str, restarts: int) -> int:
    """A port every task computes alike without talking to the others (a hash of the job id and restart count)."""
    return RENDEZVOUS_PORTS[zlib.crc32(f"{job_id}/{restarts}".encode()) % len(RENDEZVOUS_PORTS)]


def accelerate_env(config_file: Path, job: submitit.JobEnvironment | None = None, master_addr: str = "127.0.0.1",
                   master_port: int = RENDEZVOUS_PORTS[0]) -> dict[str, str]:
    """The ACCELERATE_* variables `accelerate launch --config_file FILE` sets for the processes it starts, for this
    task's place in the job (None: a one-task job, to check the file). Accelerate's own launcher code computes
    them; only ACCELERATE_* are kept: devices, threads and the rendezvous are Slurm's (one task per GPU).
    ConfigError for a file Accelerate cannot use."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils import prepare_deepspeed_cmd_env, prepare_multi_gpu_env, prepare_simple_launcher_cmd_env

    tasks, nodes, node = (job.num_tasks, job.num_nodes, job.node) if job is not None else (1, 1, 0)
    try:
        args = launch_command_parser().parse_args([
            "--config_file", str(config_file), "--num_processes", str(tasks), "--num_machines", str(nodes),
            "--machine_rank", str(node), "--main_process_ip", master_addr, "--main_process_port", str(master_port),
            "colorize_dist/train.py"])
        args, defaults, precision_from_config = _validate_launch_command(args)  # what `accelerate launch` runs
        if args.use_deepspeed:  # as accelerate.commands.launch.launch_command
            fields = [*(defaults.deepspeed_config if defaults else {})] + ["mixed_precision"] * precision_from_config
            args.deepspeed_fields_from_accelerate_config = ",".join(fields)
            _, env = prepare_deepspeed_cmd_env(args)
        elif args.multi_gpu:
            env = prepare_multi_gpu_env(args)
        else:
            _, env = prepare_simple_launcher_cmd_env(args)
    except (OSError, ValueError, KeyError, TypeError, SystemExit) as exc:
        raise ConfigError(f"accelerate config {config_file}: {first_line(exc) or type(exc).__name__}") from None
    return {key: value for key, value in env.items() if key.startswith("ACCELERATE_")}


def describe_accelerate_env(env: dict[str, str]) -> str:
    """E.g. "DeepSpeed ZeRO-2, bf16" or "DDP, fp32", for the launch line."""
    precision = {"no": "fp32"}.get(env.get("ACCELERATE_MIXED_PRECISION", "no"), env.get("ACCELERATE_MIXED_PRECISION"))
    if env.get("ACCELERATE_USE_DEEPSPEED") == "true":
        return f"DeepSpeed ZeRO-{env.get('ACCELERATE_DEEPSPEED_ZERO_STAGE', '?')}, {precision}"
    return f"DDP, {precision}"


def _ignore_warning_signal() -> None:
    """Runs in the trainer's (or agent's) process before exec: Slurm signals every process of a step, and only
    submitit's handler in the parent should act on its warning signal (an ignored signal stays ignored across exec);
    SIGUSR1, ignored by an elastic job's task process, is the trainer's and the agent's to handle."""
    signal.signal(signal.Signals["SIG" + submitit.JobEnvironment.USR_SIG], signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_DFL)


def make_executor(folder: Path, resources: SlurmResources, array_parallelism: int = 256,
                  elastic_run_dir: Path | None = None) -> submitit.AutoExecutor:
    """A Slurm executor whose sbatch scripts, pickles and logs go to `folder` (`array_parallelism`: elements of a
    job array running at once). `elastic_run_dir`: the run dir of an elastic job, one task per node holding its
    processes' CPUs, a lost node's task ending neither the job (--no-kill) nor the other tasks (srun
    --kill-on-bad-exit=0), and the job COMPLETED when the nodes left finish the run (`elastic_exit_trap`), though
    srun reports the lost node's task. SlurmError without Slurm."""
    elastic = elastic_run_dir is not None
    try:
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=resources.max_timeouts)
    except RuntimeError as exc:  # submitit's 'Could not detect "srun"'
        raise SlurmError(f"no Slurm here: {first_line(exc)}") from None
    executor.update_parameters(
        name=resources.job_name or "colorize",
        timeout_min=resources.time_min,
        nodes=resources.nodes,
        tasks_per_node=1 if elastic else resources.processes_per_node,
        gpus_per_node=resources.gpus_per_node or None,
        cpus_per_task=(resources.cpus_per_task * resources.processes_per_node
                       if elastic and resources.cpus_per_task else resources.cpus_per_task),
        slurm_partition=resources.partition,
        slurm_mem=resources.mem,
        slurm_account=resources.account,
        slurm_qos=resources.qos,
        slurm_constraint=resources.constraint,
        slurm_exclusive=resources.exclusive or None,
        slurm_signal_delay_s=resources.signal_delay,
        slurm_array_parallelism=array_parallelism,
    )
    if elastic:
        executor.update_parameters(slurm_additional_parameters={"no_kill": True},
                                   slurm_srun_args=["--kill-on-bad-exit=0"],
                                   slurm_setup=elastic_exit_trap(elastic_run_dir))
    return executor


def elastic_exit_trap(run_dir: Path) -> list[str]:
    """sbatch script lines (before srun) that make the script exit 0 when srun failed but RUN/summary.json, written
    after the script started, says the run finished: as slurm/multi_node.sbatch does for an elastic job."""
    return [f"summary={shlex.quote(str(run_dir / SUMMARY))} started=$(date +%s)",
            "trap 'status=$?; if [ $status -ne 0 ] && [ -n \"$(find \"$summary\" -newermt @$started 2>/dev/null)\" ] "
            "&& grep -Eq \"finished.: true\" \"$summary\"; then exit 0; fi' EXIT"]


def training_job(cfg: Config, run_dir: Path, resources: SlurmResources, resume: str = "auto",
                 accelerate_config: Path | None = None, elastic: ElasticLaunch | None = None) -> TrainingJob:
    """The job that trains `cfg` in `run_dir`, its processes as `accelerate launch --config_file accelerate_config`
    starts them (`elastic`: under one torchrun agent per node); ConfigError when the global batch does not split
    over its processes (elastic: on any number of nodes it may be left with), the accelerate config is unusable,
    or the shard URL holds credentials. The accelerate config is copied to RUN/accelerate.yaml on submission."""
    check_launch(cfg.train, resources.num_processes)
    if elastic is not None:
        elastic.check(cfg.train, resources)
    if cfg.data.shards is not None and redact(cfg.data.shards) != cfg.data.shards:
        raise ConfigError("data.shards holds credentials in its URL; the trainer records RUN/config.yaml without "
                          "them, so a requeued job could not read the shards: give them in ~/.netrc (http, https) "
                          "or the store's own settings (e.g. AWS_* variables for s3://)")
    if accelerate_config is not None:
        accelerate_env(accelerate_config)  # a broken file fails here, in one line, not in the job
    return TrainingJob(run_dir.absolute(), resume, use_cpu=resources.gpus_per_node == 0,
                       save_timeout_s=max(10, resources.signal_delay - 20),
                       accelerate_config=accelerate_config.absolute() if accelerate_config is not None else None,
                       elastic=elastic, processes_per_node=resources.processes_per_node)


def submit(runs: Sequence[tuple[Config, TrainingJob]], resources: SlurmResources, folder: Path,
           array_parallelism: int = 256) -> list[submitit.Job]:
    """Write each run's RUN/config.yaml and submit the runs with the same resources: one run as one Slurm job, several
    as one job array (each element checkpoints and requeues on its own). submitit's files and logs go to `folder`
    (RUN/slurm for one run). SlurmError, in one line, when Slurm refuses the job or is not installed."""
    elastic_run_dir = runs[0][1].run_dir if len(runs) == 1 and runs[0][1].elastic is not None else None
    # first: without Slurm, nothing is written
    executor = make_executor(folder, resources, array_parallelism, elastic_run_dir)
    jobs = [_write_config(cfg, job) for cfg, job in runs]
    try:
        with contextlib.redirect_stderr(io.StringIO()):  # submitit prints sbatch's error itself before raising
            return [executor.submit(jobs[0])] if len(jobs) == 1 else executor.submit_array(jobs)
    except (FailedJobError, FailedSubmissionError) as exc:
        message = "; ".join(line.strip() for line in str(exc).splitlines() if line.strip())
        raise SlurmError(f"Slurm refused the job: {message}") from None


def _write_config(cfg: Config, job: TrainingJob) -> TrainingJob:
    """RUN/config.yaml (and RUN/accelerate.yaml); the job as submitted, reading the copies."""
    job.run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, job.run_dir / CONFIG_NAME)
    if job.accelerate_config is None:
        return job
    copy = job.run_dir / ACCELERATE_CONFIG_NAME
    if job.accelerate_config != copy:
        shutil.copyfile(job.accelerate_config, copy)
    return replace(job, accelerate_config=copy)


def sbatch_script(job: TrainingJob, resources: SlurmResources) -> str:
    """The sbatch script `submit` would hand to Slurm for `job`, from submitit's own template.

    submitit has no public dry run; this is the method its executor calls when it submits.
    """
    executor = make_executor(job.run_dir / SUBMITIT_FOLDER, resources,
                             elastic_run_dir=job.run_dir if job.elastic is not None else None)
    slurm_executor = executor._executor
    return slurm_executor._make_submission_file_text(slurm_executor._submitit_command_str, uid="dry-run")
