"""colorize_dist.color: kernels against the PyTorch reference and skimage, on every uint8 colour."""

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from skimage.color import lab2rgb, rgb2lab

from colorize_dist import color

IMPLS = ["kernel", "ref"]
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device on this machine")


@pytest.fixture(scope="module")
def all_colours() -> torch.Tensor:
    """Every 24-bit RGB colour once, as a (1, 4096, 4096, 3) uint8 image."""
    v = torch.arange(2**24, dtype=torch.int32)
    rgb = torch.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], dim=-1).to(torch.uint8)
    return rgb.reshape(1, 4096, 4096, 3)


@pytest.fixture(scope="module")
def skimage_lab(all_colours) -> torch.Tensor:
    return torch.from_numpy(rgb2lab(all_colours[0].numpy())).permute(2, 0, 1)[None].float()


def random_rgb(n=3, h=37, w=53, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, h, w, 3), dtype=torch.uint8, generator=g)


@pytest.mark.parametrize("impl", IMPLS)
def test_rgb_to_lab_matches_skimage_on_every_colour(all_colours, skimage_lab, impl):
    lab = color.rgb_to_lab(all_colours, impl=impl)
    assert lab.shape == (1, 3, 4096, 4096) and lab.dtype == torch.float32
    assert (lab - skimage_lab).abs().max().item() <= 1e-3


