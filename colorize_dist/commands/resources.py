"""The Slurm options `colorize-dist submit` and `colorize-dist study run` share: one flag per field of
`SlurmResources` (`gpus_per_node`: `--gpus-per-node`), added to a parser by `add_resource_arguments` and read back by
`resources_from_arguments` (submit) or `given_resources` (a study, where they override its `launch:` section)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from collections.abc import Collection
from typing import Any

from colorize_dist.launch.resources import FIELDS, TIME_FORMATS, SlurmResources, option_name, time_limit_minutes

HELP = {
    "partition": ("NAME", "partition"),
    "time": ("TIME", f"time limit of each allocation: {TIME_FORMATS} (the job requeues itself as often as it needs)"),
    "nodes": ("N", "nodes"),
    "gpus_per_node": ("G", "GPUs per node, one process each; 0: CPU processes (gloo), --tasks-per-node of them"),
    "tasks_per_node": ("N", "processes per node (default: --gpus-per-node, or 1 without GPUs)"),
    "cpus_per_task": ("N", "CPUs per process (data workers + 1 or more)"),
    "mem": ("MEM", "memory per node, sbatch syntax (e.g. 64G)"),
    "account": ("NAME", "account to charge"),
    "qos": ("NAME", "quality of service"),
    "constraint": ("FEATURES", "node features (sbatch --constraint)"),
    "exclusive": (None, "whole nodes only"),
    "signal_delay": ("SECONDS", "warn the job this long before its time limit, to checkpoint and requeue"),
    "max_timeouts": ("N", "requeues after time limits before the job gives up; preemptions do not count"),
    "job_name": ("NAME", "job name (default: colorize-<run dir name>; a study's: study-<study name>)"),
}
_DEST = "slurm_"  # the flags' attributes on the parsed namespace: slurm_<field>


def add_resource_arguments(parser: argparse.ArgumentParser, title: str, required: Collection[str] = ()) -> None:
    """One flag per SlurmResources field in a group `title`; the fields in `required` must be given."""
    group = parser.add_argument_group(title)
    defaults, hints = SlurmResources(), typing.get_type_hints(SlurmResources)
    for name in FIELDS:
        metavar, text = HELP[name]
        default = getattr(defaults, name)
        if name not in required and default is not None and default is not False:
            text += f" (default {default})"
        flag, dest = option_name(name), _DEST + name
        if hints[name] is bool:
            group.add_argument(flag, dest=dest, action="store_true", default=None, help=text)
        else:
            kind = int if int in (hints[name], *typing.get_args(hints[name])) else str
            group.add_argument(flag, dest=dest, type=kind, metavar=metavar, required=name in required, help=text)


def given_resources(args: argparse.Namespace) -> dict[str, Any]:
    """The fields whose flags were given, by field name; ConfigError for a --time Slurm cannot read."""
    given = {name: getattr(args, _DEST + name) for name in FIELDS if getattr(args, _DEST + name) is not None}
    if "time" in given:
        time_limit_minutes(given["time"], option_name("time"))
    return given


def resources_from_arguments(args: argparse.Namespace, defaults: SlurmResources) -> SlurmResources:
    """`defaults` with the flags given; checked, ConfigError naming the flag at fault."""
    resources = dataclasses.replace(defaults, **given_resources(args))
    resources.validate()
    return resources
