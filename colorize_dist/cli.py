"""The `colorize-dist` command line (also `python -m colorize_dist`).

Each subcommand is a module of `colorize_dist.commands` defining `DESCRIPTION`, `add_arguments(parser)` and
`main(args) -> int | None`, which turns the arguments into the library's typed calls. Only the module of the command
being run is imported, and it loads the library (torch, DeepSpeed, submitit…) only in `main`, so `colorize-dist
--help`, a command's `--help` and its argument errors answer at once; the help lines live in the table below. A
command's `--help` shows its `DESCRIPTION`, written for users; the module docstring is for developers. Errors a user
can fix (`colorize_dist.errors.UserError`) leave through `run`: one line on stderr and the error's exit status.
"""

import argparse
import importlib
import sys
from collections.abc import Callable

from colorize_dist.errors import UserError

# words → (module of colorize_dist.commands, help line)
COMMANDS: dict[tuple[str, ...], tuple[str, str]] = {
    ("bench", "color"): ("bench_color", "RGB→Lab throughput: our kernels vs skimage, kornia, OpenCV"),
    ("bench", "data"): ("bench_data", "images/s of the DALI pipeline vs the reference loader"),
    ("bench", "train"): ("bench_train", "training throughput: fp32 vs bf16 vs channels_last vs compile"),
    ("bench", "checkpoint"): ("bench_checkpoint", "time a checkpoint holds the step: hashing on it vs after"),
    ("bench", "telemetry"): ("bench_telemetry", "what the per-interval metrics cost a training step"),
    ("bench", "gpu"): ("bench_gpu", "a GPU node's benchmark: kernel, loaders, training, memory, MFU"),
    ("shards", "make"): ("shards_make", "make WebDataset shards from a folder, .zip or .tar of images"),
    ("shards", "synth"): ("shards_synth", "write the built-in synthetic dataset as a shard set"),
    ("shards", "verify"): ("shards_verify", "check every shard, image, count and index of a shard set"),
    ("shards", "index"): ("shards_index", "index shards written by other tools so the loaders read them"),
    ("model-info",): ("model_info", "parameters, FLOPs and activation memory of G and D"),
    ("submit",): ("submit", "submit training to Slurm (checkpoint and requeue at time limits)"),
    ("study", "run"): ("study_run", "run a scaling study's points, here or as Slurm job arrays"),
    ("study", "report"): ("study_report", "a study's results.csv, report.md and plots"),
    ("train",): ("train", "train the colorization GAN (one process; see accelerate launch)"),
    ("runs",): ("runs", "throughput, MFU, memory and validation of runs over their steps"),
    ("eval",): ("evaluate", "evaluate an exported generator on a shard set"),
    ("colorize",): ("colorize", "colorize images of any size with an exported generator"),
    ("export",): ("export", "write a run's EMA generator as ONNX (checked against PyTorch)"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    """Every command with its help line; the arguments of the one `argv` selects, if any."""
    parser = argparse.ArgumentParser(prog="colorize-dist", description=__doc__.splitlines()[0])
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command")}
    for words, (module_name, help_line) in COMMANDS.items():
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                group = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group.add_subparsers(dest="_".join(prefix) + "_command", required=True)
        sub = groups[words[:-1]].add_parser(words[-1], help=help_line)
        if tuple(argv[:len(words)]) == words:
            module = importlib.import_module(f"colorize_dist.commands.{module_name}")
            sub.description = module.DESCRIPTION
            sub.formatter_class = argparse.RawDescriptionHelpFormatter
            module.add_arguments(sub)
            sub.set_defaults(run=module.main, command_name=" ".join(words))
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if extra and hasattr(args, "overrides") and all("=" in item and not item.startswith("-") for item in extra):
        args.overrides = [*args.overrides, *extra]  # key=value overrides may also come between or after options
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return run(args.command_name, args.run, args)


def run(command: str, main: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """`main(args)`'s exit status; a UserError becomes `COMMAND: message` (one line) on stderr and its status."""
    try:
        return main(args) or 0
    except UserError as exc:
        message = " ".join(str(exc).strip().split("\n")[0].split())
        if message:  # an empty message: already reported (e.g. by another process of the same node)
            print(f"{command}: {message}", file=sys.stderr, flush=True)
        return exc.exit_status


if __name__ == "__main__":
    sys.exit(main())
