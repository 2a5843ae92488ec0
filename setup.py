"""Builds `colorize_dist._C`: the RGB↔Lab kernels, CPU always, CUDA when nvcc is found.

The extension takes raw pointers and a stream handle, never torch tensors, so it does not link
against libtorch and works with whatever torch is installed. CUDA code is linked with the static
runtime, so the module imports on machines without a driver.

Environment:
  COLORIZE_DIST_CUDA=auto|1|0   build the CUDA kernels if nvcc is found (auto), always (1), never (0).
  COLORIZE_DIST_CUDA_ARCHS      compute capabilities to build SASS for, e.g. "75;80;86;89;90" (or "7.5 8.0");
                                default DEFAULT_CUDA_ARCHS, less those the installed nvcc cannot build
                                (CUDA 13 dropped sm_70). An explicit list must be fully supported.
                                PTX of the highest is always added, so newer GPUs run it through the driver's JIT.
  CUDA_HOME                     where to find nvcc and libcudart_static (default: nvcc on PATH).
"""

import os
import re
import shutil
import subprocess
from pathlib import Path

from setuptools import find_packages, setup
from setuptools.command.build_ext import build_ext

# V100, T4, A100, RTX 30xx/A10, RTX 40xx/L4/L40, H100/H200.
DEFAULT_CUDA_ARCHS = "70;75;80;86;89;90"
DEFAULT_CUDA_HOME = "/usr/local/cuda"


def find_cuda_home() -> Path | None:
    mode = os.environ.get("COLORIZE_DIST_CUDA", "auto").lower()
    if mode not in {"auto", "1", "0"}:
        raise SystemExit(f"COLORIZE_DIST_CUDA must be auto, 1 or 0, got {mode!r}")
    if mode == "0":
        return None
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), DEFAULT_CUDA_HOME]
    if shutil.which("nvcc"):  # nvcc on PATH may be a wrapper script: its real toolkit comes first
        candidates.insert(2, str(Path(shutil.which("nvcc")).resolve().parent.parent))
    for home in (Path(c) for c in candidates if c):
        if (home / "bin" / "nvcc").exists() and cuda_lib_dir(home) is not None:
            return home
    if mode == "1":
        found = "; ".join(describe_toolkit(Path(c)) for c in dict.fromkeys(c for c in candidates if c))
        raise SystemExit(f"COLORIZE_DIST_CUDA=1 but the CUDA kernels cannot be built: no toolkit with both nvcc and "
                         f"libcudart_static.a ({found}); set CUDA_HOME to the node's CUDA toolkit (e.g. after "
                         "`module load cuda`), or build without them: COLORIZE_DIST_CUDA=0")
    return None


def describe_toolkit(home: Path) -> str:
    """What a candidate CUDA home holds, for the error that names why none would do."""
    nvcc = home / "bin" / "nvcc"
    if not nvcc.exists():
        return f"{home}: no nvcc"
    try:
        release = re.search(r"release ([\d.]+)", subprocess.run([str(nvcc), "--version"], capture_output=True,
                                                                text=True, timeout=60).stdout)
    except (OSError, subprocess.SubprocessError):
        release = None
    version = f"nvcc {release.group(1)}" if release else "nvcc"
    return f"{home}: {version}" + ("" if cuda_lib_dir(home) else " without libcudart_static.a")


def cuda_lib_dir(cuda_home: Path) -> Path | None:
    for sub in ("lib64", "lib", "targets/x86_64-linux/lib"):
        if (cuda_home / sub / "libcudart_static.a").exists():
            return cuda_home / sub
    return None


def parse_cuda_archs(spec: str) -> list[int]:
    """Reads "75;80", "75,80" or "7.5 8.0" as [75, 80]: the forms CMake and TORCH_CUDA_ARCH_LIST users type."""
    archs = set()
    for token in re.split(r"[;,\s]+", spec.strip()):
        if not re.fullmatch(r"\d+|\d+\.\d", token):
            raise SystemExit(f"COLORIZE_DIST_CUDA_ARCHS: expected compute capabilities like '75;80' or '7.5 8.0', "
                             f"got {spec!r}")
        archs.add(int(token.replace(".", "")))
    return sorted(archs)


