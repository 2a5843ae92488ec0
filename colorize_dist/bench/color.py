"""Side-by-side RGB→Lab throughput of our kernels and the libraries a user would otherwise call.

Each library gets the same images in its own input format, converted outside the timing, so only the conversion is
timed; errors are measured against skimage.color.rgb2lab, the reference every kernel test also uses.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from colorize_dist import color
from colorize_dist.bench.timing import seconds_per_call


def random_images(size: int, megapixels: float, seed: int = 0) -> torch.Tensor:
    """Random uint8 RGB images (N, size, size, 3), N chosen so that the batch holds about `megapixels`."""
    n = max(1, round(megapixels * 1e6 / size**2))
    return torch.randint(0, 256, (n, size, size, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _skimage_lab(rgb: torch.Tensor) -> torch.Tensor:
    from skimage.color import rgb2lab

    return torch.from_numpy(np.stack([rgb2lab(x) for x in rgb.numpy()])).permute(0, 3, 1, 2).float()


def cpu_rows(rgb: torch.Tensor, min_time: float, verdicts: list[str]) -> list[list[object]]:
    import cv2
    import kornia.color

    n, size, _, _ = rgb.shape
    megapixels = n * size * size / 1e6
    rgb_np = rgb.numpy()
    rgb_f32_np = rgb_np.astype(np.float32) / 255.0
    rgb_chw = rgb.permute(0, 3, 1, 2).float().div(255.0).contiguous()
    reference = _skimage_lab(rgb)
    lab_out = torch.empty(n, 3, size, size)
    cv_f32_out, cv_u8_out = np.empty_like(rgb_f32_np[0]), np.empty_like(rgb_np[0])

    def opencv(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
        return np.stack([cv2.cvtColor(x, cv2.COLOR_RGB2Lab, dst=dst).copy() for x in src])

    # name -> (run with a thread count, its output as float32 Lab (N, 3, H, W))
    candidates: dict[str, tuple[Callable[[int], object], Callable[[object], torch.Tensor]]] = {
        "colorize_dist": (lambda t: color.rgb_to_lab(rgb, num_threads=t), lambda out: out),
        "colorize_dist out=": (lambda t: color.rgb_to_lab(rgb, num_threads=t, out=lab_out), lambda out: out),
        "colorize_dist fused bf16 (bf16 rounding)": (
            lambda t: color.rgb_to_l_ab(rgb, dtype=torch.bfloat16, num_threads=t),
            lambda out: color.l_ab_to_lab(*out)),
        "skimage rgb2lab": (lambda t: _skimage_lab(rgb), lambda out: out),
        "kornia rgb_to_lab": (lambda t: kornia.color.rgb_to_lab(rgb_chw), lambda out: out),
        "opencv float32": (lambda t: opencv(rgb_f32_np, cv_f32_out), _from_hwc),
        "opencv 8-bit": (lambda t: opencv(rgb_np, cv_u8_out), _from_opencv_8bit),
    }
    all_threads = os.cpu_count() or 1
    speeds: dict[tuple[str, int], float] = {}
    errors: dict[str, float] = {}
    for threads in sorted({1, all_threads}):
        torch.set_num_threads(threads)
        cv2.setNumThreads(threads)
        for name, (run, to_lab) in candidates.items():
            if name.startswith("skimage") and threads > 1:
                continue  # numpy code: single-threaded whatever the setting
            speeds[name, threads] = megapixels / seconds_per_call(lambda r=run, t=threads: r(t), min_time=min_time)
            errors[name] = (to_lab(run(threads)) - reference).abs().max().item()
    torch.set_num_threads(all_threads)

    skimage_speed = speeds["skimage rgb2lab", 1]
    for threads in sorted({1, all_threads}):
        ours, opencv_f32 = speeds["colorize_dist", threads], speeds["opencv float32", threads]
        verdicts.append(f"{size}², {threads} thread(s): {ours / (skimage_speed * threads):.1f}× skimage per "
                        f"thread (target ≥ 10), {ours / opencv_f32:.2f}× OpenCV float32 (target > 1)")
    return [[f"{size}²", threads, name, speed, errors[name], speed / skimage_speed]
            for (name, threads), speed in speeds.items()]


def _from_hwc(out) -> torch.Tensor:
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).permute(0, 3, 1, 2)


def _from_opencv_8bit(out) -> torch.Tensor:
    """OpenCV's 8-bit Lab is (L·255/100, a+128, b+128)."""
    lab = _from_hwc(out)
    return torch.cat([lab[:, :1] * (100.0 / 255.0), lab[:, 1:] - 128.0], dim=1)


