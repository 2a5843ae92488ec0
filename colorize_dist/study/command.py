"""What `study run` and `study report` share on their command lines: the study, its overrides, the output dir."""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.config import read_yaml
from colorize_dist.study.config import load_study, resolve_study, study_names
from colorize_dist.study.plan import Plan, make_plan
from colorize_dist.study.record import read_study_args


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("study", metavar="STUDY",
                        help=f"study file, or the name of a shipped one ({', '.join(study_names())})")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training keys for every point (data.shards=/data/ffhq) or study keys "
                             "(budget.steps=100, launch.partition=gpu)")
    parser.add_argument("--out", type=Path, help="output dir: points/, results.csv, report.md, plots/ "
                                                 "(default: studies/<study name>)")


def output_dir(study: str, out: Path | None) -> Path:
    """--out, else studies/<name> (the study's `name:`, else its file name), found without resolving the study."""
    if out is not None:
        return out
    path = resolve_study(study)
    return Path("studies") / str(read_yaml(path).get("name") or path.stem)


def load_plan(ref: str, overrides: list[str], out: Path | None,
              reuse_overrides: bool = False) -> tuple[Plan, list[str]]:
    """The study's plan and the overrides it was made with. With `reuse_overrides` and no overrides given, those
    of the last `study run` into the same output dir (a report needs the run's data.shards=…, too)."""
    if reuse_overrides and not overrides:
        record = read_study_args(output_dir(ref, out))
        if record and Path(record["study"]) == resolve_study(ref).absolute():
            overrides = list(record["overrides"])
    study, path = load_study(ref, overrides)
    return make_plan(study, path, out or Path("studies") / str(study.name)), list(overrides)
