"""`colorize-dist export`: a run's EMA generator as ONNX, checked against PyTorch."""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.files import first_line

DESCRIPTION = """\
Write a run's EMA generator as an ONNX model for onnxruntime, checked against PyTorch on three inputs
(an export that differs by more than 0.05 is refused and nothing is written). RUN is a run directory (its best
export, else final) or a .safetensors file; the model takes normalised L (N, 1, H, W) and returns "color", with
N, H and W dynamic. Writes the .onnx beside the .safetensors file, or to --out FILE.

  colorize-dist export --onnx runs/00003                 # → runs/00003/export/generator_best.onnx
  colorize-dist export --onnx runs/00003/export/generator_final.safetensors --out final.onnx
  colorize-dist colorize --onnx runs/00003/export/generator_best.onnx photos/ --out colorized/
"""  # `colorize-dist export --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--onnx", required=True, metavar="RUN",
                        help="the run directory (its export/generator_best, else generator_final) or a .safetensors "
                             "file, exported as ONNX")
    parser.add_argument("--out", type=Path, metavar="FILE",
                        help="the ONNX file (default: beside the .safetensors file, with the suffix .onnx)")
    parser.add_argument("--opset", type=int, help="ONNX opset (default: the one the export is tested with)")


def main(args: argparse.Namespace) -> int:
    from colorize_dist.models.export import ONNX_OPSET, export_onnx, resolve_checkpoint

    try:
        source = resolve_checkpoint(args.onnx)
        out = args.out or source.with_suffix(".onnx")
        if out.is_dir():
            raise UserError(f"--out {out} is a folder; name the .onnx file to write")
        result = export_onnx(source, out, ONNX_OPSET if args.opset is None else args.opset)
    except (OSError, ValueError, ModuleNotFoundError) as exc:  # a file, the onnx packages
        raise UserError(first_line(exc)) from exc
    sizes = ", ".join(f"{height}×{width}" for height, width in result.sizes)
    print(f"export: wrote {result.path} (ONNX opset {result.opset}; dynamic batch, height and width in multiples "
          f"of {result.size_multiple}); onnxruntime vs PyTorch on {sizes}: max |Δ| {result.max_delta:.2g} "
          f"{result.unit}")
    return 0
