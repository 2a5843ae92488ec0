"""Train the colorization GAN (L → ab): attention U-Net generator, PatchGAN discriminator, DDP or DeepSpeed.

    accelerate launch colorize_dist/train.py         # embedded default: the tiny preset on synthetic data, CPU
    accelerate launch colorize_dist/train.py --config seed000 data.shards=/data/celeba-hq
    accelerate launch --config_file configs/accelerate/multi_gpu.yaml colorize_dist/train.py \\
        --config res256 data.shards=/data/ffhq
    accelerate launch --config_file configs/accelerate/deepspeed_zero2.yaml colorize_dist/train.py \\
        --config res1024 data.shards=/data/ffhq
    colorize-dist train --config ...                 # the same command line, one process

--config takes a preset's name (tiny, seed000, seed000_depth4, seed000_ndims32, seed000_unet, seed001, res256,
res512, res1024) or a YAML file, which may start from a preset with `base: NAME`. The run directory (--run-dir,
else train.run_dir, else runs/<config name>) holds config.yaml (the resolved config), checkpoints/step-XXXXXXX/
(the last train.keep_checkpoints) and checkpoints/best/, samples/*.png (gray | prediction | truth), logs/
(TensorBoard) and export/generator_{final,best}.safetensors (EMA weights). --resume auto (the default)
continues from the newest valid checkpoint of the run directory, if any.

Exit status: 0 finished; 75 stopped early by SIGTERM/SIGUSR1 or `training.stop.request_stop()` after a checkpoint
(resumable with --resume auto; `accelerate launch` and torchrun report it as 1, and RUN/summary.json's "finished":
false is how a wrapper tells); 1 stopped after train.max_nonfinite_steps steps in a row skipped for a NaN/inf loss
or gradient, weights gone NaN/inf (never checkpointed), or losses that exploded or a NaN validation
(`training.divergence`: that step is not checkpointed); 2 bad configuration, missing or broken inputs, a run
directory in use by another run, or a full disk (the last good checkpoint stays); 3 other ranks stopped answering
(a node died, froze or lost its network; train.collective_timeout_s bounds the wait): one line per surviving node
names them, and rerunning every node resumes from the last checkpoint; under torchrun with --max-restarts, the
launcher restarts the workers on the nodes left instead, and they resume by themselves (training/elastic.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from colorize_dist.errors import UserError
from colorize_dist.training.config import DEFAULT_CONFIG, default_run_dir, load_training_config
from colorize_dist.training.stop import EXIT_RESUMABLE

EXIT_PEER_LOST = 3


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
    parser = argparse.ArgumentParser(prog="train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser.parse_intermixed_args(argv)  # key=value overrides before, between or after the options
