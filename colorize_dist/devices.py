"""Which GPU a rank uses, and whether this node's GPU software fits together: checked at start-up, before any process
group or CUDA context, so that a node that cannot train ends in one line naming what it found and the fix, instead
of a CUDA error at the first batch, or a run on the CPU that nobody asked for.

The rules: a rank uses LOCAL_RANK's GPU when it sees all of its node's GPUs, and the one it sees when Slurm binds a
GPU per task (`--gpus-per-task=1`, `--gpu-bind`); DeepSpeed and Accelerate's DDP wrapper, which take LOCAL_RANK as
the device, are given that one instead (`libraries_on`). A job that was given GPUs never trains on the CPU unless
asked (`--cpu`, or ACCELERATE_USE_CPU as `accelerate launch --cpu` sets it). Every CUDA build in the process —
torch, our kernels, DALI — needs a driver that supports its CUDA major version (CUDA's minor-version compatibility
covers the rest); the driver's version is read from libcuda itself, which answers even where torch cannot.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.metadata
import os
import re
from collections.abc import Iterator, Mapping

import torch

from colorize_dist.config import ConfigError

# The oldest Linux driver of each CUDA major version (CUDA's release notes, "minor version compatibility").
MIN_DRIVER = {11: "450.80.02", 12: "525.60.13", 13: "580.65.06"}
NO_DEVICES = ("", "-1", "NoDevFiles")  # CUDA_VISIBLE_DEVICES values that hide every GPU on purpose
CPU_HINT = "or pass --cpu to train on the CPU"


class DeviceError(ConfigError):
    """A node or rank that cannot train on its GPU as asked: one line, the versions found and the fix."""


def cuda_version(version: int) -> str:
    """CUDA's integer versions (12080) as people write them (12.8)."""
    return f"{version // 1000}.{version % 1000 // 10}"


def driver_cuda_version() -> int | None:
    """The newest CUDA version the NVIDIA driver supports (e.g. 12080), None where no driver loads."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    version = ctypes.c_int()
    return version.value if libcuda.cuDriverGetVersion(ctypes.byref(version)) == 0 else None


def driver_gpu_count() -> int:
    """GPUs the driver sees (through CUDA_VISIBLE_DEVICES), whatever torch makes of them; 0 without a driver."""
    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return 0
    count = ctypes.c_int()
    if libcuda.cuInit(0) != 0 or libcuda.cuDeviceGetCount(ctypes.byref(count)) != 0:
        return 0
    return count.value


def gpus_given(environ: Mapping[str, str]) -> str | None:
    """What says this process was given GPUs (the launcher's or Slurm's variables), None if nothing does."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() not in NO_DEVICES:
        return f"CUDA_VISIBLE_DEVICES={visible}"
    for name in ("SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE"):
        if environ.get(name, "").strip() not in ("", "0"):
            return f"{name}={environ[name]}"
    return None


def cpu_requested(cpu: bool, environ: Mapping[str, str]) -> bool:
    return cpu or environ.get("ACCELERATE_USE_CPU", "false").lower() in ("1", "true", "yes")


def local_device_index(local_rank: int, visible: int, local_world_size: int | None = None) -> int:
    """This rank's GPU among the `visible` ones: LOCAL_RANK's where it sees every GPU of its node, the only one
    where Slurm bound one to each task. Anything else would put two ranks on one GPU: refused."""
    if visible >= max(local_rank + 1, local_world_size or 0):
        return local_rank
    if visible == 1:
        return 0
    ranks = f"{local_world_size} ranks" if local_world_size else "several ranks"
    raise DeviceError(f"local rank {local_rank} sees {visible} GPUs (CUDA_VISIBLE_DEVICES="
                      f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}) with {ranks} on its node, so some ranks "
                      "would share a GPU: give each task one GPU (srun --gpus-per-task=1) or every task all of them")


def rank_device(environ: Mapping[str, str] = os.environ) -> torch.device:
    """The GPU this process trains on, from LOCAL_RANK (0 if unset) and what it sees."""
    local_world_size = environ.get("LOCAL_WORLD_SIZE")
    index = local_device_index(int(environ.get("LOCAL_RANK", "0")), torch.cuda.device_count(),
                               int(local_world_size) if local_world_size else None)
    return torch.device("cuda", index)


