"""`colorize-dist colorize`: colorize images of any size with an exported generator."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.eval.names import DEFAULT_MAX_PIXELS
from colorize_dist.files import first_line

DESCRIPTION = """\
Colorize images of any size with an exported generator (PyTorch, or ONNX with onnxruntime): writes
DIR/<name>.png for every input, at the input's size with its own lightness (an alpha channel is kept). Inputs are
files, folders or glob patterns; colour images are reduced to their lightness first.

  colorize-dist colorize --checkpoint runs/00003 photos/ 'scans/*.jpg' old.png --out colorized/
  colorize-dist colorize --onnx runs/00003/export/generator_best.onnx photos/ --out colorized/
  accelerate launch --num_processes 4 -m colorize_dist colorize --checkpoint FILE photos/ --out DIR  # 4 GPUs

Exit status: 0 all written; 1 some input unreadable (reported and skipped); 2 an --out that cannot be written.
"""  # `colorize-dist colorize --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="image files, folders (recursive) or globs")
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument("--checkpoint",
                       help="exported generator (.safetensors) or a run directory (uses export/generator_best)")
    model.add_argument("--onnx", metavar="MODEL",
                       help="an ONNX generator from `colorize-dist export --onnx`, run with onnxruntime")
    parser.add_argument("--out", type=Path, required=True, help="output folder (PNG files)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per generator batch (default 8)")
    parser.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                        help="do the full-resolution work in bands of at most N pixels, bounding memory; the "
                             f"output does not depend on N (default {DEFAULT_MAX_PIXELS:,})")
    parser.add_argument("--side-by-side", action="store_true",
                        help="also write <name>_side_by_side.png: the input next to its colourisation")
    parser.add_argument("--cpu", action="store_true", help="run on the CPU even when a GPU is available")


def main(args: argparse.Namespace) -> int:
    import numpy as np
    import torch
    from accelerate import PartialState
    from tqdm import tqdm

    from colorize_dist.eval.colorize import collect_jobs, colorize_images, readable_batches, write_picture
    from colorize_dist.files import writable_directory
    from colorize_dist.models.export import load_generator, load_onnx_generator, resolve_checkpoint

    for option, value in (("--batch-size", args.batch_size), ("--max-pixels", args.max_pixels)):
        if value < 1:
            raise UserError(f"{option} must be at least 1, got {value}")
    # One process per GPU under `accelerate launch` or torchrun; CPU when asked or without a GPU (then gloo).
    state = PartialState(cpu=args.cpu or not torch.cuda.is_available())
    try:
        writable_directory(args.out, "--out")
        if args.onnx is not None:
            generator, _, resolution = load_onnx_generator(args.onnx, device=state.device)
        else:
            generator, _, resolution = load_generator(resolve_checkpoint(args.checkpoint), device=state.device)
    except (OSError, ValueError, ModuleNotFoundError) as exc:  # the generator file, the onnx packages
        raise UserError(first_line(exc)) from exc
    jobs, problems = collect_jobs(args.inputs, args.out)
    if state.is_main_process:
        for problem in problems:
            print(f"colorize: {problem}", file=sys.stderr)
    written = 0
    with state.split_between_processes(jobs) as my_jobs:
        progress = tqdm(total=len(my_jobs), desc="colorize", unit="img", disable=not state.is_main_process)
        for batch, unreadable in readable_batches(my_jobs, args.batch_size):
            problems += unreadable
            for message in unreadable:
                print(f"colorize: {message}", file=sys.stderr)
            colourised = colorize_images(generator, resolution, [picture.rgb for _, picture in batch],
                                         state.device, args.max_pixels) if batch else []
            try:
                for (job, picture), rgb in zip(batch, colourised, strict=True):
                    write_picture(job.output, rgb, picture.alpha)
                    if args.side_by_side:
                        write_picture(job.output.with_name(f"{job.output.stem}_side_by_side.png"),
                                      np.hstack([picture.rgb, rgb]), None if picture.alpha is None
                                      else np.hstack([picture.alpha, picture.alpha]))
                    written += 1
            except OSError as exc:
                raise UserError(f"cannot write {job.output} ({exc.strerror or first_line(exc)}); free space or "
                                f"choose another --out; {written} images written before it are complete") from exc
            progress.update(len(batch) + len(unreadable))
        progress.close()
    print(f"colorize: rank {state.process_index}: wrote {written} images to {args.out}"
          + (f", skipped {len(problems)}" if problems else ""))
    return 1 if problems else 0
