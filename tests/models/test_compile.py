"""torch.compile: the compiled generator matches eager mode on CPU, forward and backward."""

import pytest
import torch

from colorize_dist.models import GeneratorConfig, build_generator


@pytest.mark.slow
def test_compiled_generator_matches_eager() -> None:
    torch.manual_seed(0)
    # Gates and the transformer, with as few layers as possible: compilation time dominates this test.
    generator = build_generator(GeneratorConfig(ndims=4, depth=2, num_blocks=0, transformer_blocks=1,
                                                transformer_dim=16, transformer_heads=2))
    l = torch.rand(2, 1, 32, 32) * 2 - 1
    target = torch.rand(2, 2, 32, 32) * 2 - 1

    def step(model: torch.nn.Module) -> tuple[torch.Tensor, list[torch.Tensor]]:
        generator.zero_grad()
        ab = model(l)
        (ab - target).square().mean().backward()
        return ab.detach(), [p.grad.clone() for p in generator.parameters()]

    eager_ab, eager_grads = step(generator)
    compiled_ab, compiled_grads = step(torch.compile(generator))
    torch.testing.assert_close(compiled_ab, eager_ab, atol=1e-5, rtol=1e-4)
    for actual, expected in zip(compiled_grads, eager_grads, strict=True):
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
