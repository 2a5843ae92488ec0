"""`colorize-dist model-info`: parameters, FLOPs and activation memory of G and D at some resolutions."""

from __future__ import annotations

import argparse

from colorize_dist.config import ConfigError, load_config, read_yaml, resolve_config

DESCRIPTION = """\
Print the parameters, forward FLOPs per image and activation memory per sample of the generator and
discriminator of a config, at its resolution or the ones given. Writes nothing.

  colorize-dist model-info --config res512                      # at the config's data.resolution
  colorize-dist model-info --config seed000 generator.depth=4 --resolution 64 128 256
"""  # `colorize-dist model-info --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="preset name or YAML file with a `model:` section (default: the seeds' "
                                         "baseline)")
    parser.add_argument("--resolution", type=int, nargs="+", metavar="R",
                        help="square input sizes (default: the config's data.resolution; 64 128 256 without one)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="config overrides, e.g. generator.depth=4 (before --resolution)")


def config_resolution(config: str) -> list[int]:
    """The config's data.resolution (its `base:` chain included), else DEFAULT_RESOLUTIONS."""
    from colorize_dist.models.info import DEFAULT_RESOLUTIONS

    resolution = (read_yaml(resolve_config(config)).get("data") or {}).get("resolution")
    if resolution is None:
        return DEFAULT_RESOLUTIONS
    if not isinstance(resolution, int) or isinstance(resolution, bool):
        raise ConfigError(f"{config}: data.resolution must be an integer, got {resolution!r}")
    return [resolution]


def main(args: argparse.Namespace) -> int | None:
    from colorize_dist.models.config import ModelConfig
    from colorize_dist.models.info import DEFAULT_RESOLUTIONS, cost_table

    cfg = load_config(ModelConfig, args.config, args.overrides, section="model")
    resolutions = args.resolution or (config_resolution(args.config) if args.config else DEFAULT_RESOLUTIONS)
    for resolution in resolutions:  # ConfigError: a resolution the models cannot take
        cfg.generator.check_resolution(resolution)
        cfg.discriminator.check_resolution(resolution)
    print(cost_table(cfg, resolutions))
    return None