@pytest.mark.parametrize("impl", IMPLS)
def test_lab_to_rgb_inverts_every_colour_exactly(all_colours, impl):
    lab = color.rgb_to_lab(all_colours, impl=impl)
    back = color.lab_to_rgb(lab, dtype=torch.uint8, impl=impl)
    assert torch.equal(back, all_colours.permute(0, 3, 1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fused_variant_is_the_normalised_lab(all_colours, dtype):
    lab = color.rgb_to_lab(all_colours)
    l_f32, ab_f32 = color.rgb_to_l_ab(all_colours, dtype=torch.float32)
    torch.testing.assert_close(l_f32, lab[:, :1] * color.L_SCALE + color.L_SHIFT, rtol=0, atol=2e-6)
    torch.testing.assert_close(ab_f32, lab[:, 1:] * color.AB_SCALE, rtol=0, atol=2e-6)
    l, ab = color.rgb_to_l_ab(all_colours, dtype=dtype)
    assert l.shape == (1, 1, 4096, 4096) and ab.shape == (1, 2, 4096, 4096)
    assert l.dtype == ab.dtype == dtype
    # Our float -> bf16/fp16 rounding (subnormals included) must be torch's, bit for bit.
    assert torch.equal(l, l_f32.to(dtype)) and torch.equal(ab, ab_f32.to(dtype))
    assert l.min().item() >= -1.0 and l.max().item() <= 1.0 and ab.abs().max().item() < 1.0


def test_fused_reference_matches_kernel():
    rgb = random_rgb()
    for got, want in zip(color.rgb_to_l_ab(rgb), color.rgb_to_l_ab(rgb, impl="ref"), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.filterwarnings("ignore:Conversion from CIE-LAB")  # skimage's note on out-of-gamut inputs
def test_lab_to_rgb_matches_skimage_and_clips_out_of_gamut(impl):
    g = torch.Generator().manual_seed(1)
    lab = torch.rand(2, 3, 31, 29, generator=g) * torch.tensor([100.0, 256.0, 256.0])[:, None, None]
    lab[:, 1:] -= 128.0
    rgb = color.lab_to_rgb(lab, impl=impl)
    want = np.stack([lab2rgb(x.permute(1, 2, 0).numpy().astype(np.float64)) for x in lab])
    want = torch.from_numpy(want).permute(0, 3, 1, 2).float()
    assert rgb.min().item() >= 0.0 and rgb.max().item() <= 1.0
    torch.testing.assert_close(rgb, want, rtol=0, atol=1e-4)


def test_out_buffers_are_written_in_place():
    rgb = random_rgb()
    lab = torch.full((3, 3, 37, 53), float("nan"))
    assert color.rgb_to_lab(rgb, out=lab) is lab
    torch.testing.assert_close(lab, color.rgb_to_lab(rgb), rtol=0, atol=0)
    l, ab = torch.full((3, 1, 37, 53), float("nan")), torch.full((3, 2, 37, 53), float("nan"))
    assert color.rgb_to_l_ab(rgb, out=(l, ab))[1] is ab
    assert torch.equal(ab, color.rgb_to_l_ab(rgb)[1]) and not l.isnan().any()


def test_thread_count_does_not_change_results():
    rgb = random_rgb(n=2, h=64, w=300)
    assert torch.equal(color.rgb_to_lab(rgb, num_threads=1), color.rgb_to_lab(rgb, num_threads=2))
    lab = color.rgb_to_lab(rgb)
    assert torch.equal(color.lab_to_rgb(lab, num_threads=1), color.lab_to_rgb(lab, num_threads=2))


def test_empty_batch():
    rgb = torch.empty(0, 8, 8, 3, dtype=torch.uint8)
    assert color.rgb_to_lab(rgb).shape == (0, 3, 8, 8)
    assert color.lab_to_rgb(torch.empty(0, 3, 8, 8)).shape == (0, 3, 8, 8)


def test_reference_lab_to_rgb_is_differentiable():
    # In-gamut points, black and white included (where a naive pow has an infinite derivative).
    lab = torch.tensor([[0.0, 0.0, 0.0], [100.0, 0.0, 0.0], [50.0, 20.0, -30.0], [70.0, -10.0, 40.0]])
    lab = lab.T.reshape(1, 3, 2, 2).contiguous().requires_grad_(True)
    weights = torch.randn(1, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    (color.lab_to_rgb(lab, impl="ref") * weights).sum().backward()
    assert torch.isfinite(lab.grad).all()
    # Central differences in float64 through the same function.
    numeric = torch.zeros_like(lab)
    for idx in np.ndindex(*lab.shape):
        if lab[idx] == 0.0 or lab[idx] == 100.0:
            continue  # one-sided at the gamut edge
        step = torch.zeros_like(lab)
        step[idx] = 1e-2
        with torch.no_grad():
            plus = (color.lab_to_rgb(lab + step, impl="ref") * weights).sum()
            minus = (color.lab_to_rgb(lab - step, impl="ref") * weights).sum()
        numeric[idx] = (plus - minus) / 2e-2
    mask = numeric != 0
    torch.testing.assert_close(lab.grad[mask], numeric[mask], rtol=2e-2, atol=1e-4)


def test_l_ab_to_lab_undoes_the_normalisation():
    rgb = random_rgb()
    torch.testing.assert_close(color.l_ab_to_lab(*color.rgb_to_l_ab(rgb)), color.rgb_to_lab(rgb), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: color.rgb_to_lab(torch.zeros(1, 4, 4, 3)), TypeError, "rgb must be torch.uint8"),
        (lambda: color.rgb_to_lab(np.zeros((1, 4, 4, 3), np.uint8)), TypeError, "must be a torch.Tensor"),
        (lambda: color.rgb_to_lab(torch.zeros(4, 4, 3, dtype=torch.uint8)), ValueError, r"\(N, H, W, 3\)"),
        (lambda: color.rgb_to_lab(torch.zeros(1, 3, 4, 4, dtype=torch.uint8)), ValueError, r"\(N, H, W, 3\)"),
        (lambda: color.rgb_to_lab(torch.zeros(1, 4, 8, 3, dtype=torch.uint8)[:, :, ::2]), ValueError, "contiguous"),
        (lambda: color.rgb_to_lab(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), impl="fast"), ValueError, "impl"),
        (lambda: color.rgb_to_l_ab(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), dtype=torch.float64), TypeError,
         "float32, bfloat16 or float16"),
        (lambda: color.rgb_to_lab(torch.zeros(1, 4, 4, 3, dtype=torch.uint8), out=torch.zeros(1, 3, 4, 5)),
         ValueError, "shape"),
        (lambda: color.lab_to_rgb(torch.zeros(1, 3, 4, 4, dtype=torch.float64)), TypeError, "float32"),
        (lambda: color.lab_to_rgb(torch.zeros(1, 2, 4, 4)), ValueError, r"\(N, 3, H, W\)"),
        (lambda: color.lab_to_rgb(torch.zeros(1, 3, 4, 4), dtype=torch.float16), TypeError, "float32 or uint8"),
        (lambda: color.rgb_to_lab(torch.zeros(1, 4, 4, 3, dtype=torch.uint8, device="meta")), ValueError, "device"),
    ],
)
def test_bad_inputs_raise_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_missing_extension_says_how_to_rebuild(monkeypatch):
    import colorize_dist

    monkeypatch.delattr(colorize_dist, "_C", raising=False)
    monkeypatch.setitem(sys.modules, "colorize_dist._C", None)  # makes `from colorize_dist import _C` fail
    with pytest.raises(color.KernelUnavailableError, match=r"pip install -e \.|impl='ref'"):
        color.rgb_to_lab(random_rgb())
    color.rgb_to_lab(random_rgb(), impl="ref")  # the reference needs no extension


