"""The command line's layer: one module per `colorize-dist` command, each with `DESCRIPTION` (its `--help`, for
users), `add_arguments(parser)` and `main(args) -> int | None`, which turns the parsed arguments into the library's
typed calls and prints their results.

A command module imports at its top only the standard library and light modules of this package; the library (torch,
DeepSpeed, submitit, DALI…) is imported inside `main`, so that `--help` and argument errors answer without loading
torch. Library modules take typed arguments and never see argparse."""