@contextlib.contextmanager
def libraries_on(device: torch.device, environ: dict[str, str] = os.environ) -> Iterator[None]:
    """While networks are handed to Accelerate: DeepSpeed's engine sets its device from LOCAL_RANK and Accelerate
    wraps DDP with device_ids=[LOCAL_RANK]; on a rank bound to one GPU (LOCAL_RANK 3, one GPU visible: "invalid
    device ordinal") DeepSpeed is told `device`'s index instead, and DDP takes the device its module is on."""
    local_rank = environ.get("LOCAL_RANK")
    if device.type != "cuda" or device.index is None or local_rank is None or int(local_rank) == device.index:
        yield
        return
    saved = {name: environ.get(name) for name in ("LOCAL_RANK", "ACCELERATE_BYPASS_DEVICE_MAP")}
    environ.update(LOCAL_RANK=str(device.index), ACCELERATE_BYPASS_DEVICE_MAP="true")
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                environ.pop(name, None)
            else:
                environ[name] = value


def dali_cuda_major() -> int | None:
    """The CUDA major version of the installed DALI wheel (nvidia-dali-cuda130 → 13), None without one."""
    for dist in importlib.metadata.distributions():
        match = re.fullmatch(r"nvidia[-_]dali[-_]cuda(\d+)0", dist.metadata["Name"] or "")
        if match:
            return int(match.group(1))
    return None


def check_node(*, cpu: bool = False, uses_dali: bool = False,
               environ: Mapping[str, str] = os.environ) -> torch.device | None:
    """This rank's GPU, or None to train on the CPU (asked for, or a machine without GPUs); DeviceError (one line)
    for a node whose GPUs cannot be used as built."""
    if cpu_requested(cpu, environ):
        return None
    driver = driver_cuda_version()
    found = f"torch {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU-only build'}), driver for CUDA " + (
        cuda_version(driver) if driver else "none (no libcuda.so.1)")
    if not torch.cuda.is_available():
        given = gpus_given(environ) or (f"{count} on its driver" if (count := driver_gpu_count()) else None)
        if given is None:
            return None  # a machine without GPUs: the CPU is all there is
        raise DeviceError(f"this job was given GPUs ({given}) but torch sees none; found {found}: "
                          f"{_no_gpu_fix(driver)}, {CPU_HINT}")
    builds = {"colorize_dist._C": _kernels_cuda_major(found)}
    if uses_dali:
        builds["DALI"] = dali_cuda_major()
    for name, major in builds.items():
        if major is not None and driver is not None and driver // 1000 < major:
            fix = (f"install the DALI wheel for CUDA {driver // 1000} (nvidia-dali-cuda{driver // 1000}0)"
                   if name == "DALI" else f"rebuild it with the node's CUDA {driver // 1000}.x toolkit "
                   "(`module load cuda`, then `pip install -e .`)")
            raise DeviceError(f"{name} was built for CUDA {major}, which needs an NVIDIA driver ≥ {MIN_DRIVER[major]}"
                              f"; found {found}: {fix}, or update the driver")
    device = rank_device(environ)
    from colorize_dist import _C  # built with CUDA: checked above
    from colorize_dist.color import KernelUnavailableError, _check_cuda_arch

    try:
        _check_cuda_arch(_C.cuda_archs, device)
    except KernelUnavailableError as exc:
        raise DeviceError(str(exc)) from None
    return device


def _kernels_cuda_major(found: str) -> int | None:
    """The CUDA major version our kernels were built with; DeviceError where they were not built."""
    try:
        from colorize_dist import _C
    except ImportError as exc:
        raise DeviceError(f"colorize_dist._C is not built ({exc}); found {found}: build it with the node's CUDA "
                          f"toolkit (`COLORIZE_DIST_CUDA=1 pip install -e .`), {CPU_HINT}") from None
    if not _C.cuda_compiled:
        raise DeviceError(f"colorize_dist._C was built without CUDA kernels and this node has "
                          f"{torch.cuda.device_count()} GPU(s); found {found}: rebuild it with the node's CUDA toolkit "
                          f"(nvcc and libcudart_static.a, e.g. after `module load cuda`: `COLORIZE_DIST_CUDA=1 pip "
                          f"install -e .`), {CPU_HINT}")
    runtime = getattr(_C, "cuda_runtime_version", 0)
    return runtime // 1000 if runtime else None


def _no_gpu_fix(driver: int | None) -> str:
    if torch.version.cuda is None:
        return "install a CUDA build of torch for this driver"
    if driver is None:
        return "run on a GPU node, or load the node's NVIDIA driver (its module)"
    torch_major = int(torch.version.cuda.split(".")[0])
    if driver // 1000 < torch_major:
        return (f"torch's CUDA {torch.version.cuda} needs a driver ≥ {MIN_DRIVER.get(torch_major, '?')}: install "
                f"torch built for CUDA {driver // 1000}.x, or update the driver")
    return "check CUDA_VISIBLE_DEVICES and `nvidia-smi` on this node"
