"""PatchGAN: logit map sizes, the 70×70 receptive field, conditioning on L, spectral norm, multi-scale."""

import re

import pytest
import torch
import torch.nn.functional as F

from colorize_dist.config import ConfigError
from colorize_dist.models import (
    DiscriminatorConfig,
    MultiScaleDiscriminator,
    PatchDiscriminator,
    build_discriminator,
)

SMALL = {"ndims": 8}


def _pair(batch: int, size: int, channels: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 1, size, size, generator=g) * 2 - 1, torch.rand(batch, channels, size, size, generator=g)


@pytest.mark.parametrize("size", [64, 128, 256, 512])
@pytest.mark.parametrize("channels", [2, 3])
def test_patch_logit_map_shape(size: int, channels: int) -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(**SMALL), channels)
    assert isinstance(discriminator, PatchDiscriminator)
    with torch.no_grad():
        logits = discriminator(*_pair(2, size, channels))
    side = size // 8 - 2  # three stride-2 4×4 convs, then two stride-1 4×4 convs with padding 1
    assert logits.shape == (2, 1, side, side)
    assert torch.isfinite(logits).all() and logits.std() > 0


@pytest.mark.parametrize(("n_layers", "size", "expected"), [(2, 128, 34), (3, 128, 70), (4, 256, 142)])
def test_receptive_field_is_what_one_logit_sees(n_layers: int, size: int, expected: int) -> None:
    cfg = DiscriminatorConfig(ndims=4, n_layers=n_layers, norm="none")  # a norm would mix the whole image
    assert cfg.receptive_field == expected
    torch.manual_seed(0)
    discriminator = build_discriminator(cfg, 2)
    l, color = _pair(1, size)
    color.requires_grad_(True)
    logits = discriminator(l, color)
    logits[0, 0, logits.shape[2] // 2, logits.shape[3] // 2].backward()
    rows, cols = color.grad.abs().sum((0, 1)).nonzero(as_tuple=True)
    assert rows.max() - rows.min() + 1 == expected
    assert cols.max() - cols.min() + 1 == expected


def test_logits_depend_on_the_l_condition() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(**SMALL), 2)
    l, color = _pair(2, 64)
    with torch.no_grad():
        assert not torch.allclose(discriminator(l, color), discriminator(-l, color))


def test_spectral_norm_makes_every_conv_unit_norm() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(**SMALL, spectral_norm=True, norm="none"), 2)
    with torch.no_grad():
        for _ in range(30):  # one power iteration per training forward
            discriminator(*_pair(1, 64))
    discriminator.eval()
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 5
    for conv in convs:
        sigma = torch.linalg.matrix_norm(conv.weight.detach().flatten(1), ord=2).item()
        assert sigma == pytest.approx(1.0, abs=0.02)


def test_multi_scale_runs_copies_on_downsampled_pairs() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(**SMALL, num_scales=3), 2)
    assert isinstance(discriminator, MultiScaleDiscriminator)
    l, color = _pair(2, 256)
    with torch.no_grad():
        logits = discriminator(l, color)
        assert [tuple(x.shape) for x in logits] == [(2, 1, 30, 30), (2, 1, 14, 14), (2, 1, 6, 6)]
        half = [F.avg_pool2d(x, 3, 2, padding=1, count_include_pad=False) for x in (l, color)]
        torch.testing.assert_close(logits[1], discriminator.scales[1](*half))
    assert not torch.allclose(discriminator.scales[0].layers[0].weight, discriminator.scales[1].layers[0].weight)


@pytest.mark.parametrize("cfg", [DiscriminatorConfig(**SMALL), DiscriminatorConfig(**SMALL, norm="batch"),
                                 DiscriminatorConfig(**SMALL, spectral_norm=True, num_scales=2)])
def test_gradient_reaches_every_parameter(cfg: DiscriminatorConfig) -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(cfg, 2)
    logits = discriminator(*_pair(2, 128))
    sum(x.square().mean() for x in (logits if isinstance(logits, list) else [logits])).backward()
    silent = [name for name, p in discriminator.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not silent


def test_bfloat16_autocast_and_channels_last() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(**SMALL), 2)
    l, color = _pair(2, 64)
    with torch.no_grad():
        expected = discriminator(l, color)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = discriminator(l, color)
        discriminator.to(memory_format=torch.channels_last)
        last = discriminator(l.to(memory_format=torch.channels_last), color.to(memory_format=torch.channels_last))
    assert low.dtype == torch.bfloat16
    assert (low.float() - expected).abs().max() < 0.05 * expected.abs().max()
    torch.testing.assert_close(last, expected, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(("overrides", "message"), [({"norm": "lrn"}, "discriminator.norm='lrn' is not one of"),
                                                    ({"num_scales": 0}, "discriminator.num_scales must be positive")])
def test_invalid_config_names_the_key(overrides: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_discriminator(DiscriminatorConfig(**overrides), 2)
