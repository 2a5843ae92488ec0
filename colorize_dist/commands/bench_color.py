"""`colorize-dist bench color`: RGB→Lab throughput of our kernels and the libraries a user would call."""

from __future__ import annotations

import argparse

from colorize_dist.errors import UserError

DESCRIPTION = """\
Time RGB→Lab conversion: our kernels against skimage, kornia and OpenCV, on the same random images, with one
thread and with all threads. Prints a table of throughput per library and thread count, with each one's largest
error in Lab units. On a GPU it adds kornia on the GPU and our CUDA kernel's bandwidth against a device-to-device
copy of the same bytes. Writes nothing.

  colorize-dist bench color
"""  # `colorize-dist bench color --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 1024], help="square image sizes")
    parser.add_argument("--megapixels", type=float, default=2.0, help="pixels per call, in millions")
    parser.add_argument("--min-time", type=float, default=0.5, help="seconds to time each row for")


def main(args: argparse.Namespace) -> int:
    import torch
    from tabulate import tabulate

    from colorize_dist.bench.color import cpu_rows, gpu_rows, random_images

    if min(args.sizes) < 1 or not args.megapixels > 0 or not args.min_time > 0:
        raise UserError("--sizes, --megapixels and --min-time must be positive")
    rows, verdicts = [], []
    for size in args.sizes:
        rgb = random_images(size, args.megapixels)
        rows += cpu_rows(rgb, args.min_time, verdicts)
        if torch.cuda.is_available():
            rows += gpu_rows(rgb, args.min_time, verdicts)
    print(tabulate(rows, ["size", "threads", "implementation", "MP/s", "max |err| vs skimage", "× skimage"],
                   floatfmt=("", "", "", ",.1f", ".3g", ".3g"), numalign="right", missingval="-"))
    print("\n" + "\n".join(verdicts))
    return 0
