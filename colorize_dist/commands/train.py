"""`colorize-dist train` and the trainer's own command line: the config, the run directory and resuming, turned into
one `train` call.

Library errors a user can fix become UserErrors here; a lost peer becomes exit status 3 with one line per surviving
node, and an early stop after a checkpoint becomes 75, so wrappers can tell resumable runs from failed ones.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.training.stop import EXIT_RESUMABLE

EXIT_PEER_LOST = 3
DEFAULT_CONFIG = "tiny"  # the embedded default: a preset that trains on synthetic data in minutes on a CPU


DESCRIPTION = """\
Train the colorization GAN (L → ab): attention U-Net generator, PatchGAN discriminator, DDP or DeepSpeed.

--config takes a preset's name (tiny, seed000, seed000_depth4, seed000_ndims32, seed000_unet, seed001, res256,
res512, res1024) or a YAML file (which may start from a preset with `base: NAME`); KEY=VALUE overrides follow. The
run directory (--run-dir, else train.run_dir, else runs/<config name>) receives config.yaml, checkpoints/,
samples/*.png, logs/ (TensorBoard), metrics.jsonl, summary.json and export/generator_{final,best}.safetensors.
--resume auto (the default) continues from the newest valid checkpoint there.

  accelerate launch colorize_dist/train.py --config seed000 data.shards=/data/celeba-hq
  accelerate launch --config_file configs/accelerate/multi_gpu.yaml colorize_dist/train.py \\
      --config res256 data.shards=/data/ffhq
  colorize-dist train --config tiny                # one process

Exit status: 0 finished; 75 stopped early by SIGTERM/SIGUSR1 after a checkpoint (resume with --resume auto;
launchers report it as 1, RUN/summary.json says "finished": false); 1 diverged (NaN/inf losses or weights, exploding
losses; that step is not checkpointed); 2 bad configuration or inputs, a run directory in use, or a full disk;
3 other ranks stopped answering (rerun every node to resume from the last checkpoint).
"""  # `colorize-dist train --help`, for users


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=DEFAULT_CONFIG,
                        help=f"preset name or YAML file (default: {DEFAULT_CONFIG}, the embedded default that "
                             "trains on synthetic data)")
    parser.add_argument("--run-dir", type=Path, help="run directory (default: train.run_dir, else runs/<config>)")
    parser.add_argument("--resume", default="auto",
                        help="auto: the newest valid checkpoint of the run dir, if any (default); none; or a path")
    parser.add_argument("--cpu", action="store_true",
                        help="train on the CPU even where there are GPUs (a job given GPUs otherwise refuses to)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="e.g. train.batch_size=32 optim.lr=1e-4")


def main(args: argparse.Namespace) -> int:
    """Parsed arguments → exit status. Errors a user can fix (UserError) leave through `cli.run`, one line each."""
    from colorize_dist.training.checkpoint import CHECKPOINTS, latest_valid
    from colorize_dist.training.config import default_run_dir, load_training_config
    from colorize_dist.training.elastic import after_loss
    from colorize_dist.training.loop import train
    from colorize_dist.training.peers import PeerLostError

    cfg = load_training_config(args.config, args.overrides)
    run_dir = args.run_dir or default_run_dir(cfg, args.config)
    try:
        result = train(cfg, run_dir, args.resume, cpu=args.cpu)
    except FileNotFoundError as exc:  # e.g. train.fid_weights or VGG weights that are not there
        raise UserError(str(exc)) from exc
    except PeerLostError as exc:  # one line per surviving node: from its lowest rank, the others stay quiet
        last = latest_valid(run_dir / CHECKPOINTS, verify_hashes=False) if exc.report else None
        raise UserError(f"{exc}; {after_loss(last)}" if exc.report else "", exit_status=EXIT_PEER_LOST) from exc
    leave_process_group()
    return 0 if result.finished else EXIT_RESUMABLE


def leave_process_group() -> None:
    """Every rank leaves together, once every collective of the run is done, and releases its process group (NCCL
    warns of a leak otherwise)."""
    from colorize_dist import collectives

    collectives.leave()


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The trainer's own command line (`accelerate launch colorize_dist/train.py ...`)."""
    parser = argparse.ArgumentParser(prog="train", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_intermixed_args(argv)  # key=value overrides before, between or after the options
