"""The GAN update on every backend: DDP and DeepSpeed ZeRO-0/1/2, gradient accumulation, fp32 and bf16, NaN skips.

The matrix runs every cell (2 processes, gloo) for a few steps with every rank reading its share of one global
order of batches (tests/training/matrix_probe.py), and compares the weights with those of one process taking the
same global batch of 8 in each step: in fp32 all at once; in bf16 split into the same micro-batches, since bf16
rounds each micro-batch's activations and gradients (the weights of DeepSpeed's bf16 engines are bf16 too, so
their reference is DeepSpeed in one process). fp16 is not in the matrix: Accelerate runs no fp16 on CPUs (the
trainer refuses it) and DeepSpeed's CPU accelerator has no fp16 on this kind of CPU; the fp16 loss scaling of
the update is tested in this process below.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType
from safetensors.torch import load_file
from torch import nn

from colorize_dist.config import ConfigError
from colorize_dist.data.loader import Batch
from colorize_dist.data.sharding import MicroSlots
from colorize_dist.models import GeneratorLoss, LossConfig
from colorize_dist.training import checkpoint, loop
from colorize_dist.training.build import check_backend
from colorize_dist.training.config import load_training_config
from colorize_dist.training.loop import take_micro_batch
from colorize_dist.training.milestones import improves
from colorize_dist.training.update import Update
from tests.training.helpers import (
    RANK_PROBE,
    REPO,
    assert_same_weights,
    launch_command,
    launch_script,
    probe_weights,
    subprocess_env,
    tiny_overrides,
)

MATRIX_PROBE = Path(__file__).with_name("matrix_probe.py")
STEPS = {"fp32": 4, "bf16": 1}  # bf16: see TOLERANCE
BACKENDS = {"ddp": None, "zero0": 0, "zero1": 1, "zero2": 2}
PRECISIONS = ("fp32", "bf16")
ACCUMULATION = (1, 2)
# How close to the one-process reference (Adam, lr 1e-3). fp32 after 4 steps: measured 2e-7 (another order of
# summing gradients). For scale, the update this replaced was 4e-4 away with grad_accum=2 (micro-batches before the
# last scored G against D before D's update), 2e-3 on DeepSpeed (clipped at 1.0 with optim.grad_clip=0), and Adam
# moves a weight by at most lr per step. bf16 after 1 step, on the same micro-batches: measured 1e-10 with DDP, one
# rounding of the bf16 weights (one ulp, 2^-7 relative) with DeepSpeed. After that, bf16's rounding of activations
# turns the fp32 summation noise into differences of bf16's precision that Adam amplifies: with this tiny model,
# even one process with grad_accum 1 and 4 is 40 % of the update apart after 4 steps (the *-bf16-long cells run 4
# steps and are checked for agreement between ranks).
TOLERANCE = {"fp32": {"rtol": 0.0, "atol": 1e-6}, "bf16": {"rtol": 2**-6, "atol": 1e-6},
             "clip": {"rtol": 0.0, "atol": 5e-6}}  # clip: DeepSpeed adds its 1e-6 to the norm in another place
# DeepSpeed's bf16 engines all-reduce bf16 gradients. Where a weight's gradient nearly cancels, its rounded sum can
# have the other sign than one process's fp32 sum (or round to zero), and Adam's first step moves it by ±lr (or
# not at all): with grad_accum 2, measured 30, 42 and 4 of the 25 917 weights (G, D and the EMA) on ZeRO-0/1/2,
# every one of them moved by ±lr one way and ∓lr or 0 the other; none with grad_accum 1. How many depends on the
# batch's samples and crops (12 with the crops drawn before the job-wide order). Up to 0.3 % of the weights may
# be that far apart (two steps of lr 1e-3, plus an ulp).
SIGN_FLIPS = {"share": 3e-3, "atol": 2 * 1e-3 + 2**-7}
# SAMPLE_ORDER: the cells train on the order of one sample per read (data.samples_per_read=1). Which samples meet in
# a batch decides how many weights get a gradient that nearly cancels, and there Adam's first steps (m / (√v + ε))
# turn the summation-order noise into ε-sized differences: on the default order's batches (runs of 8), ddp-fp32-k1
# measured 107 of the 25 917 weights beyond 1e-6 after 4 steps (largest 7.5e-6), against none on these. The order
# itself is the same for any number of processes (tests/data/test_read_runs.py).
# NaN cells: D's loss NaN in step 1 (micro-batch 0, last rank), G's in step 2 (last micro-batch, last rank).
NANS = {1: "d@1.0+g@2.0", 2: "d@1.0+g@2.1"}
CLIP = 0.05  # clips most steps of the tiny model
BATCHNORM_BACKENDS = ("ddp", "zero2")


def cell(name: str, shards: Path, *, precision: str = "fp32", accumulation: int = 1, zero: int | None = None,
         nan: str = "", steps: int | None = None, grad_clip: float = 0.0, norm: str = "instance") -> str:
    overrides = tiny_overrides(shards, **{
        "train.batch_size": 8, "train.grad_accum": accumulation, "train.max_steps": steps or STEPS[precision],
        "train.pretrain_steps": 0, "train.mixed_precision": precision, "train.trackers": "[]",
        "train.validate_every": 1000, "train.sample_every": 1000, "train.checkpoint_every": 1000,
        "optim.grad_clip": grad_clip, "model.generator.norm": norm, "model.discriminator.norm": norm,
        "data.samples_per_read": 1})  # the batches TOLERANCE was measured on, see SAMPLE_ORDER
    extra = ([f"zero={zero}"] if zero is not None else []) + ([f"nan={nan}"] if nan else [])
    return f"{name}:" + ",".join(item for item in overrides if not item.startswith("data.shards=")) + (
        "," + ",".join(extra) if extra else "")


def matrix_cells(backend: str, shards: Path) -> list[str]:
    zero = BACKENDS[backend]
    cells = [cell(f"{backend}-{precision}-k{k}", shards, precision=precision, accumulation=k, zero=zero)
             for precision in PRECISIONS for k in ACCUMULATION]
    cells.append(cell(f"{backend}-bf16-long", shards, precision="bf16", accumulation=2, zero=zero, steps=4))
    cells.append(cell(f"{backend}-nan", shards, accumulation=2, zero=zero, nan=NANS[2], steps=3))
    cells.append(cell(f"{backend}-clip", shards, accumulation=2, zero=zero, grad_clip=CLIP))
    if backend in BATCHNORM_BACKENDS:
        cells.append(cell(f"{backend}-bn", shards, accumulation=2, zero=zero, norm="batch"))
    return cells


def weights(out: Path, name: str, rank: int = 0) -> dict[str, torch.Tensor]:
    return load_file(out / name / f"weights-rank{rank}.safetensors")


def result(out: Path, name: str, rank: int = 0) -> dict:
    return json.loads((out / name / f"result-rank{rank}.json").read_text())


def max_difference(first: dict[str, torch.Tensor], second: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert first.keys() == second.keys()
    return max(((first[key] - second[key]).abs().max().item(), key) for key in first)


def assert_close_to(matrix: Path, name: str, reference: str, precision: str = "fp32", sign_flips: bool = False,
                    ) -> None:
    """Every weight within TOLERANCE[precision]; with `sign_flips`, all but SIGN_FLIPS["share"] of them, and
    those within SIGN_FLIPS["atol"]."""
    got, expected = weights(matrix, name), weights(matrix, reference)
    difference, key = max_difference(got, expected)
    far = {key: ~torch.isclose(got[key], expected[key], **TOLERANCE[precision]) for key in expected}
    count, total = sum(int(mask.sum()) for mask in far.values()), sum(mask.numel() for mask in far.values())
    print(f"{name} vs {reference}: largest difference {difference:.3g} ({key}); {count} of {total} weights "
          f"beyond {TOLERANCE[precision]}")
    if sign_flips and count <= SIGN_FLIPS["share"] * total:
        assert difference <= SIGN_FLIPS["atol"], f"{name} vs {reference}: {key} differs by {difference:.3g}"
        return
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], **TOLERANCE[precision],
                                   msg=lambda message, key=key: f"{name} vs {reference}, {key}: {message}")


@pytest.fixture(scope="module")
def matrix(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Every cell of the matrix and its references, run once for the module's tests."""
    out = tmp_path_factory.mktemp("matrix")
    shards_arg = str(shards)
    references = [cell("ref-fp32", shards), *(cell(f"ref-bf16-k{2 * k}", shards, precision="bf16", accumulation=2 * k)
                                               for k in ACCUMULATION)]
    references.append(cell("ref-nan", shards, nan=NANS[1], steps=3))
    references.append(cell("ref-clip", shards, grad_clip=CLIP))
    plain = subprocess.run([sys.executable, str(MATRIX_PROBE), str(out), shards_arg, *references],
                           capture_output=True, text=True, timeout=900, env=subprocess_env())
    assert plain.returncode == 0, plain.stderr[-4000:]
    # DeepSpeed keeps bf16 weights (no autocast): its bf16 reference is DeepSpeed in one process.
    deepspeed_references = [cell(f"ref-zero{stage}-bf16-k{2 * k}", shards, precision="bf16", accumulation=2 * k,
                                 zero=stage) for stage in (0, 1, 2) for k in ACCUMULATION]
    launches = [
        ("cpu_2proc.yaml", matrix_cells("ddp", shards), ()),
        ("deepspeed_cpu_2proc.yaml", [cell for backend in ("zero0", "zero1", "zero2")
                                      for cell in matrix_cells(backend, shards)], ()),
        ("deepspeed_cpu_2proc.yaml", deepspeed_references, ("--num_processes", "1")),
    ]
    for accelerate_config, cells, flags in launches:
        launched = launch_script(accelerate_config, [str(MATRIX_PROBE), str(out), shards_arg, *cells], *flags,
                                 timeout=1800)
        assert launched.returncode == 0, launched.stderr[-6000:]
    return out


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("precision", PRECISIONS)
@pytest.mark.parametrize("accumulation", ACCUMULATION)
def test_two_processes_equal_one_process_with_the_same_global_batch(matrix: Path, backend: str, precision: str,
                                                                     accumulation: int) -> None:
    """2 processes × grad_accum micro-batches == 1 process with the same global batch, GAN active from step 0."""
    name = f"{backend}-{precision}-k{accumulation}"
    assert result(matrix, name) == {"step": STEPS[precision], "finished": True}
    assert max_difference(weights(matrix, name, 0), weights(matrix, name, 1))[0] == 0.0  # ranks agree exactly
    reference = "ref-fp32"
    if precision == "bf16":  # the same micro-batches: 2 per process and micro-batch of the 2-process cell
        reference = f"ref-bf16-k{2 * accumulation}" if backend == "ddp" else f"ref-{backend}-bf16-k{2 * accumulation}"
    assert_close_to(matrix, name, reference, precision, sign_flips=precision == "bf16" and backend != "ddp")
    if precision == "bf16":  # several steps: the ranks still agree exactly
        long = weights(matrix, f"{backend}-bf16-long", 0)
        assert result(matrix, f"{backend}-bf16-long") == {"step": 4, "finished": True}
        assert all(value.isfinite().all() for value in long.values())
        assert max_difference(long, weights(matrix, f"{backend}-bf16-long", 1))[0] == 0.0


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_each_network_is_clipped_at_its_own_norm_alike_on_every_backend(matrix: Path, backend: str) -> None:
    """optim.grad_clip bounds each network's global gradient norm, on DDP and inside DeepSpeed's engines alike
    (and optim.grad_clip=0 does not clip at all on DeepSpeed: the fp32 cells above)."""
    assert_close_to(matrix, f"{backend}-clip", "ref-clip", "clip")
    assert max_difference(weights(matrix, "ref-fp32"), weights(matrix, "ref-clip"))[0] > 1e-4  # it did clip


