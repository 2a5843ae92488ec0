"""Which GPU each rank takes, and the start-up checks of a GPU node, without a GPU: device counts, the driver's
version, the environment and what the kernels were built with are set by each test; the rules are devices.py's."""

from __future__ import annotations

import os
import time

import pytest
import torch

from colorize_dist import _C, cli, devices
from colorize_dist.commands import train as command
from colorize_dist.devices import DeviceError, check_node, libraries_on, local_device_index, rank_device


@pytest.mark.parametrize(("local_rank", "visible", "local_world_size", "index"), [
    (0, 8, 8, 0), (5, 8, 8, 5), (1, 2, None, 1),  # every GPU of the node visible: LOCAL_RANK's
    (3, 1, 4, 0), (7, 1, None, 0), (0, 1, 1, 0),  # Slurm bound one GPU to each task: the one it sees
])
def test_each_rank_takes_the_gpu_it_sees(local_rank, visible, local_world_size, index):
    assert local_device_index(local_rank, visible, local_world_size) == index


@pytest.mark.parametrize(("local_rank", "visible", "local_world_size"), [(3, 2, 4), (1, 2, 4), (2, 2, None)])
def test_ranks_that_would_share_a_gpu_are_refused(local_rank, visible, local_world_size):
    with pytest.raises(DeviceError, match=f"local rank {local_rank} sees {visible} GPUs .* give each task one GPU"):
        local_device_index(local_rank, visible, local_world_size)


def test_a_rank_bound_to_one_gpu_hands_it_to_deepspeed_and_ddp(monkeypatch):
    """Rank 3 of 4, one GPU visible. DeepSpeed's engine sets its device from int(os.environ["LOCAL_RANK"]);
    Accelerate wraps DDP with device_ids=[LOCAL_RANK] ("invalid device ordinal" here) unless told to leave DDP to
    the module's device. Accelerate's own prepare_model runs, with DDP recorded (it needs the GPU)."""
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)  # one process; told below it has several GPUs and is local rank 3
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    device = rank_device()
    assert device == torch.device("cuda", 0)
    wrapped = []
    monkeypatch.setattr(torch.nn.parallel, "DistributedDataParallel",
                        lambda model, device_ids, output_device, **kwargs: wrapped.append(device_ids) or model)
    monkeypatch.setattr(Accelerator, "multi_device", property(lambda self: True))  # as with several GPUs
    monkeypatch.setattr(Accelerator, "local_process_index", property(lambda self: 3))
    accelerator.prepare_model(torch.nn.Linear(2, 2), device_placement=False)
    with libraries_on(device):
        assert int(os.environ["LOCAL_RANK"]) == device.index  # what DeepSpeed's engine reads
        accelerator.prepare_model(torch.nn.Linear(2, 2), device_placement=False)
    assert wrapped == [[3], None]  # today's ordinal 3; then the device the module is on
    assert os.environ["LOCAL_RANK"] == "3" and "ACCELERATE_BYPASS_DEVICE_MAP" not in os.environ
    for unchanged in (torch.device("cuda", 3), torch.device("cuda")):  # LOCAL_RANK's GPU, or the current one
        every_gpu = {"LOCAL_RANK": "3"}
        with libraries_on(unchanged, every_gpu):
            assert every_gpu == {"LOCAL_RANK": "3"}


@pytest.fixture
def gpu_node(monkeypatch):
    """A node with one GPU (sm_90), a driver for CUDA 13.0, torch for CUDA 13.0 and our kernels built with it."""
    node = {"driver": 13000}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100")
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: node["driver"])
    monkeypatch.setattr(devices, "dali_cuda_major", lambda: 13)
    monkeypatch.setattr(_C, "cuda_compiled", True)
    monkeypatch.setattr(_C, "cuda_archs", (80, 90))
    monkeypatch.setattr(_C, "cuda_runtime_version", 13000, raising=False)
    return node


def refusal(**kwargs) -> str:
    with pytest.raises(DeviceError) as info:
        check_node(**kwargs)
    message = str(info.value)
    assert "\n" not in message
    return message


def test_a_gpu_node_that_fits_trains_on_its_gpu(gpu_node):
    assert check_node(uses_dali=True, environ={"LOCAL_RANK": "0"}) == torch.device("cuda", 0)
    assert check_node(cpu=True, environ={}) is None  # --cpu: the CPU, GPUs or not
    assert check_node(environ={"ACCELERATE_USE_CPU": "true"}) is None  # accelerate launch --cpu


