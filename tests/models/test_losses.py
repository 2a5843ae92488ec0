"""Loss family: adversarial modes on known logits, WGAN-GP on toy critics, VGG loading, weighted totals."""

import math
import re
from pathlib import Path

import pytest
import torch

from colorize_dist.config import ConfigError, load_config
from colorize_dist.models import (
    DiscriminatorConfig,
    DiscriminatorLoss,
    GANLoss,
    GeneratorLoss,
    LossConfig,
    PerceptualLoss,
    build_discriminator,
    check_compatible,
    gradient_penalty,
)
from colorize_dist.models.losses import ADVERSARIAL_LOSSES, VGG16_URL

MODES = list(ADVERSARIAL_LOSSES)


def _batch(batch: int = 2, size: int = 32, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    l = torch.rand(batch, 1, size, size, generator=g) * 2 - 1
    real, fake = ((torch.rand(batch, 2, size, size, generator=g) * 2 - 1) * 0.5 for _ in range(2))
    return l, real, fake


@pytest.mark.parametrize(("mode", "d_loss", "g_loss"), [("vanilla", 2 * math.log(2), math.log(2)),
                                                        ("lsgan", 1.0, 1.0), ("hinge", 2.0, 0.0),
                                                        ("wgan-gp", 0.0, 0.0)])
def test_adversarial_losses_at_zero_logits(mode: str, d_loss: float, g_loss: float) -> None:
    zeros = torch.zeros(2, 1, 6, 6)
    gan = GANLoss(mode)
    assert gan.discriminator_loss(zeros, zeros).item() == pytest.approx(d_loss, abs=1e-6)
    assert gan.generator_loss(zeros).item() == pytest.approx(g_loss, abs=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_adversarial_losses_reward_the_right_side(mode: str) -> None:
    high, low = torch.full((2, 1, 6, 6), 2.0), torch.full((2, 1, 6, 6), -2.0)
    gan = GANLoss(mode)
    assert gan.discriminator_loss(high, low) < gan.discriminator_loss(low, high)
    assert gan.generator_loss(high) < gan.generator_loss(low)


@pytest.mark.parametrize("mode", MODES)
def test_multi_scale_logits_average_over_scales(mode: str) -> None:
    torch.manual_seed(0)
    real = [torch.randn(2, 1, 14, 14), torch.randn(2, 1, 6, 6)]
    fake = [torch.randn(2, 1, 14, 14), torch.randn(2, 1, 6, 6)]
    gan = GANLoss(mode)
    expected_d = (gan.discriminator_loss(real[0], fake[0]) + gan.discriminator_loss(real[1], fake[1])) / 2
    expected_g = (gan.generator_loss(fake[0]) + gan.generator_loss(fake[1])) / 2
    torch.testing.assert_close(gan.discriminator_loss(real, fake), expected_d)
    torch.testing.assert_close(gan.generator_loss(fake), expected_g)


def test_unknown_adversarial_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="choose from vanilla, lsgan, hinge, wgan-gp"):
        GANLoss("wgan")


def _linear_critic(weight: torch.Tensor):
    """D(l, x) = ⟨w, x⟩ as a 2×2 map of identical patch logits (plus a term in l, which must not matter)."""
    def critic(l: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        score = (weight * x).flatten(1).sum(1) + l.flatten(1).sum(1).square()
        return score[:, None, None, None].expand(-1, 1, 2, 2)
    return critic


def test_gradient_penalty_vanishes_for_one_lipschitz_critics() -> None:
    torch.manual_seed(0)
    l, real, fake = _batch()
    weight = torch.randn(2, 32, 32)
    unit = _linear_critic(weight / weight.norm())
    center = torch.randn(1, 2, 32, 32)

    def distance(l: torch.Tensor, x: torch.Tensor) -> torch.Tensor:  # ‖x − c‖: nonlinear, gradient norm 1
        return (x - center).flatten(1).norm(dim=1)[:, None, None, None]

    assert gradient_penalty(unit, l, real, fake).item() == pytest.approx(0.0, abs=1e-8)
    assert gradient_penalty(distance, l, real, fake).item() == pytest.approx(0.0, abs=1e-8)
    assert gradient_penalty(lambda l, x: [unit(l, x), unit(l, x)], l, real, fake).item() == pytest.approx(
        0.0, abs=1e-8)


@pytest.mark.parametrize("scale", [0.5, 3.0])
def test_gradient_penalty_is_squared_distance_of_gradient_norm_from_one(scale: float) -> None:
    torch.manual_seed(0)
    l, real, fake = _batch()
    weight = torch.randn(2, 32, 32)
    critic = _linear_critic(scale * weight / weight.norm())
    assert gradient_penalty(critic, l, real, fake).item() == pytest.approx((scale - 1) ** 2, rel=1e-5)


def test_gradient_penalty_of_a_patch_discriminator_is_positive_and_trains_it() -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(ndims=8), 2)
    l, real, fake = _batch(size=64)
    fake.requires_grad_(True)
    penalty = gradient_penalty(discriminator, l, real, fake)
    assert penalty.item() > 0
    penalty.backward()  # double backward reaches D's conv weights (not biases: ∂D/∂x ignores them), not G
    convs = [m for m in discriminator.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(conv.weight.grad.abs().sum() > 0 for conv in convs)
    assert fake.grad is None


def test_perceptual_loss_loads_the_hub_cache(hub_with_vgg: Path) -> None:
    loss = PerceptualLoss(["relu1_2", "relu3_3"])
    saved = torch.load(hub_with_vgg, weights_only=True)
    torch.testing.assert_close(loss.vgg[0].weight, saved["features.0.weight"])
    assert len(loss.vgg) == 16  # up to relu3_3, nothing deeper
    assert not any(p.requires_grad for p in loss.parameters())


def test_perceptual_loss_is_zero_on_the_target_and_differentiable(hub_with_vgg: Path) -> None:
    l, real, fake = _batch(size=64)
    loss = PerceptualLoss(["relu1_2", "relu2_2", "relu3_3", "relu4_3"])
    assert loss(l, real, real).item() == 0.0
    fake.requires_grad_(True)
    value = loss(l, fake, real)
    value.backward()
    assert value.item() > 0
    assert fake.grad.abs().sum() > 0


def test_perceptual_loss_on_rgb_predictions(hub_with_vgg: Path) -> None:
    g = torch.Generator().manual_seed(0)
    l = torch.rand(1, 1, 32, 32, generator=g) * 2 - 1
    real, fake = (torch.rand(1, 3, 32, 32, generator=g) * 2 - 1 for _ in range(2))
    loss = PerceptualLoss(["relu2_2"], color_space="rgb")
    assert loss(l, real, real).item() == 0.0
    assert loss(l, fake, real).item() > 0


def test_perceptual_loss_from_an_explicit_path(hub_with_vgg: Path, monkeypatch: pytest.MonkeyPatch,
                                               tmp_path: Path) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    loss = GeneratorLoss(LossConfig(vgg_weights=str(hub_with_vgg), theta=0.0))
    assert loss.perceptual is not None


def test_missing_vgg_weights_name_the_file_and_the_fix(empty_hub: Path) -> None:
    with pytest.raises(FileNotFoundError) as info:
        PerceptualLoss(["relu2_2"])
    message = str(info.value)
    assert "\n" not in message
    assert str(empty_hub) in message and VGG16_URL in message and "loss.vgg_weights" in message


def test_generator_loss_is_the_weighted_sum_of_its_terms(hub_with_vgg: Path) -> None:
    cfg = LossConfig(reconstruction="l2", alpha=3.0, beta=2.0, theta=0.5, adversarial="lsgan")
    loss = GeneratorLoss(cfg)
    l, real, fake = _batch()
    logits = torch.randn(2, 1, 2, 2)
    terms = loss(l, fake, real, logits)
    assert terms["reconstruction"].item() == pytest.approx((fake - real).square().mean().item(), rel=1e-6)
    assert terms["adversarial"].item() == pytest.approx((logits - 1).square().mean().item(), rel=1e-6)
    expected = 3.0 * terms["reconstruction"] + 2.0 * terms["perceptual"] + 0.5 * terms["adversarial"]
    torch.testing.assert_close(terms["total"], expected)


def test_generator_loss_skips_zero_weight_terms(empty_hub: Path) -> None:
    loss = GeneratorLoss(LossConfig(beta=0.0, theta=0.0))  # needs no VGG weights
    l, real, fake = _batch()
    terms = loss(l, fake, real)
    assert set(terms) == {"reconstruction", "total"}
    torch.testing.assert_close(terms["total"], 100.0 * (fake - real).abs().mean())
    with pytest.raises(ValueError, match=re.escape("loss.theta = 0")):
        loss(l, fake, real, torch.zeros(2, 1, 2, 2))


def test_generator_loss_without_logits_is_the_warmup_loss(empty_hub: Path) -> None:
    l, real, fake = _batch()
    terms = GeneratorLoss(LossConfig(beta=0.0, theta=0.5))(l, fake, real)
    assert set(terms) == {"reconstruction", "total"}
    torch.testing.assert_close(terms["total"], 100.0 * (fake - real).abs().mean())


def test_perceptual_loss_runs_vgg_in_the_runs_precision_without_an_outer_autocast(hub_with_vgg: Path) -> None:
    """Under DeepSpeed, Accelerate's autocast does nothing; the loss's own runs VGG in bf16 all the same."""
    l, real, fake = _batch()
    layers = ["relu1_2", "relu2_2"]
    half, full = PerceptualLoss(layers, precision=torch.bfloat16), PerceptualLoss(layers)
    dtypes = []
    half.vgg[0].register_forward_hook(lambda module, args, output: dtypes.append(output.dtype))
    value = half(l, fake, real)
    assert dtypes == [torch.bfloat16] * 2 and value.dtype == torch.float32
    torch.testing.assert_close(value, full(l, fake, real), rtol=2e-2, atol=0.0)  # bf16 activations


def test_generator_loss_under_bfloat16_autocast(hub_with_vgg: Path) -> None:
    loss = GeneratorLoss(LossConfig())
    l, real, fake = _batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        terms = loss(l, fake.bfloat16(), real, torch.zeros(2, 1, 2, 2, dtype=torch.bfloat16))
    assert all(value.dtype == torch.float32 and torch.isfinite(value) for value in terms.values())


@pytest.mark.parametrize("mode", MODES)
def test_discriminator_loss_adds_the_penalty_for_wgan_gp_only(mode: str) -> None:
    torch.manual_seed(0)
    discriminator = build_discriminator(DiscriminatorConfig(ndims=8), 2)
    l, real, fake = _batch(size=64)
    terms = DiscriminatorLoss(LossConfig(adversarial=mode, gp_weight=7.0))(discriminator, l, real, fake)
    if mode == "wgan-gp":
        assert terms["gradient_penalty"] > 0
        torch.testing.assert_close(terms["total"], terms["adversarial"] + 7.0 * terms["gradient_penalty"])
    else:
        assert set(terms) == {"adversarial", "total"}
        torch.testing.assert_close(terms["total"], terms["adversarial"])


def test_loss_config_from_yaml_and_its_errors(tmp_path: Path) -> None:
    path = tmp_path / "run.yaml"
    path.write_text("loss:\n  reconstruction: l2\n  adversarial: hinge\n  perceptual_layers: [relu2_2]\n")
    cfg = load_config(LossConfig, path, section="loss")
    assert (cfg.reconstruction, cfg.adversarial, cfg.perceptual_layers, cfg.alpha) == ("l2", "hinge", ["relu2_2"],
                                                                                       100.0)
    with pytest.raises(ConfigError, match=re.escape("loss.perceptual_layers='relu9_9' is not one of relu1_1, relu1_2")):
        load_config(LossConfig, path, ["perceptual_layers=[relu9_9]"], section="loss")
    with pytest.raises(ConfigError, match=re.escape("loss.adversarial='wgan' is not one of")):
        load_config(LossConfig, path, ["adversarial=wgan"], section="loss")


def test_wgan_gp_refuses_a_batch_norm_critic() -> None:
    with pytest.raises(ConfigError, match=re.escape("wgan-gp needs discriminator.norm other than 'batch'")):
        check_compatible(DiscriminatorConfig(norm="batch"), LossConfig(adversarial="wgan-gp"))
    check_compatible(DiscriminatorConfig(norm="instance"), LossConfig(adversarial="wgan-gp"))