@pytest.mark.slow
@pytest.mark.parametrize("backend", BATCHNORM_BACKENDS)
def test_batchnorm_networks_train_and_every_rank_validates_the_same_ema(matrix: Path, backend: str) -> None:
    """BatchNorm in D (two forward passes, real and fake, before one backward) and in G, with accumulation. The
    ranks' running statistics differ (each normalises its own micro-batches); the EMA's are averaged over the
    ranks, so every rank validates, samples and exports the same model."""
    first, second = weights(matrix, f"{backend}-bn", 0), weights(matrix, f"{backend}-bn", 1)
    statistics = [key for key in first if "running_" in key or "num_batches_tracked" in key]
    assert any(key.startswith("ema.") for key in statistics) and any(key.startswith("d.") for key in statistics)
    for key in first:
        assert first[key].isfinite().all(), key
        if key.startswith("ema.") or key not in statistics:
            assert torch.equal(first[key], second[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("backend", list(BACKENDS))
def test_a_nan_anywhere_in_a_step_skips_that_networks_whole_update(matrix: Path, backend: str) -> None:
    """A NaN in one micro-batch of one rank skips the network's update of that step on every rank (no partial
    update, nothing carried into the next step); a step with a skipped update still counts."""
    name = f"{backend}-nan"
    assert result(matrix, name) == {"step": 3, "finished": True}  # 3 steps tried, G's update skipped in one
    assert max_difference(weights(matrix, name, 0), weights(matrix, name, 1))[0] == 0.0
    assert_close_to(matrix, name, "ref-nan")


# ---------------------------------------------------------------- one network's update, in this process

def tiny_gan(seed: int = 0) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(seed)
    generator = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.LeakyReLU(0.2), nn.Conv2d(4, 2, 3, padding=1))
    discriminator = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.LeakyReLU(0.2), nn.Conv2d(4, 1, 3))
    return generator, discriminator


