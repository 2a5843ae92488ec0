"""RGB ↔ CIELAB on torch tensors: our C++/CUDA kernels (`colorize_dist._C`) and a PyTorch reference.

The kernels are the fast path (CPU tensors → OpenMP kernels, CUDA tensors → CUDA kernels on the
current stream); `impl="ref"` selects the pure-PyTorch reference, which the tests compare the kernels
against and which is differentiable (the perceptual loss converts predictions to RGB through it).
There is no silent fallback: a missing kernel raises `KernelUnavailableError` saying how to rebuild.

Model normalisation (as pix2pix's colorization mode): l = L/50 − 1 ∈ [−1, 1], ab = (a, b)/110. It is written
here only (`normalise_l`, `normalise_ab`, `normalise_lab`, `denormalise_ab`, `denormalise_lab`, and the kernels'
constants); data, models and evaluation call these.
"""

from __future__ import annotations

from typing import Literal

import torch

from colorize_dist.errors import UserError

Impl = Literal["kernel", "ref"]

L_SCALE = 1.0 / 50.0
L_SHIFT = -1.0
AB_SCALE = 1.0 / 110.0

_OUT_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_REBUILD_HINT = "rebuild with `pip install -e .` (CUDA_HOME/nvcc visible for the CUDA kernels), or pass impl='ref'"


class KernelUnavailableError(UserError, RuntimeError):
    """The compiled kernel for the requested device is not built."""


