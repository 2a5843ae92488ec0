"""torch.compile: the compiled generator and discriminator match eager mode on CPU, forward and backward."""

import pytest
import torch

from colorize_dist.models import DiscriminatorConfig, GeneratorConfig, build_discriminator, build_generator


@pytest.mark.slow
def test_compiled_models_match_eager() -> None:
    torch.manual_seed(0)
    generator = build_generator(GeneratorConfig(ndims=4, depth=2, transformer_blocks=1, transformer_dim=16,
                                                transformer_heads=2))
    discriminator = build_discriminator(DiscriminatorConfig(ndims=4), 2)
    l = torch.rand(2, 1, 64, 64) * 2 - 1

    def step(g: torch.nn.Module, d: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        g.zero_grad()
        d.zero_grad()
        ab = g(l)
        logits = d(l, ab)
        logits.mean().backward()
        return ab.detach(), logits.detach(), [p.grad.clone() for p in (*g.parameters(), *d.parameters())]

    eager = step(generator, discriminator)
    compiled = step(torch.compile(generator), torch.compile(discriminator))
    torch.testing.assert_close(compiled[0], eager[0], atol=1e-4, rtol=1e-3)
    torch.testing.assert_close(compiled[1], eager[1], atol=1e-4, rtol=1e-3)
    for actual, expected in zip(compiled[2], eager[2], strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-3)