def make_update(model: nn.Module, accumulation: int, scaler: torch.amp.GradScaler | None = None,
                grad_clip: float = 0.0) -> Update:
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2, fused=True)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Update(model, optimizer, scheduler, grad_clip=grad_clip, accumulation=accumulation, scaler=scaler)


def gan_steps(scalers: tuple | None = None, steps: int = 3, accumulation: int = 2, grad_clip: float = 0.0,
              inf_in_g_at: int | None = None) -> tuple[nn.Module, nn.Module, list[tuple[bool, bool]]]:
    """The loop's order on a toy GAN: D over every micro-batch then its step, G likewise; returns the outcomes."""
    generator, discriminator = tiny_gan()
    g_update = make_update(generator, accumulation, scalers and scalers[0], grad_clip)
    d_update = make_update(discriminator, accumulation, scalers and scalers[1], grad_clip)
    data = torch.Generator().manual_seed(1)
    outcomes = []
    for step in range(steps):
        batches = [(torch.randn(2, 1, 8, 8, generator=data), torch.randn(2, 2, 8, 8, generator=data))
                   for _ in range(accumulation)]
        for index, (l, ab) in enumerate(batches):
            with d_update.micro_batch(index):
                fake = generator(l).detach()
                real_score, fake_score = discriminator(torch.cat([l, ab], 1)), discriminator(torch.cat([l, fake], 1))
                d_update.backward(F.softplus(-real_score).mean() + F.softplus(fake_score).mean())
        d_outcome = d_update.step()
        discriminator.requires_grad_(False)
        for index, (l, ab) in enumerate(batches):
            with g_update.micro_batch(index):
                fake = generator(l)
                loss = F.l1_loss(fake, ab) + 0.1 * F.softplus(-discriminator(torch.cat([l, fake], 1))).mean()
                if step == inf_in_g_at and index == 0:
                    loss = loss * float("inf")
                g_update.backward(loss)
        discriminator.requires_grad_(True)
        g_outcome = g_update.step()
        outcomes.append((bool(d_outcome.applied), bool(g_outcome.applied)))
    return generator, discriminator, outcomes


