"""Attention U-Net: shapes and ranges across resolutions, switches, gradients, size errors, bf16 and channels_last."""

import re
from pathlib import Path

import pytest
import torch

from colorize_dist.config import ConfigError, load_config
from colorize_dist.models import AttentionUNet, GeneratorConfig, ModelConfig, build_generator
from colorize_dist.models.blocks import AttentionGate, PixelTransformer

SMALL = {"ndims": 4, "depth": 3, "num_blocks": 1}


def _l(batch: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("size", [64, 128, 256, 512])
@pytest.mark.parametrize(("space", "channels"), [("ab", 2), ("rgb", 3)])
def test_output_shape_and_range(size: int, space: str, channels: int) -> None:
    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(**SMALL, color_space=space))
    with torch.no_grad():
        out = generator(_l(1, size))
    assert out.shape == (1, channels, size, size)
    assert out.abs().max() < 1  # tanh
    assert out.std() > 1e-3  # not a constant map


def test_non_square_input_divisible_by_two_to_the_depth() -> None:
    generator = build_generator(GeneratorConfig(**SMALL))
    with torch.no_grad():
        assert generator(torch.zeros(2, 1, 48, 80)).shape == (2, 2, 48, 80)


@pytest.mark.parametrize("size", [(60, 64), (64, 36), (65, 65)])
def test_size_not_divisible_raises(size: tuple[int, int]) -> None:
    generator = build_generator(GeneratorConfig(**SMALL))
    with pytest.raises(ValueError, match=re.escape("not divisible by 2^depth = 8")):
        generator(torch.zeros(1, 1, *size))


@pytest.mark.parametrize("gates", [True, False])
@pytest.mark.parametrize("transformer_blocks", [0, 2])
def test_switches_add_and_remove_modules(gates: bool, transformer_blocks: int) -> None:
    cfg = GeneratorConfig(**SMALL, attention_gates=gates, transformer_blocks=transformer_blocks,
                          transformer_dim=32, transformer_heads=2)
    generator = build_generator(cfg)
    modules = list(generator.modules())
    assert sum(isinstance(m, AttentionGate) for m in modules) == (cfg.depth if gates else 0)
    transformers = [m for m in modules if isinstance(m, PixelTransformer)]
    assert len(transformers) == (1 if transformer_blocks else 0)
    if transformers:
        assert len(transformers[0].blocks) == transformer_blocks
    with torch.no_grad():
        assert generator(_l(1, 64)).shape == (1, 2, 64, 64)


def test_attention_gate_scales_skip_per_pixel_in_unit_interval() -> None:
    torch.manual_seed(0)
    gate = AttentionGate(skip_channels=6, gate_channels=4)
    skip, gating = torch.randn(2, 6, 8, 8), torch.randn(2, 4, 8, 8)
    ratio = gate(skip, gating) / skip
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), atol=1e-5)  # one score per pixel, all channels
    assert ((ratio > 0) & (ratio < 1)).all()


@pytest.mark.parametrize("upsample", ["bilinear", "nearest", "transpose"])
@pytest.mark.parametrize("norm", ["instance", "batch", "group", "none"])
def test_gradient_reaches_every_parameter(upsample: str, norm: str) -> None:
    torch.manual_seed(0)
    cfg = GeneratorConfig(ndims=4, depth=2, num_blocks=1, norm=norm, upsample=upsample, transformer_blocks=1,
                          transformer_dim=16, transformer_heads=2)
    generator = build_generator(cfg)
    target = torch.rand(2, 2, 32, 32) * 2 - 1
    (generator(_l(2, 32)) - target).square().mean().backward()
    silent = [name for name, p in generator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_widths_double_per_level_up_to_the_cap() -> None:
    generator = AttentionUNet(GeneratorConfig(ndims=16, depth=4, max_width=64))
    widths = [level.down.out_channels for level in generator.encoder]
    assert widths == [16, 32, 64, 64]
    assert generator.head.in_channels == 16


def _generator_with_transformer() -> torch.nn.Module:
    torch.manual_seed(0)
    return build_generator(GeneratorConfig(**SMALL, transformer_blocks=1, transformer_dim=16,
                                           transformer_heads=2)).eval()


def test_channels_last_matches_contiguous() -> None:
    generator = _generator_with_transformer()
    l = _l(2, 64)
    with torch.no_grad():
        expected = generator(l)
        generator.to(memory_format=torch.channels_last)
        actual = generator(l.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)


def test_bfloat16_autocast_close_to_float32() -> None:
    generator = _generator_with_transformer()
    l = _l(2, 64)
    with torch.no_grad():
        expected = generator(l)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = generator(l)
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() < 0.05


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"norm": "layer"}, "generator.norm='layer' is not one of batch, instance, group, none"),
        ({"upsample": "pixelshuffle"}, "generator.upsample="),
        ({"color_space": "hsv"}, "generator.color_space="),
        ({"depth": 0}, "generator.depth must be positive"),
        ({"transformer_blocks": -1}, "generator.transformer_blocks must be ≥ 0"),
        ({"transformer_dim": 20, "transformer_heads": 2}, "divisible by 4 × transformer_heads = 8"),
    ],
)
def test_invalid_config_names_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_generator(GeneratorConfig(**overrides))


def test_model_config_from_the_yaml_model_section(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("model:\n  generator:\n    depth: 4\n    ndims: 32\n  discriminator:\n    num_scales: 2\n"
                    "loss:\n  alpha: 1.0\n")
    cfg = load_config(ModelConfig, path, ["generator.attention_gates=false"], section="model")
    assert (cfg.generator.depth, cfg.generator.ndims, cfg.generator.attention_gates) == (4, 32, False)
    assert (cfg.generator.num_blocks, cfg.discriminator.num_scales, cfg.discriminator.ndims) == (1, 2, 64)
    with pytest.raises(ConfigError, match=re.escape("generator.norm='bn' is not one of")):
        load_config(ModelConfig, path, ["generator.norm=bn"], section="model")