@pytest.fixture(scope="module")
def setup_py():
    """The build script's helpers; its setup() call only runs when setuptools runs it as __main__."""
    spec = importlib.util.spec_from_file_location("colorize_dist_setup", Path(__file__).parents[1] / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(
    shutil.which("nvcc") is None or os.environ.get("COLORIZE_DIST_CUDA") == "0",
    reason="nvcc not found: the CUDA kernels are not expected to be built",
)
def test_cuda_kernels_are_compiled_when_nvcc_is_present(setup_py):
    from colorize_dist import _C

    assert _C.cuda_compiled, "nvcc is on PATH but colorize_dist._C was built without its CUDA kernels"
    assert hasattr(_C, "rgb_to_lab_cuda") and hasattr(_C, "lab_to_rgb_cuda")
    supported = setup_py.nvcc_gpu_codes(setup_py.find_cuda_home())
    want = setup_py.select_cuda_archs(os.environ.get("COLORIZE_DIST_CUDA_ARCHS"), supported)
    assert _C.cuda_archs == tuple(want)
    if os.environ.get("COLORIZE_DIST_CUDA_ARCHS") is None:
        assert 75 in _C.cuda_archs and (70 in _C.cuda_archs) == (70 in supported)  # T4; V100 where nvcc can


def test_cuda_arch_list_parsing(setup_py):
    assert setup_py.parse_cuda_archs("75;80;86;89;90") == [75, 80, 86, 89, 90]
    assert setup_py.parse_cuda_archs(" 9.0, 7.5 8.0;8.0 ") == [75, 80, 90]
    assert setup_py.parse_cuda_archs(setup_py.DEFAULT_CUDA_ARCHS)[:2] == [70, 75]  # V100, T4
    for bad in ["", "sm_75", "7.5+PTX", "75;;abc"]:
        with pytest.raises(SystemExit, match="COLORIZE_DIST_CUDA_ARCHS"):
            setup_py.parse_cuda_archs(bad)


def test_cuda_archs_are_cut_to_what_nvcc_supports(setup_py):
    cuda13 = {75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121}
    cuda12 = cuda13 | {50, 52, 53, 60, 61, 62, 70, 72}
    assert setup_py.select_cuda_archs(None, cuda13) == [75, 80, 86, 89, 90]  # the default, less sm_70
    assert setup_py.select_cuda_archs(None, cuda12) == [70, 75, 80, 86, 89, 90]
    assert setup_py.select_cuda_archs("90;80", cuda13) == [80, 90]
    with pytest.raises(SystemExit, match=r"cannot build sm_70 .*CUDA 12"):  # asked for explicitly: fail, don't drop
        setup_py.select_cuda_archs("70;80", cuda13)
    with pytest.raises(SystemExit, match="supports none"):
        setup_py.select_cuda_archs(None, {100, 120})
    assert setup_py.cuda_arch_flags([75, 90]) == [
        "-gencode=arch=compute_75,code=sm_75",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",  # PTX of the highest, for newer GPUs
    ]


@pytest.mark.parametrize(
    ("capability", "runs"),
    [((7, 5), True), ((8, 0), True), ((8, 7), True), ((9, 0), True), ((10, 0), True), ((12, 0), True),
     ((7, 0), False), ((7, 2), False), ((6, 1), False)],
)
def test_unsupported_gpu_raises_naming_the_archs(monkeypatch, capability, runs):
    import colorize_dist

    # A build for the default archs under CUDA 13, on a GPU of `capability` (sm_87 runs sm_86 SASS, sm_100 the PTX).
    monkeypatch.setattr(colorize_dist, "_C", SimpleNamespace(cuda_compiled=True, cuda_archs=(75, 80, 86, 89, 90)),
                        raising=False)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device: "Tesla V100-SXM2-16GB")
    device = torch.device("cuda", 0)
    if runs:
        assert color._extension(device) is colorize_dist._C
        return
    cc = 10 * capability[0] + capability[1]
    message = rf"sm_75, sm_80, sm_86, sm_89, sm_90 .*is sm_{cc}\. .*COLORIZE_DIST_CUDA_ARCHS={cc} .*CUDA 12\.x"
    with pytest.raises(color.KernelUnavailableError, match=message):
        color._extension(device)