@dataclass(frozen=True)
class GpuResult:
    """Our CUDA kernel against kornia on the GPU and a device-to-device copy of the bytes the kernel moves."""

    size: int
    batch: int
    megapixels: float  # per call
    ours_mp_s: float
    kornia_mp_s: float
    ours_gb_s: float  # bytes read (uint8 RGB) + written (float32 Lab) per second
    copy_gb_s: float  # read + written by `dst.copy_(src)` of the same total bytes
    ours_err: float  # max |Lab error| against skimage
    kornia_err: float

    @property
    def copy_fraction(self) -> float:
        return self.ours_gb_s / self.copy_gb_s

    @property
    def kornia_speedup(self) -> float:
        return self.ours_mp_s / self.kornia_mp_s


COPY_TARGET, KORNIA_TARGET = 0.8, 10.0  # GPU targets: share of copy bandwidth, speed-up over kornia


def measure_gpu(rgb: torch.Tensor, *, min_time: float = 0.5, device: torch.device | str = "cuda") -> GpuResult:
    """Times rgb_to_lab on `device` for the uint8 (N, H, W, 3) CPU batch `rgb` (see GpuResult)."""
    import kornia.color

    n, size, _, _ = rgb.shape
    megapixels = n * size * size / 1e6
    device = torch.device(device)
    rgb_gpu = rgb.to(device)
    rgb_chw_gpu = rgb_gpu.permute(0, 3, 1, 2).float().div(255.0).contiguous()
    reference = _skimage_lab(rgb)
    lab_out = torch.empty(n, 3, size, size, device=device)
    ours = seconds_per_call(lambda: color.rgb_to_lab(rgb_gpu, out=lab_out), min_time=min_time, device=device)
    kornia_s = seconds_per_call(lambda: kornia.color.rgb_to_lab(rgb_chw_gpu), min_time=min_time, device=device)
    moved = rgb_gpu.numel() + lab_out.numel() * 4  # bytes read + written by our kernel
    src = torch.empty(moved // 2, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    copy_s = seconds_per_call(lambda: dst.copy_(src), min_time=min_time, device=device)
    return GpuResult(
        size=size, batch=n, megapixels=megapixels, ours_mp_s=megapixels / ours, kornia_mp_s=megapixels / kornia_s,
        ours_gb_s=moved / ours / 1e9, copy_gb_s=2 * src.numel() / copy_s / 1e9,
        ours_err=(color.rgb_to_lab(rgb_gpu).cpu() - reference).abs().max().item(),
        kornia_err=(kornia.color.rgb_to_lab(rgb_chw_gpu).cpu() - reference).abs().max().item())


def gpu_rows(rgb: torch.Tensor, min_time: float, verdicts: list[str]) -> list[list[object]]:
    r = measure_gpu(rgb, min_time=min_time)
    verdicts.append(f"{r.size}², GPU: {r.ours_gb_s:.0f} GB/s = {r.copy_fraction:.0%} of a device copy "
                    f"({r.copy_gb_s:.0f} GB/s; target ≥ {COPY_TARGET:.0%}), {r.kornia_speedup:.1f}× kornia "
                    f"(target ≥ {KORNIA_TARGET:.0f})")
    return [[f"{r.size}²", "GPU", "colorize_dist cuda", r.ours_mp_s, r.ours_err, None],
            [f"{r.size}²", "GPU", "kornia cuda", r.kornia_mp_s, r.kornia_err, None]]