def rgb_to_lab(rgb: torch.Tensor, *, impl: Impl = "kernel", num_threads: int | None = None,
               out: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 RGB (N, H, W, 3) → float32 CIELAB (N, 3, H, W): L in 0..100, a and b about −128..127.

    `out`, if given, is written in place: hot loops reuse their buffers instead of faulting in new pages.
    """
    _check_rgb(rgb)
    _check_impl(impl)
    n, h, w, _ = rgb.shape
    if impl == "ref":
        return _ref_rgb_to_lab(rgb) if out is None else out.copy_(_ref_rgb_to_lab(rgb))
    lab = _output(out, "out", (n, 3, h, w), torch.float32, rgb.device)
    _launch_rgb_to_lab(rgb, lab, lab[:, 1:], 3 * h * w, 3 * h * w, 1.0, 0.0, 1.0, torch.float32, num_threads)
    return lab


def rgb_to_l_ab(rgb: torch.Tensor, *, dtype: torch.dtype = torch.float32, impl: Impl = "kernel",
                num_threads: int | None = None,
                out: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 RGB (N, H, W, 3) → the model's input l (N, 1, H, W) and target ab (N, 2, H, W), in one pass.

    `out=(l, ab)`, if given, is written in place.
    """
    _check_rgb(rgb)
    _check_impl(impl)
    if dtype not in _OUT_DTYPE_CODES:
        raise TypeError(f"rgb_to_l_ab: dtype must be float32, bfloat16 or float16, got {dtype}")
    n, h, w, _ = rgb.shape
    out_l, out_ab = (None, None) if out is None else out
    l = _output(out_l, "out[0]", (n, 1, h, w), dtype, rgb.device)
    ab = _output(out_ab, "out[1]", (n, 2, h, w), dtype, rgb.device)
    if impl == "ref":
        lab = _ref_rgb_to_lab(rgb)
        normalised = normalise_lab(lab)
        return l.copy_(normalised[:, :1]), ab.copy_(normalised[:, 1:])
    _launch_rgb_to_lab(rgb, l, ab, h * w, 2 * h * w, L_SCALE, L_SHIFT, AB_SCALE, dtype, num_threads)
    return l, ab


def lab_to_rgb(lab: torch.Tensor, *, dtype: torch.dtype = torch.float32, impl: Impl = "kernel",
               num_threads: int | None = None) -> torch.Tensor:
    """float32 CIELAB (N, 3, H, W) → RGB (N, 3, H, W), float32 in [0, 1] or uint8; out of gamut is clipped.

    With impl="ref" and float32 output it is differentiable.
    """
    _check_tensor(lab, "lab", torch.float32)
    _check_impl(impl)
    if lab.dim() != 4 or lab.shape[1] != 3:
        raise ValueError(f"lab must have shape (N, 3, H, W), got {tuple(lab.shape)}")
    if dtype not in (torch.float32, torch.uint8):
        raise TypeError(f"lab_to_rgb: dtype must be float32 or uint8, got {dtype}")
    if impl == "ref":
        rgb = _ref_lab_to_rgb(lab)
        return rgb if dtype == torch.float32 else (rgb * 255.0).round().to(torch.uint8)
    rgb = torch.empty(lab.shape, dtype=dtype, device=lab.device)
    if lab.numel() == 0:
        return rgb
    n, _, h, w = lab.shape
    ext = _extension(lab.device)
    out_uint8 = dtype == torch.uint8
    if lab.device.type == "cuda":
        ext.lab_to_rgb_cuda(lab.data_ptr(), n, h, w, rgb.data_ptr(), out_uint8, *_cuda_stream(lab.device))
    else:
        ext.lab_to_rgb_cpu(lab.data_ptr(), n, h, w, rgb.data_ptr(), out_uint8, _threads(num_threads))
    return rgb


def normalise_l(lightness: torch.Tensor) -> torch.Tensor:
    """CIELAB L in [0, 100] → the model's l in [−1, 1]."""
    return lightness * L_SCALE + L_SHIFT


def normalise_ab(ab: torch.Tensor) -> torch.Tensor:
    """CIELAB a and b (about [−110, 110]) → the model's ab."""
    return ab * AB_SCALE


def normalise_lab(lab: torch.Tensor) -> torch.Tensor:
    """CIELAB (N, 3, H, W) → the model's normalisation, every channel in about [−1, 1]."""
    return torch.cat([normalise_l(lab[:, :1]), normalise_ab(lab[:, 1:])], dim=1)


def denormalise_ab(ab: torch.Tensor) -> torch.Tensor:
    """The model's ab → CIELAB a and b (about [−110, 110])."""
    return ab / AB_SCALE


def denormalise_lab(lab: torch.Tensor, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The model's normalised Lab (N, 3, H, W) → CIELAB (L in [0, 100], a and b in about [−110, 110]) in `dtype`
    (float64 by default, for metrics; the losses take float32). Differentiable."""
    lab = lab.to(dtype)
    return torch.cat([(lab[:, :1] - L_SHIFT) / L_SCALE, denormalise_ab(lab[:, 1:])], dim=1)


def l_ab_to_lab(l: torch.Tensor, ab: torch.Tensor) -> torch.Tensor:
    """Undo the model normalisation: (l, ab) → float32 CIELAB (N, 3, H, W). Differentiable."""
    return denormalise_lab(torch.cat([l.float(), ab.float()], dim=1), torch.float32)


# --- kernels -------------------------------------------------------------------------------------------


def _launch_rgb_to_lab(rgb, l, ab, l_stride, ab_stride, l_scale, l_shift, ab_scale, dtype, num_threads):
    if rgb.numel() == 0:
        return
    n, h, w, _ = rgb.shape
    ext = _extension(rgb.device)
    args = (rgb.data_ptr(), n, h, w, l.data_ptr(), ab.data_ptr(), l_stride, ab_stride,
            l_scale, l_shift, ab_scale, _OUT_DTYPE_CODES[dtype])
    if rgb.device.type == "cuda":
        ext.rgb_to_lab_cuda(*args, *_cuda_stream(rgb.device))
    else:
        ext.rgb_to_lab_cpu(*args, _threads(num_threads))


def _extension(device: torch.device):
    try:
        from colorize_dist import _C
    except ImportError as exc:
        raise KernelUnavailableError(f"colorize_dist._C is not built ({exc}); {_REBUILD_HINT}") from None
    if device.type == "cuda":
        if not _C.cuda_compiled:
            raise KernelUnavailableError(f"colorize_dist._C was built without CUDA kernels; {_REBUILD_HINT}")
        _check_cuda_arch(_C.cuda_archs, device)
    return _C


def _check_cuda_arch(archs: tuple[int, ...], device: torch.device) -> None:
    """Raises before launch on a GPU the build has no code for, instead of CUDA's "no kernel image" later.

    SASS for sm_XY runs on sm_XZ with Z ≥ Y; the PTX of the highest arch runs on anything newer.
    """
    major, minor = torch.cuda.get_device_capability(device)
    cc = 10 * major + minor
    if cc >= max(archs) or any(a // 10 == major and a <= cc for a in archs):
        return
    toolkit = " (CUDA 13 dropped sm_70 and older: use CUDA 12.x)" if cc < 75 else ""
    raise KernelUnavailableError(
        f"colorize_dist._C has CUDA kernels for {', '.join(f'sm_{a}' for a in archs)} and, through PTX, newer "
        f"GPUs; {torch.cuda.get_device_name(device)} ({device}) is sm_{cc}. Rebuild with "
        f"`COLORIZE_DIST_CUDA_ARCHS={cc} pip install -e .` and a CUDA toolkit that supports sm_{cc}{toolkit}, "
        "or pass impl='ref'")


def _cuda_stream(device: torch.device) -> tuple[int, int]:
    index = device.index if device.index is not None else torch.cuda.current_device()
    return index, torch.cuda.current_stream(index).cuda_stream


def _threads(num_threads: int | None) -> int:
    return torch.get_num_threads() if num_threads is None else num_threads


def _check_impl(impl: str) -> None:
    if impl not in ("kernel", "ref"):
        raise ValueError(f"impl must be 'kernel' or 'ref', got {impl!r}")


def _check_tensor(x: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype != dtype:
        raise TypeError(f"{name} must be {dtype}, got {x.dtype}")
    if x.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} must be on a CPU or CUDA device, got {x.device}")
    if not x.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first)")


def _output(out: torch.Tensor | None, name: str, shape: tuple[int, ...], dtype: torch.dtype,
            device: torch.device) -> torch.Tensor:
    if out is None:
        return torch.empty(shape, dtype=dtype, device=device)
    _check_tensor(out, name, dtype)
    if tuple(out.shape) != shape or out.device != device:
        raise ValueError(f"{name} must have shape {shape} on {device}, got {tuple(out.shape)} on {out.device}")
    return out


def _check_rgb(rgb: torch.Tensor) -> None:
    _check_tensor(rgb, "rgb", torch.uint8)
    if rgb.dim() != 4 or rgb.shape[-1] != 3:
        raise ValueError(f"rgb must have shape (N, H, W, 3), got {tuple(rgb.shape)}")


# --- reference ---------------------------------------------------------------------------------------

# float64 constants, cast to each input's device and dtype; the inverse is taken once, in float64, as skimage does.
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)[:, None, None]
_XYZ_FROM_RGB = torch.tensor([
    [0.412453, 0.357580, 0.180423],
    [0.212671, 0.715160, 0.072169],
    [0.019334, 0.119193, 0.950227],
], dtype=torch.float64)
_RGB_FROM_XYZ = torch.linalg.inv(_XYZ_FROM_RGB)
_LAB_EPSILON = (6.0 / 29.0) ** 3
_LAB_SLOPE = 841.0 / 108.0
_LAB_OFFSET = 4.0 / 29.0


def _ref_rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    c = rgb.permute(0, 3, 1, 2).float() / 255.0
    linear = torch.where(c <= 0.04045, c / 12.92, ((c.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    xyz = torch.einsum("ij,njhw->nihw", _XYZ_FROM_RGB.to(linear), linear) / _WHITE_D65.to(linear)
    f = torch.where(xyz > _LAB_EPSILON, xyz.clamp_min(_LAB_EPSILON) ** (1.0 / 3.0), _LAB_SLOPE * xyz + _LAB_OFFSET)
    fx, fy, fz = f.unbind(1)
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_linear_rgb(lab: torch.Tensor) -> torch.Tensor:
    """float CIELAB (N, 3, H, W) → linear sRGB, unclipped: values outside [0, 1] are out of the sRGB gamut.

    Pure PyTorch and differentiable; `lab_to_rgb(impl="ref")` is this, clipped and companded.
    """
    L, a, b = lab.unbind(1)
    fy = (L + 16.0) / 116.0
    f = torch.stack([fy + a / 500.0, fy, (fy - b / 200.0).clamp_min(0.0)], dim=1)  # as skimage
    delta = 6.0 / 29.0
    xyz = torch.where(f > delta, f.clamp_min(delta) ** 3, (f - _LAB_OFFSET) / _LAB_SLOPE)
    xyz = xyz * _WHITE_D65.to(lab)
    return torch.einsum("ij,njhw->nihw", _RGB_FROM_XYZ.to(lab), xyz)


def _ref_lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    linear = lab_to_linear_rgb(lab).clamp(0.0, 1.0)
    return torch.where(linear <= 0.0031308, 12.92 * linear,
                       1.055 * linear.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055)
