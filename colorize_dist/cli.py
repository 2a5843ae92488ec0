"""The `colorize-dist` command line (also `python -m colorize_dist`).

Each subcommand lives in the module that does the work; that module defines
`add_arguments(parser)` and `main(args) -> int | None`, and its docstring's first line is the help.
"""

import argparse
import importlib
import sys

COMMANDS: dict[tuple[str, ...], str] = {
    ("bench", "color"): "colorize_dist.bench.color",
    ("bench", "data"): "colorize_dist.bench.data",
    ("bench", "train"): "colorize_dist.bench.train",
    ("shards", "make"): "colorize_dist.data.make",
    ("shards", "synth"): "colorize_dist.data.synth",
    ("shards", "verify"): "colorize_dist.data.verify",
    ("shards", "index"): "colorize_dist.data.index",
    ("model-info",): "colorize_dist.models.info",
    ("submit",): "colorize_dist.launch.submit",
    ("train",): "colorize_dist.training.command",
    ("eval",): "colorize_dist.eval.evaluate",
    ("colorize",): "colorize_dist.eval.colorize",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="colorize-dist", description=__doc__.splitlines()[0])
    groups: dict[tuple[str, ...], argparse._SubParsersAction] = {(): parser.add_subparsers(dest="command")}
    for words, module_name in COMMANDS.items():
        for depth in range(1, len(words)):
            prefix = words[:depth]
            if prefix not in groups:
                group = groups[prefix[:-1]].add_parser(prefix[-1], help=f"{prefix[-1]} commands")
                groups[prefix] = group.add_subparsers(dest="_".join(prefix) + "_command", required=True)
        module = importlib.import_module(module_name)
        doc = (module.__doc__ or "").strip().splitlines()
        sub = groups[words[:-1]].add_parser(
            words[-1], help=doc[0] if doc else None, description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(sub)
        sub.set_defaults(run=module.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not hasattr(args, "run"):
        parser.print_help()
        return 2
    return args.run(args) or 0


if __name__ == "__main__":
    sys.exit(main())
