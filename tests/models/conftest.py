"""Fixtures for the model tests: a temporary torch hub cache holding randomly initialised VGG16 weights."""

from pathlib import Path

import pytest
import torch
import torchvision

from colorize_dist.models.losses import VGG16_FILENAME


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny; two intra-op threads on a shared 2-core machine run up to 10× slower, not faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def vgg_torch_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TORCH_HOME whose hub cache has torchvision's vgg16 file name, with random (seeded) weights."""
    home = tmp_path_factory.mktemp("torch_home")
    checkpoints = home / "hub" / "checkpoints"
    checkpoints.mkdir(parents=True)
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), checkpoints / VGG16_FILENAME)
    return home


@pytest.fixture
def hub_with_vgg(vgg_torch_home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(vgg_torch_home))
    return vgg_torch_home / "hub" / "checkpoints" / VGG16_FILENAME


@pytest.fixture
def empty_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    return tmp_path / "hub" / "checkpoints" / VGG16_FILENAME
