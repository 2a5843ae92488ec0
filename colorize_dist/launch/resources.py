"""What to ask Slurm for: one `SlurmResources` for `colorize-dist submit` and for each point of a study (its
`launch:` section). Each field is one sbatch option, one command-line flag (`gpus_per_node`: `--gpus-per-node`,
see `commands.resources`) and one study key (`launch.gpus_per_node`). Time limits are Slurm's own text, read here.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from colorize_dist.config import ConfigError

TIME_FORMATS = "MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS"
_TIME = re.compile(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", re.ASCII)
FLAG_PREFIX, STUDY_PREFIX = "--", "launch."  # how an error names a field: `--signal-delay`, `launch.signal_delay`


@dataclass
class SlurmResources:
    """One Slurm job's resources (None: the cluster's default). The job checkpoints and requeues itself at every
    time limit, so `time` is one allocation's, not the run's."""

    partition: str | None = None
    time: str = "24:00:00"  # in one of Slurm's formats (TIME_FORMATS)
    nodes: int = 1
    gpus_per_node: int = 0  # 0: CPU processes (gloo)
    tasks_per_node: int | None = None  # processes per node; None: one per GPU, or 1 without GPUs
    cpus_per_task: int | None = None
    mem: str | None = None  # per node, sbatch syntax (e.g. 64G)
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    exclusive: bool = False
    signal_delay: int = 120  # seconds: the warning comes this long (Slurm: up to 60 s more) before the time limit
    max_timeouts: int = 20  # requeues after hitting the time limit before giving up; preemptions do not count
    job_name: str | None = None  # None: colorize-<run dir name> (submit), study-<study name> (a study)

    @property
    def time_min(self) -> int:
        return time_limit_minutes(self.time)

    @property
    def processes_per_node(self) -> int:
        return self.tasks_per_node or max(1, self.gpus_per_node)

    @property
    def num_processes(self) -> int:  # one Slurm task each
        return self.nodes * self.processes_per_node

    def validate(self, prefix: str = FLAG_PREFIX) -> None:
        """ConfigError naming the option at fault as the user wrote it: `--time` (FLAG_PREFIX) or `launch.time`
        (STUDY_PREFIX)."""
        minutes = time_limit_minutes(self.time, option_name("time", prefix))
        for name in ("nodes", "tasks_per_node", "cpus_per_task", "signal_delay"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{option_name(name, prefix)} must be at least 1, got {value}")
        for name in ("gpus_per_node", "max_timeouts"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{option_name(name, prefix)} must be 0 or more, got {getattr(self, name)}")
        if self.signal_delay * 2 > minutes * 60:
            raise ConfigError(f"{option_name('signal_delay', prefix)} {self.signal_delay} s must be at most half the "
                              f"time limit ({option_name('time', prefix)} {self.time}): Slurm may send the warning "
                              "before the job can act on it")


FIELDS = [item.name for item in dataclasses.fields(SlurmResources)]


def option_name(field: str, prefix: str = FLAG_PREFIX) -> str:
    return prefix + (field.replace("_", "-") if prefix == FLAG_PREFIX else field)


def time_limit_minutes(text: str, option: str = "--time") -> int:
    """A time limit in one of Slurm's formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) as whole
    minutes, rounded up (submitit asks Slurm in minutes); at least one minute. ConfigError naming `option`."""
    match = _TIME.fullmatch(text.strip())
    if match is not None:
        days, first, second, third = (int(part) if part is not None else None for part in match.groups())
        if days is not None:  # D-HH, D-HH:MM or D-HH:MM:SS
            hours, minutes, seconds = first, second or 0, third or 0
        elif third is None:  # MM or MM:SS
            hours, minutes, seconds = 0, first, second or 0
        else:  # HH:MM:SS
            hours, minutes, seconds = first, second, third
        # Only the first number is open-ended (90 minutes, 48 hours), except hours after days.
        in_range = all(part < 60 for part in (second, third) if part is not None) and (days is None or first < 24)
        total_s = (((days or 0) * 24 + hours) * 60 + minutes) * 60 + seconds
        if in_range and total_s >= 60:
            return -(-total_s // 60)
    raise ConfigError(f"{option} {text!r} is not a time limit of at least a minute in one of Slurm's formats: "
                      f"{TIME_FORMATS} (e.g. 24:00:00 or 2-00:00:00)")
