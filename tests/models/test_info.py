"""model-info: parameters equal sum(numel), FLOPs equal torch's FlopCounterMode, saved-tensor bytes, the CLI."""

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from colorize_dist.cli import main as cli_main
from colorize_dist.config import preset_names
from colorize_dist.models import DiscriminatorConfig, GeneratorConfig, ModelConfig, build_discriminator, build_generator
from colorize_dist.models.info import activation_bytes, discriminator_cost, generator_cost
from colorize_dist.training.config import load_training_config

GENERATORS = [
    GeneratorConfig(),  # the seeds' baseline
    GeneratorConfig(ndims=8, depth=4, num_blocks=2, upsample="transpose", attention_gates=False),
    GeneratorConfig(ndims=8, transformer_blocks=2, transformer_dim=64, transformer_heads=4, color_space="rgb"),
]
DISCRIMINATORS = [DiscriminatorConfig(ndims=16),
                  DiscriminatorConfig(ndims=16, n_layers=4, num_scales=2, spectral_norm=True)]


def _torch_flops(model: torch.nn.Module, *inputs: torch.Tensor) -> int:
    # The math SDPA backend decomposes attention into matmuls the counter sees (it skips CPU flash attention).
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*inputs)
    return counter.get_total_flops()


@pytest.mark.parametrize("cfg", GENERATORS)
@pytest.mark.parametrize("size", [64, 128])
def test_generator_cost_matches_torch(cfg: GeneratorConfig, size: int) -> None:
    cost = generator_cost(cfg, size)
    generator = build_generator(cfg)
    assert cost.parameters == sum(p.numel() for p in generator.parameters())
    reference = _torch_flops(generator, torch.zeros(3, 1, size, size)) / 3
    assert cost.flops == pytest.approx(reference, rel=0.05)


@pytest.mark.parametrize("cfg", DISCRIMINATORS)
@pytest.mark.parametrize("channels", [2, 3])
def test_discriminator_cost_matches_torch(cfg: DiscriminatorConfig, channels: int) -> None:
    cost = discriminator_cost(cfg, channels, 256)
    discriminator = build_discriminator(cfg, channels)
    assert cost.parameters == sum(p.numel() for p in discriminator.parameters())
    reference = _torch_flops(discriminator, torch.zeros(2, 1, 256, 256), torch.zeros(2, channels, 256, 256)) / 2
    assert cost.flops == pytest.approx(reference, rel=0.05)


def test_flops_grow_with_pixels_and_parameters_do_not() -> None:
    small, large = generator_cost(GeneratorConfig(), 64), generator_cost(GeneratorConfig(), 256)
    assert large.parameters == small.parameters
    assert large.flops == 16 * small.flops  # fully convolutional, no attention
    assert large.activation_bytes == pytest.approx(16 * small.activation_bytes, rel=1e-2)  # + norm statistics


def test_activation_bytes_count_each_saved_storage_once() -> None:
    # conv1 saves x; ReLU saves its output, which conv2 saves again as its input: x + one hidden map.
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(),
                                torch.nn.Conv2d(4, 4, 3, padding=1))
    x = torch.zeros(2, 1, 8, 8)
    assert activation_bytes(model, x) == 4 * (2 * 1 * 8 * 8 + 2 * 4 * 8 * 8)


def test_activation_bytes_on_meta_equal_a_real_forward() -> None:
    cfg = GENERATORS[2]
    generator = build_generator(cfg).train()
    with sdpa_kernel(SDPBackend.MATH):  # what the meta device runs; it saves the attention scores
        real = activation_bytes(generator, torch.zeros(2, 1, 64, 64)) // 2
    assert generator_cost(cfg, 64).activation_bytes == real


def test_model_info_command_prints_the_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model-info", "generator.ndims=8", "--resolution", "64", "128"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    assert rows[0] == ["model", "resolution", "params", "GFLOP/sample", "act", "MiB/sample"]
    cfg = ModelConfig(generator=GeneratorConfig(ndims=8))
    generator_params = sum(p.numel() for p in build_generator(cfg.generator).parameters())
    discriminator_params = sum(p.numel() for p in build_discriminator(cfg.discriminator, 2).parameters())
    assert [row[:3] for row in rows[1:]] == [
        ["generator", "64²", f"{generator_params:,}"], ["generator", "128²", f"{generator_params:,}"],
        ["discriminator", "64²", f"{discriminator_params:,}"], ["discriminator", "128²", f"{discriminator_params:,}"],
    ]
    assert float(rows[2][3]) == pytest.approx(4 * float(rows[1][3]), rel=1e-2)


def test_model_info_reports_bad_input_in_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model-info", "--resolution", "100"]) == 2
    assert capsys.readouterr().err.strip() == (
        "model-info: resolution 100 does not fit generator.depth=3: it must be a multiple of 2^depth = 8 and at "
        "least 16; resize the images or lower generator.depth")
    assert cli_main(["model-info", "--resolution", "16"]) == 2
    assert capsys.readouterr().err.strip() == (
        "model-info: resolution 16 is too small for discriminator.n_layers=3 with num_scales=1: use at least 24, "
        "or fewer layers or scales")
    assert cli_main(["model-info", "generator.norm=layer"]) == 2
    assert "generator.norm='layer' is not one of" in capsys.readouterr().err


@pytest.mark.parametrize("preset", preset_names())
def test_model_info_defaults_to_each_presets_resolution(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli_main(["model-info", "--config", preset]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:]]
    resolution = load_training_config(preset).data.resolution
    assert [row[:2] for row in rows] == [["generator", f"{resolution}²"], ["discriminator", f"{resolution}²"]]
