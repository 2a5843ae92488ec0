"""A study's plan from its name or file, its overrides and output dir, as `study run` and `study report` load it."""

from __future__ import annotations

from pathlib import Path

from colorize_dist.config import read_yaml
from colorize_dist.study.config import load_study, resolve_study
from colorize_dist.study.plan import Plan, make_plan
from colorize_dist.study.record import read_study_args


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