def nvcc_gpu_codes(cuda_home: Path) -> set[int]:
    """The SASS targets this nvcc can build (sm_XX; arch-specific sm_90a etc. are not ours)."""
    listing = subprocess.run([str(cuda_home / "bin" / "nvcc"), "--list-gpu-code"], check=True,
                             capture_output=True, text=True).stdout
    return {int(code) for code in re.findall(r"^sm_(\d+)$", listing, flags=re.MULTILINE)}


def select_cuda_archs(spec: str | None, supported: set[int]) -> list[int]:
    """The archs to build: the default list cut to what nvcc supports; an explicit list must be supported whole."""
    requested = parse_cuda_archs(DEFAULT_CUDA_ARCHS if spec is None else spec)
    unsupported = [a for a in requested if a not in supported]
    if spec is not None and unsupported:
        raise SystemExit(f"COLORIZE_DIST_CUDA_ARCHS={spec!r}: this nvcc cannot build "
                         f"{', '.join(f'sm_{a}' for a in unsupported)} (it supports "
                         f"{', '.join(f'sm_{a}' for a in sorted(supported))}); CUDA 13 dropped sm_70 and older, "
                         "build those with CUDA 12.x")
    archs = [a for a in requested if a in supported]
    if not archs:
        raise SystemExit(f"nvcc supports none of the CUDA archs {requested} (it supports {sorted(supported)}); "
                         "set COLORIZE_DIST_CUDA_ARCHS")
    return archs


def cuda_arch_flags(archs: list[int]) -> list[str]:
    """SASS for each arch, plus PTX of the highest, which the driver JIT-compiles on newer GPUs."""
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return [*flags, f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


class BuildExtWithCuda(build_ext):
    def build_extensions(self):
        from pybind11.setup_helpers import has_flag

        ext = self.extensions[0]
        if has_flag(self.compiler, "-fopenmp"):
            ext.extra_compile_args.append("-fopenmp")
            ext.extra_link_args.append("-fopenmp")
        cuda_home = find_cuda_home()
        if cuda_home is None:
            print("colorize_dist._C: CUDA kernels OFF")
        else:
            archs = select_cuda_archs(os.environ.get("COLORIZE_DIST_CUDA_ARCHS"), nvcc_gpu_codes(cuda_home))
            print(f"colorize_dist._C: CUDA kernels ON ({cuda_home}), SASS for "
                  f"{', '.join(f'sm_{a}' for a in archs)}, PTX for compute_{archs[-1]}")
            ext.extra_objects.append(self.compile_cuda(cuda_home, Path("csrc/color_cuda.cu"), archs))
            ext.define_macros += [("COLORIZE_DIST_WITH_CUDA", "1"),
                                  ("COLORIZE_DIST_CUDA_ARCHS", ",".join(map(str, archs)))]
            ext.include_dirs.append(str(cuda_home / "include"))
            ext.library_dirs.append(str(cuda_lib_dir(cuda_home)))
            ext.libraries += ["cudart_static", "rt", "pthread", "dl"]
        super().build_extensions()

    def compile_cuda(self, cuda_home: Path, source: Path, archs: list[int]) -> str:
        out = Path(self.build_temp) / (source.stem + ".o")
        out.parent.mkdir(parents=True, exist_ok=True)
        cmd = [
            str(cuda_home / "bin" / "nvcc"), "-c", str(source), "-o", str(out), "-O3", "-std=c++17",
            "-Xcompiler", "-fPIC", "-Icsrc", "--threads", "0", *cuda_arch_flags(archs),  # one thread per arch
        ]
        print(" ".join(cmd))
        subprocess.run(cmd, check=True)
        return str(out)


if __name__ == "__main__":  # setuptools runs this file as __main__; tests import the helpers above
    from pybind11.setup_helpers import Pybind11Extension

    setup(
        # The presets in the checkout's configs/ ship inside the package, as colorize_dist/configs.
        packages=[*find_packages(include=["colorize_dist", "colorize_dist.*"]), "colorize_dist.configs"],
        package_dir={"colorize_dist.configs": "configs"},
        package_data={"colorize_dist.configs": ["*.yaml", "*/*.yaml"]},
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
