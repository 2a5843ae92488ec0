"""Builds `colorize_dist._C`: the RGB↔Lab kernels, CPU always, CUDA when nvcc is found.

The extension takes raw pointers and a stream handle, never torch tensors, so it does not link
against libtorch and works with whatever torch is installed. CUDA code is linked with the static
runtime, so the module imports on machines without a driver.

Environment:
  COLORIZE_DIST_CUDA=auto|1|0   build the CUDA kernels if nvcc is found (auto), always (1), never (0).
  CUDA_HOME                     where to find nvcc and libcudart_static (default: nvcc on PATH).
"""

import os
import shutil
import subprocess
from pathlib import Path

from pybind11.setup_helpers import Pybind11Extension, build_ext, has_flag
from setuptools import setup

CUDA_ARCH_FLAGS = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90,code=sm_90",
    "-gencode=arch=compute_90,code=compute_90",  # PTX, JIT-compiled on newer GPUs
]


def find_cuda_home() -> Path | None:
    mode = os.environ.get("COLORIZE_DIST_CUDA", "auto").lower()
    if mode not in {"auto", "1", "0"}:
        raise SystemExit(f"COLORIZE_DIST_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    if shutil.which("nvcc"):  # nvcc on PATH may be a wrapper script: its real toolkit comes first
        candidates.insert(2, str(Path(shutil.which("nvcc")).resolve().parent.parent))
    for home in (Path(c) for c in candidates if c):
        if (home / "bin" / "nvcc").exists() and cuda_lib_dir(home) is not None:
            return home
    if mode == "1":
        raise SystemExit(f"COLORIZE_DIST_CUDA=1 but no CUDA toolkit (nvcc + libcudart_static.a) in {candidates}")
    return None


def cuda_lib_dir(cuda_home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (cuda_home / sub / "libcudart_static.a").exists():
            return cuda_home / sub
    return None


class BuildExtWithCuda(build_ext):
    def build_extensions(self):
        ext = self.extensions[0]
        if has_flag(self.compiler, "-fopenmp"):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        cuda_home = find_cuda_home()
        if cuda_home is not None:
            ext.extra_objects.append(self.compile_cuda(cuda_home, Path("csrc/color_cuda.cu")))
            ext.define_macros.append(("COLORIZE_DIST_WITH_CUDA", "1"))
            ext.include_dirs.append(str(cuda_home / "include"))
            ext.library_dirs.append(str(cuda_lib_dir(cuda_home)))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        print(f"colorize_dist._C: CUDA kernels {'ON (' + str(cuda_home) + ')' if cuda_home else 'OFF'}")
        super().build_extensions()

    def compile_cuda(self, cuda_home: Path, source: Path) -> str:
        out = Path(self.build_temp) / (source.stem + ".o")
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(out),
            "-O3", "-std=c++17", "-Xcompiler", "-fPIC", "-Icsrc", *CUDA_ARCH_FLAGS,
        ]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        return str(out)


setup(
    ext_modules=[
        Pybind11Extension(
            "colorize_dist._C",
            ["csrc/bindings.cpp", "csrc/color_cpu.cpp"],
            include_dirs=["csrc"],
            cxx_std=17,
            # No FP traps: lets the compiler turn the piecewise colour math into vector selects.
            extra_compile_args=["-O3", "-fno-trapping-math"],
        )
    ],
    cmdclass={"build_ext": BuildExtWithCuda},
)