@cuda
@pytest.mark.parametrize("shape", [(4, 256, 256), (3, 37, 53), (1, 1, 1)])  # vectorized and per-pixel paths
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_cuda_kernels_match_cpu(shape, dtype):
    rgb = random_rgb(*shape, seed=2)
    rgb_gpu = rgb.cuda()
    n, h, w = shape
    lab = torch.full((n, 3, h, w), float("nan"), device="cuda")
    torch.testing.assert_close(color.rgb_to_lab(rgb_gpu, out=lab).cpu(), color.rgb_to_lab(rgb), rtol=0, atol=1e-3)
    out = (torch.full((n, 1, h, w), float("nan"), device="cuda", dtype=dtype),
           torch.full((n, 2, h, w), float("nan"), device="cuda", dtype=dtype))
    got = color.rgb_to_l_ab(rgb_gpu, dtype=dtype, out=out)
    want = color.rgb_to_l_ab(rgb, dtype=dtype)
    atol = 1e-3 if dtype == torch.float32 else 1e-2  # one ulp of bf16 near 1 is 8e-3
    for g, w_ in zip(got, want, strict=True):
        torch.testing.assert_close(g.cpu().float(), w_.float(), rtol=0, atol=atol)
    lab_cpu = color.rgb_to_lab(rgb)
    torch.testing.assert_close(color.lab_to_rgb(lab_cpu.cuda()).cpu(), color.lab_to_rgb(lab_cpu), rtol=0, atol=1e-3)
    assert torch.equal(color.lab_to_rgb(lab_cpu.cuda(), dtype=torch.uint8).cpu(), rgb.permute(0, 3, 1, 2))


def test_setup_with_cuda_required_fails_when_it_cannot_build_the_kernels(setup_py, tmp_path, monkeypatch):
    toolkit = tmp_path / "cuda-12.4"  # nvcc, but no static runtime: the kernels cannot be linked
    (toolkit / "bin").mkdir(parents=True)
    (toolkit / "bin" / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools, release 12.4, V12.4.131'\n")
    (toolkit / "bin" / "nvcc").chmod(0o755)
    monkeypatch.setattr(setup_py, "DEFAULT_CUDA_HOME", str(tmp_path / "none"))
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvcc on it
    monkeypatch.setenv("CUDA_HOME", str(toolkit))
    monkeypatch.delenv("CUDA_PATH", raising=False)
    monkeypatch.setenv("COLORIZE_DIST_CUDA", "1")
    with pytest.raises(SystemExit, match=f"cannot be built: no toolkit with both nvcc and libcudart_static.a "
                                         f"\\({toolkit}: nvcc 12.4 without libcudart_static.a; {tmp_path / 'none'}: "
                                         "no nvcc\\); set CUDA_HOME"):
        setup_py.find_cuda_home()
    monkeypatch.setenv("COLORIZE_DIST_CUDA", "auto")
    assert setup_py.find_cuda_home() is None  # auto: the CPU kernels only (a GPU node then refuses at start-up)
