"""Train several configurations ("cells") one after another in one launch; every rank writes each cell's weights.

    python -m accelerate.commands.launch --config_file CFG matrix_probe.py OUT SHARDS CELL [CELL ...]
    python matrix_probe.py OUT SHARDS CELL [CELL ...]          # one plain process: the references

A CELL is `NAME:key=value,key=value,...`: training config overrides, plus the probe's own keys
  zero=N      DeepSpeed ZeRO stage N for this cell (the launch must be a DeepSpeed one)
  nan=d@S.M   the discriminator's loss is NaN in optimizer step S (counted from 0, skipped steps included),
              micro-batch M, on the last rank (g@S.M: the generator's); several joined with '+'
A cell with train.compile=true compiles afresh; its result holds torch._dynamo's count of compiled graphs after
each step ("graphs").
Each rank writes OUT/NAME/weights-rank<R>.safetensors (g., d., ema. tensors) and OUT/NAME/result-rank<R>.json;
rank 0 also OUT/NAME/initial.safetensors (g., d.: the weights before the first step).

Every rank reads its share of each global batch (the loaders' layout, see colorize_dist/data/sharding.py): optimizer
step t is made of the same `train.batch_size` samples whatever the number of processes and micro-batches, so the
weights of any launch can be compared with those of one process taking the whole batch at once. Starting a launch
costs far more than a few steps of the tiny model, so one launch runs many cells: Accelerate's state is made afresh
for each, on one process group.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from accelerate import PartialState
from accelerate.state import AcceleratorState, GradientState
from safetensors.torch import save_file
from torch._dynamo.utils import counters

from colorize_dist.training import build, loop
from colorize_dist.training.config import load_training_config


class NaNAt:
    """Wraps a loss: its total becomes NaN at the chosen (step, micro-batch) on the last rank."""

    def __init__(self, loss, accumulation: int, when: set[tuple[int, int]]):
        self.loss, self.accumulation, self.when, self.calls = loss, accumulation, when, 0
        self.last_rank = PartialState().process_index == PartialState().num_processes - 1

    def __call__(self, *args, **kwargs):
        terms = self.loss(*args, **kwargs)
        step, micro = divmod(self.calls, self.accumulation)
        self.calls += 1
        if self.last_rank and (step, micro) in self.when:
            terms = {**terms, "total": terms["total"] * float("nan")}
        return terms

    def to(self, *args, **kwargs):
        self.loss = self.loss.to(*args, **kwargs)
        return self

    def __getattr__(self, name):
        return getattr(self.loss, name)


def inject_nans(spec: str, accumulation: int) -> None:
    """spec: 'd@S.M+g@S.M' (see the module's docstring)."""
    when: dict[str, set[tuple[int, int]]] = {"d": set(), "g": set()}
    for item in filter(None, spec.split("+")):
        network, _, position = item.partition("@")
        step, micro = position.split(".")
        when[network].add((int(step), int(micro)))
    for network, name in (("d", "DiscriminatorLoss"), ("g", "GeneratorLoss")):
        loss_class = getattr(build, name)

        def build_loss(*args, loss_class=loss_class, positions=when[network], **kwargs):
            return NaNAt(loss_class(*args, **kwargs), accumulation, positions)

        setattr(build, name, build_loss)


def run_cell(out: Path, shards: str, cell: str) -> None:
    name, _, settings = cell.partition(":")
    options = dict(item.split("=", 1) for item in settings.split(",") if item)
    zero, nans = options.pop("zero", None), options.pop("nan", "")
    if zero is not None:
        os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = zero
    cfg = load_training_config(None, [f"data.shards={shards}", *(f"{k}={v}" for k, v in options.items())])
    saved = {attr: getattr(build, attr) for attr in ("DiscriminatorLoss", "GeneratorLoss", "prepare_network")}
    plain_gan_step = loop.gan_step
    initial: dict[str, torch.Tensor] = {}

    def prepare_network(accelerator, name, model, *args, **kwargs):  # the initial weights, before any step
        initial.update({f"{name[0]}.{key}": value.detach().float().clone()
                        for key, value in model.state_dict().items()})
        return saved["prepare_network"](accelerator, name, model, *args, **kwargs)

    torch._dynamo.reset()
    graphs: list[int] = []

    def gan_step(*args, **kwargs):
        outcome = plain_gan_step(*args, **kwargs)
        graphs.append(counters["stats"]["unique_graphs"])
        return outcome

    try:
        inject_nans(nans, cfg.train.grad_accum)
        build.prepare_network, loop.gan_step = prepare_network, gan_step
        result = loop.train(cfg, out / name / "run", "none")
    finally:
        for attr, value in saved.items():
            setattr(build, attr, value)
        loop.gan_step = plain_gan_step
    rank = PartialState().process_index
    if rank == 0:
        save_file(initial, out / name / "initial.safetensors")
    weights = {f"{prefix}.{key}": tensor.detach().float().contiguous()
               for prefix, module in (("g", result.generator), ("d", result.discriminator), ("ema", result.ema))
               for key, tensor in module.state_dict().items()}
    save_file(weights, out / name / f"weights-rank{rank}.safetensors")
    compiled = {"graphs": graphs} if cfg.train.compile else {}
    (out / name / f"result-rank{rank}.json").write_text(json.dumps({"step": result.step, "finished": result.finished,
                                                                   **compiled}))
    AcceleratorState._reset_state(reset_partial_state=False)  # the next cell builds its own Accelerator
    GradientState._reset_state()


def main() -> int:
    out, shards, cells = Path(sys.argv[1]), sys.argv[2], sys.argv[3:]
    torch.use_deterministic_algorithms(True)
    # `end_training()` ends the process group; a second rendezvous on the launcher's store would hang, so the
    # group lives until all cells are done.
    destroy = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    for cell in cells:
        run_cell(out, shards, cell)
    destroy(PartialState())
    return 0


if __name__ == "__main__":
    sys.exit(main())
