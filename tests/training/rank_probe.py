"""Run under `accelerate launch`: train with colorize_dist.training.loop.train (resume auto), then every rank writes
its own generator, discriminator and EMA weights to RUN/weights-rank<R>.safetensors for the test to compare.

    python -m accelerate.commands.launch --config_file ... rank_probe.py RUN key=value ...
"""

import sys
from pathlib import Path

from accelerate import PartialState
from safetensors.torch import save_file

from colorize_dist.training.config import load_training_config
from colorize_dist.training.loop import train


def main() -> int:
    run_dir, overrides = Path(sys.argv[1]), sys.argv[2:]
    result = train(load_training_config(None, overrides), run_dir, "auto")
    weights = {f"{prefix}.{name}": tensor.detach().float().contiguous()
               for prefix, module in (("g", result.generator), ("d", result.discriminator), ("ema", result.ema))
               for name, tensor in module.state_dict().items()}
    save_file(weights, run_dir / f"weights-rank{PartialState().process_index}.safetensors")
    return 0 if result.finished else 75


if __name__ == "__main__":
    sys.exit(main())