def assert_same_modules(first: nn.Module, second: nn.Module, **tolerance) -> None:
    for (name, a), b in zip(first.state_dict().items(), second.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}", **tolerance)


@pytest.mark.parametrize("grad_clip", [0.0, 0.05])
def test_each_network_unscales_and_clips_its_own_gradients_once(grad_clip: float) -> None:
    """fp16's loss scaling, one GradScaler per network, on fp32 weights: a power-of-two scale is undone exactly, so
    the updates equal those without scaling — which they would not if a network's gradients were unscaled twice
    (or a micro-batch's lost) because the other network stepped in between."""
    scalers = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=2),
               torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2))
    generator, discriminator, outcomes = gan_steps(scalers, grad_clip=grad_clip)
    plain_generator, plain_discriminator, _ = gan_steps(None, grad_clip=grad_clip)
    assert outcomes == [(True, True)] * 3
    assert_same_modules(generator, plain_generator, rtol=1e-6, atol=1e-7)
    assert_same_modules(discriminator, plain_discriminator, rtol=1e-6, atol=1e-7)
    # Each scaler is updated once per step: after 3 good steps, grown once (growth_interval 2), not 3 times.
    assert [scaler.get_scale() for scaler in scalers] == [2.0**13, 2.0**9]


def test_an_overflow_skips_only_that_networks_step_and_scale() -> None:
    scalers = (torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=100),
               torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=100))
    generator, _, outcomes = gan_steps(scalers, steps=2, inf_in_g_at=1)
    assert outcomes == [(True, True), (True, False)]
    assert [scaler.get_scale() for scaler in scalers] == [2.0**11, 2.0**8]
    one_step_generator, _, _ = gan_steps(scalers=None, steps=1)
    assert_same_modules(generator, one_step_generator, rtol=0, atol=0)  # G's second update: skipped entirely