def test_kernels_built_without_cuda_are_refused_at_start_up(gpu_node, monkeypatch):
    monkeypatch.setattr(_C, "cuda_compiled", False)
    message = refusal(environ={})
    assert message.startswith("colorize_dist._C was built without CUDA kernels and this node has 1 GPU(s)")
    assert f"torch {torch.__version__} (CUDA 13.0), driver for CUDA 13.0" in message
    assert "COLORIZE_DIST_CUDA=1 pip install -e ." in message and "--cpu" in message


def test_kernels_for_other_gpus_are_refused_at_start_up(gpu_node, monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))
    assert "NVIDIA H100 (cuda:0) is sm_75. Rebuild with `COLORIZE_DIST_CUDA_ARCHS=75" in refusal(environ={})


def test_a_driver_older_than_the_kernels_or_dali_is_refused_at_start_up(gpu_node, monkeypatch):
    gpu_node["driver"] = 12040  # a 550 driver: many clusters run 535–570
    message = refusal(environ={})
    assert message.startswith("colorize_dist._C was built for CUDA 13, which needs an NVIDIA driver ≥ 580.65.06; "
                              f"found torch {torch.__version__} (CUDA 13.0), driver for CUDA 12.4: rebuild it with "
                              "the node's CUDA 12.x toolkit")
    monkeypatch.setattr(_C, "cuda_runtime_version", 12080, raising=False)  # rebuilt with CUDA 12.8: DALI next
    message = refusal(uses_dali=True, environ={})
    assert message.startswith("DALI was built for CUDA 13, which needs an NVIDIA driver ≥ 580.65.06")
    assert "install the DALI wheel for CUDA 12 (nvidia-dali-cuda120)" in message
    assert check_node(uses_dali=False, environ={}) == torch.device("cuda", 0)  # the reference loader needs no DALI


def test_a_gpu_job_where_torch_sees_no_gpu_never_trains_on_the_cpu(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(devices, "driver_gpu_count", lambda: 0)
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: None)
    given = {"SLURM_JOB_GPUS": "0,1"}
    assert refusal(environ=given).startswith("this job was given GPUs (SLURM_JOB_GPUS=0,1) but torch sees none; "
                                             f"found torch {torch.__version__}")
    assert "driver for CUDA none (no libcuda.so.1): run on a GPU node, or load the node's NVIDIA driver" in refusal(
        environ=given)
    monkeypatch.setattr(devices, "driver_cuda_version", lambda: 12040)
    monkeypatch.setattr(torch.version, "cuda", "13.0")
    assert ("torch's CUDA 13.0 needs a driver ≥ 580.65.06: install torch built for CUDA 12.x, or update the driver, "
            "or pass --cpu to train on the CPU") in refusal(environ=given)
    monkeypatch.setattr(torch.version, "cuda", None)
    monkeypatch.setattr(devices, "driver_gpu_count", lambda: 4)  # nothing in the environment, but the driver's GPUs
    assert refusal(environ={}).startswith("this job was given GPUs (4 on its driver) but torch sees none; found "
                                          f"torch {torch.__version__} (CUDA none: a CPU-only build)")
    assert check_node(cpu=True, environ=given) is None
    monkeypatch.setattr(devices, "driver_gpu_count", lambda: 0)
    assert check_node(environ={"CUDA_VISIBLE_DEVICES": ""}) is None  # a machine without GPUs: the CPU


def test_train_given_a_gpu_it_cannot_see_ends_at_start_up_in_one_line(tmp_path, monkeypatch, capsys):
    """The trainer's command, told it has GPU 0, where torch sees none: exit 2, one line, before any data is made or
    read. (Here there is no driver either; on a GPU machine torch is made to see none.)"""
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("ACCELERATE_USE_CPU", raising=False)
    start = time.monotonic()
    status = cli.run("train", command.main, command.parse(["--config", "tiny", "--run-dir", str(tmp_path / "run")]))
    elapsed = time.monotonic() - start
    lines = capsys.readouterr().err.splitlines()
    assert status == DeviceError.exit_status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("train: this job was given GPUs (CUDA_VISIBLE_DEVICES=0) but torch sees none; found "
                               f"torch {torch.__version__}")
    assert lines[0].endswith("or pass --cpu to train on the CPU") and not (tmp_path / "run" / "synthetic").exists()
    assert elapsed < 30
