"""train.compile=true on two processes (DDP, gloo) with every adversarial loss, grad_accum 2 and an epoch's end;
and WGAN-GP under DeepSpeed ZeRO-2 (whose engine's backward hooks broke the penalty's double backward, compiled or
not, until the penalty went through the bare discriminator).

One launch trains each loss compiled and eagerly (tests/training/matrix_probe.py; the networks compile once, the
losses stay eager, so the later cells reuse the first one's kernels). The epoch's last step (1 sample and 31
padding copies in a global batch of 32, so the ranks' micro-batches hold 1, 0, 0 and 0 real samples) must run the
graphs compiled before, on every rank: a recompilation on some ranks only holds the others in the gradient
all-reduce for as long as it takes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from colorize_dist.models.losses import ADVERSARIAL_LOSSES
from tests.training.helpers import launch_script, tiny_overrides
from tests.training.test_update import MATRIX_PROBE, max_difference, result, weights

# 65 training images, a global batch of 32: steps 1-2 are full, step 3 ends epoch 0 with 1 real sample.
STEPS = 3
# Compiled against eager after 3 Adam steps of lr 1e-3: inductor sums in another order (measured up to 4.2e-7 in
# G, D and the EMA); a weight left behind by one skipped or doubled update would be ~1e-3 away.
TOLERANCE = 1e-5


def compile_cell(loss: str, compiled: bool, shards: Path, zero: int | None = None) -> str:
    overrides = tiny_overrides(shards, **{
        "train.batch_size": 32, "train.grad_accum": 2, "train.max_steps": STEPS, "train.pretrain_steps": 1,
        "loss.adversarial": loss, "train.compile": compiled, "train.trackers": "[]",
        "train.validate_every": 1000, "train.sample_every": 1000, "train.checkpoint_every": 1000})
    name = f"{'' if zero is None else f'zero{zero}-'}{loss}-{'compiled' if compiled else 'eager'}"
    overrides += [] if zero is None else [f"zero={zero}"]
    return f"{name}:" + ",".join(item for item in overrides if not item.startswith("data.shards="))


@pytest.fixture(scope="module")
def runs(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("compile")
    cells = [compile_cell(loss, compiled, shards) for loss in ADVERSARIAL_LOSSES for compiled in (True, False)]
    deepspeed = [compile_cell("wgan-gp", compiled, shards, zero=2) for compiled in (True, False)]
    for accelerate_config, launched_cells in (("cpu_2proc.yaml", cells), ("deepspeed_cpu_2proc.yaml", deepspeed)):
        launched = launch_script(accelerate_config, [str(MATRIX_PROBE), str(out), str(shards), *launched_cells],
                                 timeout=1200)
        assert launched.returncode == 0, launched.stderr[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("loss", [*ADVERSARIAL_LOSSES, "zero2-wgan-gp"])
def test_compiled_training_equals_eager_on_two_processes(runs: Path, loss: str) -> None:
    compiled, eager = f"{loss}-compiled", f"{loss}-eager"
    for name in (compiled, eager):
        assert {key: result(runs, name)[key] for key in ("step", "finished")} == {"step": STEPS, "finished": True}
    graphs = [result(runs, compiled, rank)["graphs"] for rank in (0, 1)]
    assert graphs[0] == graphs[1] and len(graphs[0]) == STEPS and graphs[0][-1] == graphs[0][-2] > 0, graphs
    assert max_difference(weights(runs, compiled, 0), weights(runs, compiled, 1))[0] == 0.0  # ranks agree
    difference, key = max_difference(weights(runs, compiled), weights(runs, eager))
    print(f"{loss}: compiled vs eager, largest difference {difference:.3g} ({key})")
    assert difference <= TOLERANCE, f"{loss}: {key} differs by {difference:.3g}"