def test_a_nan_in_any_micro_batch_skips_the_whole_update() -> None:
    model = nn.Linear(3, 1)
    update = make_update(model, accumulation=2)
    before = {name: value.clone() for name, value in model.state_dict().items()}
    for index, loss_scale in enumerate([float("nan"), 1.0]):
        with update.micro_batch(index):
            update.backward(model(torch.ones(4, 3)).mean() * loss_scale)
    outcome = update.step()
    assert not outcome.applied and not outcome.grad_norm.isfinite()
    assert all(torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert all(param.grad is None for param in model.parameters())  # nothing carried into the next step
    adam = update.optimizer.state[model.weight]
    assert adam["step"] == 0 and not adam["exp_avg"].any()  # Adam's moments and bias correction untouched
    assert update.scheduler.last_epoch == 1  # a skipped step is a step, as with GradScaler
    with update.micro_batch(0):
        update.backward(model(torch.ones(4, 3)).mean())
    with update.micro_batch(1):
        update.backward(model(torch.ones(4, 3)).mean())
    assert update.step().applied and adam["step"] == 1 and update.scheduler.last_epoch == 2


# Every way the host reads a tensor's value; on a GPU each waits for all the kernels queued before it.
HOST_READS = ("item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__")


def test_a_step_waits_for_the_device_on_logging_steps_only(shards: Path, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Host reads of tensor values are counted in gan_step and after_step, in this process (6 steps, 2 of them
    generator-only, grad_accum 2, epoch 0 ending at step 5): none outside the logging steps 3 and 6 (the last,
    which validates too). NaN skips are decided on the device and read there. (The loader's host tensors, e.g.
    its workers' seeds, are not the device's and are left out.)"""
    reads: Counter[int] = Counter()
    step: list[int | None] = [None]

    def counted(original):
        def read(self, *args, **kwargs):
            if step[0] is not None and threading.current_thread() is threading.main_thread():
                reads[step[0]] += 1
            return original(self, *args, **kwargs)
        return read

    def within(function):
        def run(state, *args):
            step[0] = state.progress.step + 1  # the step being made
            try:
                return function(state, *args)
            finally:
                step[0] = None
        return run

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    for name in ("gan_step", "after_step"):
        monkeypatch.setattr(loop, name, within(getattr(loop, name)))
    cfg = load_training_config(None, tiny_overrides(shards, **{
        "train.batch_size": 16, "train.grad_accum": 2, "train.max_steps": 6, "train.pretrain_steps": 2,
        "train.log_every": 3, "train.checkpoint_every": 1000, "train.validate_every": 1000,
        "train.sample_every": 1000, "train.trackers": "[]"}))
    try:
        result = loop.train(cfg, tmp_path / "run", "none")
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    assert result.step == 6
    assert set(reads) <= {3, 6} and reads[3] > 0, dict(reads)


def test_a_nan_validation_metric_never_becomes_the_best() -> None:
    nan = float("nan")
    assert improves(20.0, None, "max") and improves(21.0, 20.0, "max") and not improves(19.0, 20.0, "max")
    assert improves(3.0, 4.0, "min") and not improves(5.0, 4.0, "min")
    assert not improves(nan, None, "max") and not improves(nan, 20.0, "max") and not improves(nan, 4.0, "min")
    assert improves(19.0, nan, "max")  # a NaN best (saved by an older version) is replaced by any number


def test_padding_copies_are_left_out_of_the_loss() -> None:
    """An epoch's last global batch is filled with copies marked invalid: they stay (every micro-batch keeps its
    shape), the losses weigh them 0 and the micro-batch's losses are scaled by its share of real samples; one of
    copies only still runs, weighted 0."""
    masks = [np.array([True, True, True, True]), np.array([True, False, False, False]), np.zeros(4, bool)]
    rows = torch.arange(4.0).reshape(4, 1, 1, 1)
    batches = iter([Batch(l=rows, ab=rows.expand(4, 2, 1, 1), keys=list("abcd"), valid=torch.ones(4, dtype=bool),
                          positions=np.arange(4), slots=MicroSlots(0, 0, 4, 0, np.arange(4), mask))
                    for mask in masks])
    full, padded, empty = (take_micro_batch(batches, torch.contiguous_format) for _ in range(3))
    assert (full.weight, full.mask, full.l.flatten().tolist()) == (1.0, None, [0.0, 1.0, 2.0, 3.0])
    assert (padded.weight, padded.mask.tolist(), padded.ab.shape[0]) == (0.25, [1.0, 0.0, 0.0, 0.0], 4)
    assert (empty.weight, empty.mask.tolist(), empty.l.shape[0]) == (0.0, [0.0] * 4, 4)
    # The losses see the real rows only: the padded micro-batch's loss is its real sample's.
    loss = GeneratorLoss(LossConfig(beta=0.0, theta=0.0))
    target = padded.ab + torch.arange(4.0).reshape(4, 1, 1, 1)  # row r is r away from its prediction
    assert loss(padded.l, padded.ab, target, mask=padded.mask)["reconstruction"].item() == 0.0
    assert loss(full.l, full.ab, target)["reconstruction"].item() == 1.5
    assert loss(empty.l, empty.ab, target, mask=empty.mask)["reconstruction"].item() == 0.0


def test_fp16_without_a_gpu_is_refused_in_one_line() -> None:
    """Accelerate turns AMP off on the CPU: fp16 would silently train in fp32."""
    cpu = SimpleNamespace(mixed_precision="fp16", distributed_type=DistributedType.MULTI_CPU, scaler=None,
                          device=torch.device("cpu"))
    with pytest.raises(ConfigError, match=re.escape("train.mixed_precision=fp16 needs a GPU: on cpu Accelerate "
                                                    "would silently train in fp32; use bf16 or fp32")):
        check_backend(cpu)
    check_backend(SimpleNamespace(**(vars(cpu) | {"mixed_precision": "bf16"})))


# ---------------------------------------------------------------- DeepSpeed: SIGTERM, status 75, rerun

@pytest.mark.slow
def test_deepspeed_run_stopped_by_sigterm_resumes_to_the_uninterrupted_weights(shards: Path, tmp_path: Path) -> None:
    """Two processes under `accelerate launch` (ZeRO-2, grad_accum 2) get SIGTERM, as from Slurm: every rank
    saves at the same step and exits with 75. The launcher reports that as a failure (torchrun's agent), so
    RUN/summary.json is what tells a wrapper the run is resumable; rerunning the command finishes the run with
    the weights of an uninterrupted one."""
    overrides = tiny_overrides(shards, **{"train.batch_size": 8, "train.grad_accum": 2, "train.max_steps": 40,
                                          "train.checkpoint_every": 5, "train.validate_every": 40,
                                          "train.sample_every": 40, "train.trackers": "[]"})
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    command = launch_command("deepspeed_cpu_2proc.yaml", [str(RANK_PROBE), str(resumed), *overrides])
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=subprocess_env(), start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not list((resumed / "checkpoints").glob("step-*")) and time.monotonic() < deadline:
            time.sleep(0.05)  # the first periodic checkpoint: the loop runs, most steps are left
        os.killpg(process.pid, signal.SIGTERM)  # as Slurm does: the launcher and every process under it
        _, stderr = process.communicate(timeout=300)
    finally:
        process.kill()
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["finished"] is False and 5 <= summary["step"] < 40, stderr[-3000:]
    assert process.returncode != 0  # the launcher's view; the ranks exited with 75
    saved = resumed / "checkpoints" / f"step-{summary['step']:07d}"
    assert checkpoint.check(saved) is None

    rerun = launch_script("deepspeed_cpu_2proc.yaml", [str(RANK_PROBE), str(resumed), *overrides])
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert f"resumed from {saved} at step {summary['step']}" in rerun.stdout
    uninterrupted = launch_script("deepspeed_cpu_2proc.yaml", [str(RANK_PROBE), str(straight), *overrides])
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert_same_weights(probe_weights(resumed, 0), probe_weights(resumed, 1), rtol=0, atol=0)
    assert_same_weights(probe_weights(straight, 0), probe_weights(resumed, 0), rtol=1e-5, atol=1e-6)
