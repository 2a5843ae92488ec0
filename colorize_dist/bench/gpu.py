"""Every GPU figure of BENCHMARKS.md in as few device calls as possible, written as BENCHMARKS.md-ready tables.

Two halves, one per machine:

  colorize-dist bench gpu --prepare .whl            # CPU machine with a package index
      Downloads the wheels the GPU machine lacks (DALI and its nvidia-* libraries, kornia, webdataset, omegaconf,
      submitit, pytorch-fid, deepspeed and what they need, for CPython 3.12 on manylinux x86_64; what the machine
      already has is GPU_MACHINE_HAS), cuts them into parts of at most --part-size MB and groups the parts into
      device calls that each stay under the carry limit (64 MiB with the working tree). .whl/plan.md lists the
      calls: which folder each carries and its exact command. Every call folder holds install.sh, which copies
      the parts out of the repository copy (--receive), then joins them, checks each wheel's SHA-256 and
      pip-installs them (no argument). The folder must be ignored by git (.gitignore has .whl/).

  python3 -m colorize_dist.bench.gpu [--stages ...]  # GPU machine (the same as `colorize-dist bench gpu`)
      Builds the extension for this GPU (setup.py build_ext --inplace), then runs the stages, each in its own
      process group under its own time budget; a stage that fails or runs out of time is recorded and the next
      one runs; SIGTERM ends the running stage's processes and keeps the report. After every stage it rewrites
      report.md (markdown tables), results.json and log.txt in --out (default: $OUT, else ./bench-gpu), so a call
      cut off at its limit still brings back what was done.

Stages (the device-call groups of plan.md: `tests,color,data,train256,memory`, then `train512,converge`):
  env        always: GPU, driver, torch/CUDA/DALI versions, a bf16 matmul's TFLOP/s, a device copy's GB/s
  tests      tests/test_color.py's CUDA tests (CUDA vs CPU kernel) and every 24-bit colour on the GPU against
             the CPU kernel, the PyTorch reference and skimage
  color      `bench color` on the GPU: our kernel vs kornia vs a device-to-device copy, 256² and 1024²
  data       `bench data`: the reference loader vs DALI cpu vs DALI mixed (GPU decoding), 256² and 512²
  train256   `bench train` at 256² (res256 model, batch 32): fp32, bf16, + channels_last, + compile;
             images/s, peak memory, MFU against the measured bf16 matmul rate and the data sheet
  train512   the same with the res512 preset (batch 16)
  memory     peak GPU memory at two batch sizes of res512 and of res1024 (3 training steps each; OOM
             recorded), and the largest batch that fits, extrapolated
  converge   a real training run of res256 (batch 32) through DALI on synthetic shards for --converge-steps
             steps or until its budget: validation PSNR (Lab) against the gray baseline

The perceptual loss is off in every run (loss.beta=0): its VGG16 weights cannot be fetched there. Other files:
  colorize-dist bench gpu --report A/results.json B/results.json --out DIR   # one report.md of several calls
"""

from __future__ import annotations

import argparse
import contextlib
import email.parser
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------------------------
# Preparation (CPU machine): wheels, parts, device calls
# ---------------------------------------------------------------------------------------------------------------

CALL_LIMIT = 64 * 2**20  # the device tool's limit on what one call carries: working tree + carried paths
TREE_MARGIN = 2 * 2**20  # room for the working tree to grow between --prepare and the calls
SCRIPT_RESERVE = 64 * 2**10  # install.sh, SHA256SUMS and parts.txt in every call folder
DEFAULT_PART_MB = 60  # megabytes (10**6 bytes)
DEFAULT_CACHE = Path("/tmp/colorize-dist-wheels")  # downloads, kept between --prepare runs
STORE = "/tmp/gpu-wheels"  # where the parts are gathered on the GPU machine, outside the repository copy
EXTRAS = ("dali", "deepspeed", "bench")  # the package's extras the stages need (and their requirements)
# Python packages the GPU machine's image holds (/work/.library/device/KINDS.md, read there 2026-11-17); torch is
# 2.11+cu130 on CPython 3.12.3 (Ubuntu 24.04, glibc 2.39). Their requirements are taken as met.
_GPU_MACHINE_PACKAGES = """
absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch build certifi
charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings cuda-core cuda-pathfinder
cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools
formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna
imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe
matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals
networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime onnxscript
opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint packaging pandas pathspec patsy
peft pillow pip pluggy portalocker prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments
pyparsing pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist
python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile
tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm
transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel
wrapt xarray xxhash yarl zipp
"""
GPU_MACHINE_HAS = frozenset(_GPU_MACHINE_PACKAGES.split())
# The GPU machine's interpreter, for environment markers and pip's --python-version.
TARGET_MARKERS = {
    "python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
    "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
    "platform_machine": "x86_64", "os_name": "posix", "platform_release": "", "platform_version": "",
    "implementation_version": "3.12.3",
}
PIP_PLATFORMS = [*(f"manylinux_2_{n}_x86_64" for n in range(39, 16, -1)), "manylinux2014_x86_64",
                 "manylinux1_x86_64"]
# The device calls after the wheels: each a group of stages that fits one 10-minute call.
RUN_GROUPS = (("tests", "color", "data", "train256", "memory"), ("train512", "converge"))


class PrepareError(RuntimeError):
    """A problem --prepare reports in one line."""


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Segment:
    """Bytes [offset, offset + length) of `wheel`, carried as the file `part`."""

    wheel: str
    part: str
    offset: int
    length: int


def plan_calls(files: Sequence[tuple[str, int]], *, part_size: int, call_budget: int) -> list[list[Segment]]:
    """Cuts the files (name, size) into parts of at most `part_size` bytes and packs them into as few calls as
    possible: each call carries at most `call_budget` bytes of parts. Largest files first; a file may start in
    one call and end in the next."""
    if part_size < 1 or call_budget < 1:
        raise PrepareError(f"part size ({part_size} B) and call budget ({call_budget} B) must be positive")
    calls: list[list[Segment]] = [[]]
    free = call_budget
    for name, size in sorted(files, key=lambda item: (-item[1], item[0])):
        offset, index = 0, 0
        while offset < size or (size == 0 and index == 0):
            if free == 0:
                calls.append([])
                free = call_budget
            length = min(size - offset, part_size, free)
            calls[-1].append(Segment(name, f"{name}.part{index:03d}", offset, length))
            offset, index, free = offset + length, index + 1, free - length
    return [call for call in calls if call]


@dataclass
class Plan:
    """What --prepare wrote: the call folders (relative to the repository root) and their commands."""

    folder: str  # e.g. ".gpu-wheels", relative to the repository root
    tree_bytes: int
    call_limit: int
    part_size: int
    wheels: list[dict[str, Any]]  # name, size, sha256
    calls: list[dict[str, Any]] = field(default_factory=list)  # index, carry, bytes, parts, command, timeout_s

    def markdown(self) -> str:
        total = sum(wheel["size"] for wheel in self.wheels)
        lines = [
            "# GPU machine: device calls of `colorize-dist bench gpu`", "",
            f"{len(self.wheels)} wheels, {total / 1e6:.1f} MB, in {sum(len(c['parts']) for c in self.calls)} parts "
            f"of at most {self.part_size / 1e6:.0f} MB; working tree {self.tree_bytes / 2**20:.2f} MiB; "
            f"carry limit {self.call_limit / 2**20:.0f} MiB per call.", "",
            "Make the calls in order and back to back: the machine is given back about 30 s after a call, and "
            f"with it the parts gathered in {STORE}. Each call's output says which calls are still to carry; if "
            "it names calls already made, the machine was recycled: start again at call 1.", "",
            "| call | carry | carried MiB | timeout_s | command |", "| --- | --- | --- | --- | --- |",
        ]
        for call in self.calls:
            carry = ", ".join(f"`{path}`" for path in call["carry"]) or "(nothing)"
            lines.append(f"| {call['index']} | {carry} | {call['bytes'] / 2**20:.1f} | {call['timeout_s']} | "
                         f"`{call['command']}` |")
        lines += ["", "Wheels:", "", "| wheel | MB | SHA-256 |", "| --- | --- | --- |"]
        lines += [f"| {w['name']} | {w['size'] / 1e6:.1f} | {w['sha256'][:16]}… |" for w in self.wheels]
        return "\n".join(lines) + "\n"


INSTALL_SH = r"""#!/bin/sh
# Written by `colorize-dist bench gpu --prepare`: receives, joins and installs the wheels the GPU machine lacks.
#   sh CALL_FOLDER/install.sh --receive   copy this call's parts to $GPU_WHEELS (default __STORE__), outside the
#                                         repository copy, and say which calls are still to carry
#   sh __STORE__/install.sh               join the parts, check each wheel's SHA-256, pip install them (once)
#   sh __STORE__/install.sh --join-only   join and check only
set -eu
here=$(cd "$(dirname "$0")" && pwd)
store=${GPU_WHEELS:-__STORE__}
mode=${1:-install}
if [ "$mode" = "--receive" ]; then
    mkdir -p "$store"
    [ "$here" = "$(cd "$store" && pwd)" ] || cp "$here"/* "$store"/
    cd "$store"
    missing=""
    while read -r wheel part call; do
        [ -e "$wheel" ] || [ -e "$part" ] || missing="$missing $call"
    done < parts.txt
    if [ -z "$missing" ]; then
        echo "gpu wheels: every part is in $store"
    else
        echo "gpu wheels: parts in $store; still to carry: call(s)" $(printf '%s\n' $missing | sort -un)
    fi
    exit 0
fi
cd "$here"
failed=0
while read -r sum wheel; do
    if [ -e "$wheel" ] && [ "$(sha256sum "$wheel" | cut -d' ' -f1)" = "$sum" ]; then
        continue
    fi
    parts=$(awk -v w="$wheel" '$1 == w {print $2}' parts.txt)
    complete=1
    for part in $parts; do
        if [ ! -e "$part" ]; then
            call=$(awk -v p="$part" '$2 == p {print $3}' parts.txt)
            echo "gpu wheels: $part is missing: carry call $call of plan.md" >&2
            complete=0
        fi
    done
    if [ $complete -eq 0 ]; then failed=1; continue; fi
    cat $parts > "$wheel.tmp"
    if [ "$(sha256sum "$wheel.tmp" | cut -d' ' -f1)" != "$sum" ]; then
        echo "gpu wheels: $wheel: SHA-256 differs after joining its parts" >&2
        rm -f "$wheel.tmp"; failed=1; continue
    fi
    mv "$wheel.tmp" "$wheel"
    rm -f $parts
done < SHA256SUMS
[ $failed -eq 0 ] || exit 1
wheels=$(awk '{print $2}' SHA256SUMS)
if [ "$mode" = "--join-only" ]; then
    echo "gpu wheels: $(echo $wheels | wc -w) wheels joined and checked in $here"
    exit 0
fi
if [ -e .installed ]; then
    echo "gpu wheels: already installed ($(cat .installed))"
    exit 0
fi
pip="python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check"
if $pip $wheels; then
    where="python3's environment"
else
    echo "gpu wheels: installing into python3's environment failed; installing into /tmp/site (PYTHONPATH)" >&2
    $pip --upgrade --target /tmp/site $wheels
    where="/tmp/site"
fi
echo "$where" > .installed
echo "gpu wheels: $(echo $wheels | wc -w) wheels installed into $where"
"""


def write_plan(wheels: Sequence[Path], dest: Path, *, folder: str, part_size: int, call_limit: int = CALL_LIMIT,
               tree_bytes: int, margin: int = TREE_MARGIN + SCRIPT_RESERVE) -> Plan:
    """Writes the call folders dest/call-K (parts, install.sh, SHA256SUMS, parts.txt), plan.json and plan.md.

    `folder` is `dest` relative to the repository root, as the device tool's carry argument names it. Each call
    carries at most call_limit - tree_bytes - margin bytes of parts; `margin` covers the scripts beside them and
    the working tree's growth."""
    budget = call_limit - tree_bytes - margin
    if budget < 1:
        raise PrepareError(f"the working tree ({tree_bytes / 2**20:.1f} MiB) leaves no room under the "
                           f"{call_limit / 2**20:.0f} MiB carry limit")
    sources = {path.name: path for path in wheels}
    if len(sources) != len(wheels):
        raise PrepareError("two wheels share a file name")
    calls = plan_calls([(name, path.stat().st_size) for name, path in sources.items()],
                       part_size=part_size, call_budget=budget)
    sums = {name: sha256(path) for name, path in sources.items()}
    dest.mkdir(parents=True, exist_ok=True)
    parts_txt = "".join(f"{seg.wheel} {seg.part} {index}\n"
                        for index, segments in enumerate(calls, 1) for seg in segments)
    sums_txt = "".join(f"{sums[name]}  {name}\n" for name in sorted(sources))
    plan = Plan(folder=folder, tree_bytes=tree_bytes, call_limit=call_limit, part_size=part_size,
                wheels=[{"name": name, "size": sources[name].stat().st_size, "sha256": sums[name]}
                        for name in sorted(sources)])
    for index, segments in enumerate(calls, 1):
        call_dir = dest / f"call-{index}"
        call_dir.mkdir()
        for seg in segments:
            with sources[seg.wheel].open("rb") as src, (call_dir / seg.part).open("wb") as out:
                src.seek(seg.offset)
                copy_bytes(src, out, seg.length)
        (call_dir / "install.sh").write_text(INSTALL_SH.replace("__STORE__", STORE))
        (call_dir / "SHA256SUMS").write_text(sums_txt)
        (call_dir / "parts.txt").write_text(parts_txt)
        carry = f"{folder}/call-{index}"
        command = f"sh {carry}/install.sh --receive"
        timeout = 120
        if index == len(calls):  # the last parts: install and run the first group in the same call
            command += f" && sh {STORE}/install.sh && {run_command(RUN_GROUPS[0])}"
            timeout = 600
        plan.calls.append({"index": index, "carry": [carry], "bytes": folder_bytes(call_dir),
                           "parts": [seg.part for seg in segments], "command": command, "timeout_s": timeout})
    for group in RUN_GROUPS[1:]:
        plan.calls.append({"index": len(plan.calls) + 1, "carry": [], "bytes": 0, "parts": [],
                           "command": run_command(group), "timeout_s": 600})
    (dest / "plan.json").write_text(json.dumps(asdict(plan), indent=1) + "\n")
    (dest / "plan.md").write_text(plan.markdown())
    return plan


def run_command(stages: Iterable[str]) -> str:
    return (f"PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 python3 -m colorize_dist.bench.gpu "
            f"--stages {','.join(stages)}")


def copy_bytes(src, out, length: int, chunk: int = 2**22) -> None:
    while length > 0:
        data = src.read(min(chunk, length))
        if not data:
            raise PrepareError(f"{src.name} ended early")
        out.write(data)
        length -= len(data)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(2**22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def working_tree_bytes(repo: Path) -> int:
    """Bytes of what every device call sends: tracked files and untracked files git does not ignore."""
    listing = subprocess.run(["git", "-C", str(repo), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                             capture_output=True, check=True).stdout.decode()
    files = {repo / name for name in listing.split("\0") if name}
    return sum(path.stat().st_size for path in files if path.is_file())


def package_requirements(extras: Sequence[str] = EXTRAS) -> list:
    """colorize-dist's own requirements and those of `extras`, for the GPU machine's interpreter."""
    from importlib import metadata

    from packaging.requirements import Requirement

    try:
        lines = metadata.requires("colorize-dist") or []
    except metadata.PackageNotFoundError:
        raise PrepareError("colorize-dist is not installed here: pip install -e . first (its metadata lists "
                           "what the GPU machine needs)") from None
    requirements = [Requirement(line) for line in lines]
    return [req for req in requirements
            if canonical(req.name) != "colorize-dist" and applies(req, ("", *extras))]


def applies(requirement, extras: Iterable[str]) -> bool:
    """Whether `requirement` holds on the GPU machine for any of `extras` ("" the base requirements)."""
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**TARGET_MARKERS, "extra": extra}) for extra in extras)


def wheel_requirements(wheel: Path) -> list[str]:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(wheel) as archive:
        names = [n for n in archive.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n)]
        if len(names) != 1:
            raise PrepareError(f"{wheel.name}: expected one .dist-info/METADATA, found {len(names)}")
        text = archive.read(names[0]).decode("utf-8")
    return email.parser.Parser().parsestr(text, headersonly=True).get_all("Requires-Dist") or []


def resolve_wheels(roots: Sequence, fetch: Callable[[Any], Path], *,
                   present: frozenset[str] = GPU_MACHINE_HAS) -> list[Path]:
    """The wheels of `roots` (packaging Requirements) and of everything they need that `present` lacks.

    `fetch(requirement)` returns a wheel for one requirement; each wheel's own requirements (with the extras asked
    of it, markers evaluated for the GPU machine) are followed in turn.
    """
    from packaging.requirements import Requirement

    queue = list(roots)
    wheels: dict[str, Path] = {}
    extras_done: dict[str, set[str]] = {}
    while queue:
        req = queue.pop(0)
        name = canonical(req.name)
        if name in present:
            continue
        wanted = {"", *req.extras}
        if name in wheels and wanted <= extras_done[name]:
            continue
        if name not in wheels:
            wheels[name] = fetch(req)
            extras_done[name] = set()
        new = wanted - extras_done[name]
        extras_done[name] |= new
        for line in wheel_requirements(wheels[name]):
            dependency = Requirement(line)
            if applies(dependency, new):
                queue.append(dependency)
    return [wheels[name] for name in sorted(wheels)]


def cached_wheel(cache: Path, requirement) -> Path | None:
    """The newest wheel in `cache` for `requirement` (name and version specifier), if any."""
    from packaging.utils import InvalidWheelFilename, parse_wheel_filename

    found = []
    for path in cache.glob("*.whl"):
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename:
            continue
        if canonical(name) == canonical(requirement.name) and requirement.specifier.contains(version,
                                                                                             prereleases=True):
            found.append((version, path))
    return max(found)[1] if found else None


def pip_download(cache: Path) -> Callable[[Any], Path]:
    """A `fetch` for resolve_wheels: the version installed here when it fits, else pip's choice; cached."""
    from importlib import metadata

    from packaging.requirements import Requirement

    def fetch(requirement) -> Path:
        pinned = Requirement(f"{requirement.name}{requirement.specifier}")
        with contextlib.suppress(metadata.PackageNotFoundError):
            here = metadata.version(requirement.name)
            if requirement.specifier.contains(here, prereleases=True):
                pinned = Requirement(f"{requirement.name}=={here}")
        wheel = cached_wheel(cache, pinned)
        if wheel is not None:
            return wheel
        cache.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
                   TARGET_MARKERS["python_version"], "--implementation", "cp",
                   *(arg for platform in PIP_PLATFORMS for arg in ("--platform", platform)), "-d", str(cache),
                   str(pinned)]
        print(f"bench gpu: pip download {pinned}", file=sys.stderr, flush=True)
        process = subprocess.run(command, capture_output=True, text=True)
        wheel = cached_wheel(cache, pinned)
        if wheel is None and "No matching distribution" in process.stderr:
            # Published as a source distribution only (DeepSpeed): build it here, if it makes a pure-Python wheel.
            print(f"bench gpu: no wheel of {pinned} for the GPU machine; pip wheel (pure Python only)",
                  file=sys.stderr, flush=True)
            built = cache / "built"
            process = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-w", str(built),
                                      str(pinned)], capture_output=True, text=True)
            wheel = cached_wheel(built, pinned) if built.is_dir() else None
            if wheel is not None and not wheel.name.endswith("-none-any.whl"):
                raise PrepareError(f"{pinned} has no wheel for CPython 3.12 manylinux x86_64 and builds into "
                                   f"{wheel.name}, which is not pure Python")
            if wheel is not None:
                wheel = Path(shutil.move(wheel, cache / wheel.name))
        if wheel is None:
            tail = (process.stderr or process.stdout).strip().splitlines()[-1:] or ["no output"]
            raise PrepareError(f"pip could not get {pinned}: {tail[0]}")
        return wheel

    return fetch


def prepare(dest: Path, *, cache: Path, part_size: int, repo: Path = REPO_ROOT) -> Plan:
    dest = dest.resolve()
    try:
        folder = dest.relative_to(repo).as_posix()
    except ValueError:
        raise PrepareError(f"{dest} is not inside the repository {repo}: the device tool carries paths of the "
                           "repository only") from None
    probe = subprocess.run(["git", "-C", str(repo), "check-ignore", "-q", f"{folder}/call-1/x"])
    if probe.returncode != 0:
        raise PrepareError(f"{folder}/ is not ignored by git, so every device call would send it: run "
                           f"`echo /{folder}/ >>.git/info/exclude` first")
    if dest.exists() and any(dest.iterdir()):
        if not (dest / "plan.json").is_file():
            raise PrepareError(f"{dest} holds files that --prepare did not write; choose an empty folder")
        shutil.rmtree(dest)
    wheels = resolve_wheels(package_requirements(), pip_download(cache))
    return write_plan(wheels, dest, folder=folder, part_size=part_size, call_limit=CALL_LIMIT,
                      tree_bytes=working_tree_bytes(repo))


# ---------------------------------------------------------------------------------------------------------------
# Running (GPU machine): one process group per stage, each under its budget
# ---------------------------------------------------------------------------------------------------------------

EXIT_NO_GPU = 2
DEFAULT_BUDGET_S = 520  # of the 600 s a device call may run: joining and installing the wheels come first
GRACE_S = 15  # between a stage's SIGTERM and SIGKILL; the stage also stops its own runs this long before its end
# name → (default budget in seconds, what it measures)
STAGES: dict[str, tuple[float, str]] = {
    "build": (180, "build colorize_dist._C for this GPU (setup.py build_ext --inplace)"),
    "env": (90, "GPU, driver, versions, bf16 matmul TFLOP/s, device copy GB/s"),
    "tests": (150, "CUDA tests of tests/test_color.py; every colour on the GPU vs CPU, reference, skimage"),
    "color": (90, "our RGB→Lab kernel vs kornia vs a device copy"),
    "data": (150, "reference loader vs DALI cpu vs DALI mixed"),
    "train256": (260, "fp32 / bf16 / channels_last / compile at 256²"),
    "train512": (260, "fp32 / bf16 / channels_last / compile with the res512 preset"),
    "memory": (140, "peak memory vs batch size, res512 and res1024"),
    "converge": (260, "a real run at 256² through DALI: PSNR vs the gray baseline"),
}
ALWAYS = ("build", "env")  # run first in every call: the others need the extension and the matmul rate
COLOR_SIZES = (256, 1024)
DATA_RESOLUTIONS = (256, 512)
DATA_THREADS = 8
DATA_COLUMNS = ("reference", "dali_cpu", "dali_mixed")
TRAIN_GROUPS = {"train256": ("res256", 32, 256), "train512": ("res512", 16, 512)}  # config, batch, resolution
CONVERGE = ("res256", 32, 256)  # config, batch, resolution
# config, resolution, batch sizes: two per config give the memory per image and what does not depend on the batch
MEMORY_SWEEP = (("res512", 512, (8, 32)), ("res1024", 1024, (4, 16)))
SYNTH_IMAGES = {256: 4096, 512: 1024, 1024: 64}  # synthetic images per resolution, shared by the stages
NO_VGG = "loss.beta=0"  # the perceptual loss's VGG16 weights cannot be fetched on the GPU machine
TEST_COMMAND = ["-m", "pytest", "tests/test_color.py", "-k", "cuda", "-q", "-p", "no:cacheprovider"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--prepare", type=Path, metavar="DIR",
                        help="CPU machine: download the wheels the GPU machine lacks and write the device calls "
                             "into DIR (inside the repository, ignored by git), e.g. .whl")
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE,
                        help=f"--prepare's downloads, kept for the next run (default {DEFAULT_CACHE})")
    parser.add_argument("--part-size", type=float, default=DEFAULT_PART_MB, metavar="MB",
                        help=f"--prepare: largest part, in MB (default {DEFAULT_PART_MB})")
    parser.add_argument("--stages", default="all",
                        help=f"comma-separated subset of {', '.join(s for s in STAGES if s not in ALWAYS)} "
                             f"(default all; {', '.join(ALWAYS)} always run first)")
    parser.add_argument("--out", type=Path, help="report.md, results.json, log.txt (default: $OUT, else ./bench-gpu)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/colorize-dist-bench-gpu"),
                        help="scratch: shards, runs, stage logs (kept between calls on a warm machine)")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, metavar="SECONDS",
                        help=f"time for all stages of this call (default {DEFAULT_BUDGET_S}); each stage also has "
                             "its own")
    parser.add_argument("--train-steps", type=int, default=30, help="steps per `bench train` variant")
    parser.add_argument("--train-warmup", type=int, default=10, help="first steps left out of the rates")
    parser.add_argument("--converge-steps", type=int, default=3000, help="steps of the converge run (at most)")
    parser.add_argument("--report", type=Path, nargs="+", metavar="RESULTS_JSON",
                        help="write one report.md (to --out) from the results.json of several calls, then stop")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: run one stage in this process


def main(args: argparse.Namespace) -> int:
    if args.prepare is not None:
        try:
            plan = prepare(args.prepare, cache=args.cache, part_size=round(args.part_size * 1e6))
        except PrepareError as exc:
            print(f"bench gpu: {exc}", file=sys.stderr)
            return 2
        print(plan.markdown())
        print(f"bench gpu: plan written to {args.prepare / 'plan.md'}", file=sys.stderr)
        return 0
    out = args.out or Path(os.environ.get("OUT") or "bench-gpu")
    if args.report:
        results = merge_results([json.loads(path.read_text()) for path in args.report])
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(render_report(results))
        print(f"bench gpu: {out / 'report.md'}")
        return 0
    if args.worker:
        return run_worker(args.worker, args.work)
    try:
        stages = selected_stages(args.stages)
    except ValueError as exc:
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("bench gpu: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine "
              "(BENCHMARKS.md, 'GPU (bench gpu)'), or use --prepare DIR on this one", file=sys.stderr)
        return EXIT_NO_GPU
    return run_stages(stages, out=out, work=args.work, budget=args.budget, options={
        "train_steps": args.train_steps, "train_warmup": args.train_warmup, "converge_steps": args.converge_steps})


def selected_stages(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    if names == ["all"]:
        names = list(STAGES)
    unknown = [name for name in names if name not in STAGES]
    if unknown or not names:
        raise ValueError(f"--stages: unknown {', '.join(unknown) or '(none given)'}; choose from "
                         f"{', '.join(STAGES)} or all")
    return [*ALWAYS, *(name for name in STAGES if name in names and name not in ALWAYS)]


def run_stages(stages: Sequence[str], *, out: Path, work: Path, budget: float, options: dict[str, Any]) -> int:
    """Runs each stage in its own process group under min(its budget, what is left); writes the report after each."""
    start = time.monotonic()
    out.mkdir(parents=True, exist_ok=True)
    for sub in ("results", "logs"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1"}
    results: dict[str, Any] = {
        "command": " ".join([invoked_as(), *map(shlex.quote, sys.argv[1:])]),
        "started": now(), "stages": {},
    }
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGHUP)}
    try:
        for name in stages:
            left = budget - (time.monotonic() - start)
            stage_budget = min(STAGES[name][0], left)
            record: dict[str, Any] = {"budget_s": round(stage_budget)}
            if stage_budget < 20:
                record |= {"status": "not run", "error": f"{left:.0f} s of the call's budget left"}
            else:
                record |= run_stage(name, work, stage_budget, options, env)
            results["stages"][name] = record
            results["finished"] = now()
            print(f"bench gpu: {name}: {record['status']} ({record.get('seconds', 0):.0f} s of "
                  f"{record['budget_s']} s)" + (f": {record['error'].splitlines()[-1]}" if record.get("error") else ""),
                  flush=True)
            write_outputs(results, out, work, stages)
    except Interrupted as exc:
        results["stages"][exc.stage] = {"status": "interrupted", "error": str(exc), "budget_s": 0}
        results["finished"] = now()
        write_outputs(results, out, work, stages)
        print(f"bench gpu: {exc}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(render_report(results))
    return 0 if all(r["status"] == "ok" for r in results["stages"].values()) else 1


class Interrupted(Exception):
    def __init__(self, stage: str, signum: int):
        super().__init__(f"{signal.Signals(signum).name} during the {stage} stage; its processes were stopped")
        self.stage = stage


_running: list[tuple[str, subprocess.Popen]] = []  # the stage running now, for _interrupt


def _interrupt(signum, frame) -> None:
    """SIGTERM/SIGHUP: stop the running stage's process group, then let run_stages write what it has."""
    if _running:
        name, process = _running[-1]
        stop_group(process)
        raise Interrupted(name, signum)
    raise Interrupted("(between stages)", signum)


def invoked_as() -> str:
    """This run's program: the module itself, or the CLI (`python -m colorize_dist bench gpu`, `colorize-dist`)."""
    return "python3 -m colorize_dist.bench.gpu" if Path(sys.argv[0]).name == "gpu.py" else "python3 -m colorize_dist"


def run_stage(name: str, work: Path, budget: float, options: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    params = {"options": options, "deadline": time.time() + budget - GRACE_S}
    (work / "results" / f"{name}.params.json").write_text(json.dumps(params))
    result_file = work / "results" / f"{name}.json"
    result_file.unlink(missing_ok=True)
    log = work / "logs" / f"{name}.log"
    started = time.monotonic()
    with log.open("w") as log_file:
        # Its own process group (killpg reaches its training runs and loader workers) in this session, so that
        # whatever ends this command's session ends the stage too.
        group = {"process_group": 0} if sys.version_info >= (3, 11) else {"preexec_fn": os.setpgrp}
        process = subprocess.Popen([sys.executable, "-m", "colorize_dist.bench.gpu", "--worker", name, "--work",
                                    str(work)], cwd=REPO_ROOT, env=env, stdout=log_file, stderr=subprocess.STDOUT,
                                   **group)
        _running.append((name, process))
        try:
            code = process.wait(timeout=budget)
            status = "ok" if code == 0 else "failed"
        except subprocess.TimeoutExpired:
            stop_group(process)
            code, status = None, "timeout"
        finally:
            _running.pop()
    record: dict[str, Any] = {"status": status, "seconds": round(time.monotonic() - started, 1)}
    if result_file.is_file():
        record["result"] = json.loads(result_file.read_text())
    if status == "failed":
        record["error"] = f"exit status {code}: " + last_lines(log, 1)
    elif status == "timeout":
        record["error"] = f"stopped after its {budget:.0f} s budget; results so far are kept"
    return record


def stop_group(process: subprocess.Popen) -> None:
    """SIGTERM to the stage's process group (its training runs stop at a checkpoint), then SIGKILL."""
    for sig, wait in ((signal.SIGTERM, GRACE_S), (signal.SIGKILL, 5)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def last_lines(path: Path, count: int) -> str:
    lines = [line for line in path.read_text(errors="replace").splitlines() if line.strip()]
    return "\n".join(lines[-count:]) if lines else "(no output)"


def write_outputs(results: dict[str, Any], out: Path, work: Path, stages: Sequence[str]) -> None:
    atomic_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_text(out / "report.md", render_report(results))
    logs = []
    for name in stages:
        log = work / "logs" / f"{name}.log"
        if log.is_file() and name in results["stages"]:
            text = log.read_text(errors="replace")
            logs.append(f"===== {name} =====\n{text[-300_000:]}\n")
    atomic_text(out / "log.txt", "".join(logs))


def atomic_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# --- the stages, each run by `run_worker` in its own process -------------------------------------------------------


@dataclass
class Stage:
    name: str
    work: Path
    options: dict[str, Any]
    deadline: float  # time.time() by which the stage must have saved its results
    result: dict[str, Any] = field(default_factory=dict)

    def remaining(self) -> float:
        return self.deadline - time.time()

    def save(self) -> None:
        """Writes what the stage has so far: a stage stopped at its budget keeps its finished rows."""
        atomic_text(self.work / "results" / f"{self.name}.json", json.dumps(self.result, indent=1))

    def earlier(self, name: str) -> dict[str, Any]:
        """The saved result of a stage run before this one in the same call (e.g. env's matmul rate)."""
        path = self.work / "results" / f"{name}.json"
        return json.loads(path.read_text()) if path.is_file() else {}


def run_worker(name: str, work: Path) -> int:
    params = json.loads((work / "results" / f"{name}.params.json").read_text())
    stage = Stage(name, work, params["options"], params["deadline"])
    STAGE_FUNCTIONS[name](stage)
    stage.save()
    return 0


def stage_build(stage: Stage) -> None:
    """setup.py build_ext --inplace for this GPU's compute capability, unless the same sources were built for it
    in this repository copy before (a warm machine keeps both between calls)."""
    import torch

    major, minor = torch.cuda.get_device_capability(0)
    arch = f"{major}{minor}"
    command = [sys.executable, "setup.py", "build_ext", "--inplace"]
    stage.result = {"arch": f"sm_{arch}", "rebuilt": False,
                    "command": f"COLORIZE_DIST_CUDA=1 COLORIZE_DIST_CUDA_ARCHS={arch} python3 setup.py build_ext "
                               "--inplace"}
    digest = hashlib.sha256(f"{sys.version} {arch}".encode())
    for source in sorted([*(REPO_ROOT / "csrc").iterdir(), REPO_ROOT / "setup.py"]):
        digest.update(source.name.encode() + source.read_bytes())
    stamp = stage.work / "build.stamp"
    if stamp.is_file() and stamp.read_text() == digest.hexdigest():
        check = subprocess.run([sys.executable, "-c", "from colorize_dist import _C; print(_C.cuda_compiled, "
                                "list(_C.cuda_archs))"], cwd=REPO_ROOT, capture_output=True, text=True)
        if check.stdout.strip() == f"True [{arch}]":
            return
    started = time.monotonic()
    env = {**os.environ, "COLORIZE_DIST_CUDA": "1", "COLORIZE_DIST_CUDA_ARCHS": arch}
    subprocess.run(command, cwd=REPO_ROOT, env=env, check=True)
    stamp.write_text(digest.hexdigest())
    stage.result |= {"rebuilt": True, "seconds": round(time.monotonic() - started, 1)}


def stage_env(stage: Stage) -> None:
    import platform

    import torch

    props = torch.cuda.get_device_properties(0)
    info: dict[str, Any] = {
        "date": now(), "gpu": torch.cuda.get_device_name(0), "capability": f"sm_{props.major}{props.minor}",
        "gpu_memory_gib": round(props.total_memory / 2**30, 1), "multiprocessors": props.multi_processor_count,
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(), "cpus": os.cpu_count(),
    }
    info["driver"] = command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    nvcc = command_output(["nvcc", "--version"])
    info["nvcc"] = nvcc.splitlines()[-1] if nvcc else None
    for module, key in (("nvidia.dali", "dali"), ("kornia", "kornia"), ("accelerate", "accelerate")):
        try:
            info[key] = __import__(module, fromlist=["__version__"]).__version__
        except Exception as exc:  # a missing wheel is a finding, not a failure of this stage
            info[key] = f"unavailable ({type(exc).__name__}: {exc})"
    stage.result = info
    stage.save()
    info["matmul_bf16_tflops"] = round(matmul_tflops(torch.bfloat16), 1)
    info["copy_gb_s"] = round(copy_gb_s(), 1)


def command_output(command: list[str]) -> str | None:
    try:
        process = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return process.stdout.strip() if process.returncode == 0 else None


def matmul_tflops(dtype, n: int = 8192, warmup: int = 3, repeats: int = 10) -> float:
    """An n×n×n matrix product on random data: the mean of `repeats` timed after `warmup` (CUDA events)."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=dtype) for _ in range(2))
    for _ in range(warmup):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (begin.elapsed_time(end) / 1e3) / 1e12


def copy_gb_s(nbytes: int = 2**30, repeats: int = 20) -> float:
    """A device-to-device copy of `nbytes`, counting bytes read and written."""
    import torch

    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    return 2 * nbytes * repeats / (begin.elapsed_time(end) / 1e3) / 1e9


def stage_tests(stage: Stage) -> None:
    """The CUDA tests of tests/test_color.py, then every 24-bit colour on the GPU against the other paths."""
    env = {**os.environ, "COLORIZE_DIST_CUDA_ARCHS": stage.earlier("build").get("arch", "").removeprefix("sm_")}
    if not env["COLORIZE_DIST_CUDA_ARCHS"]:
        del env["COLORIZE_DIST_CUDA_ARCHS"]
    process = subprocess.run([sys.executable, *TEST_COMMAND], cwd=REPO_ROOT, env=env, capture_output=True,
                             text=True, timeout=max(30.0, stage.remaining() - 60))
    print(process.stdout[-20000:], process.stderr[-5000:], sep="\n")
    summary = last_line(process.stdout)
    counts = {key: int(num) for num, key in re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", summary)}
    stage.result = {"command": "python3 " + " ".join(TEST_COMMAND), "summary": summary, "counts": counts,
                    "exit_status": process.returncode}
    stage.save()
    stage.result["checks"] = every_colour_checks()
    stage.save()
    if process.returncode != 0:
        raise SystemExit(f"pytest failed: {summary}")


def last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[-1].strip("= ") if lines else "(no output)"


def every_colour_checks() -> list[dict[str, Any]]:
    """Max |difference| over all 2^24 colours: CUDA kernel vs CPU kernel, PyTorch reference (on the GPU), skimage."""
    import numpy as np
    import torch
    from skimage.color import rgb2lab

    from colorize_dist import color

    v = torch.arange(2**24, dtype=torch.int32)
    rgb = torch.stack([(v >> 16) & 255, (v >> 8) & 255, v & 255], dim=-1).to(torch.uint8).reshape(1, 4096, 4096, 3)
    gpu = rgb.cuda()
    lab_cuda = color.rgb_to_lab(gpu)
    lab_cpu = color.rgb_to_lab(rgb)
    lab_ref = color.rgb_to_lab(gpu, impl="ref")
    lab_skimage = torch.from_numpy(rgb2lab(rgb[0].numpy()).astype(np.float32)).permute(2, 0, 1)[None]
    checks = [
        ("rgb_to_lab: CUDA vs CPU kernel", (lab_cuda.cpu() - lab_cpu).abs().max().item(), 1e-3),
        ("rgb_to_lab: CUDA vs PyTorch reference (GPU)", (lab_cuda - lab_ref).abs().max().item(), 1e-3),
        ("rgb_to_lab: CUDA vs skimage", (lab_cuda.cpu() - lab_skimage).abs().max().item(), 1e-3),
        ("lab_to_rgb(uint8) ∘ rgb_to_lab: CUDA round trip, pixels off",
         float((color.lab_to_rgb(lab_cuda, dtype=torch.uint8) != gpu.permute(0, 3, 1, 2)).sum().item()), 0),
    ]
    for dtype in (torch.float32, torch.bfloat16):
        got = color.rgb_to_l_ab(gpu, dtype=dtype)
        want = color.rgb_to_l_ab(rgb, dtype=dtype)
        diff = max((g.cpu().float() - w.float()).abs().max().item() for g, w in zip(got, want, strict=True))
        checks.append((f"rgb_to_l_ab {str(dtype).removeprefix('torch.')}: CUDA vs CPU kernel", diff,
                       1e-3 if dtype == torch.float32 else 1e-2))
    return [{"check": name, "max_abs_diff": value, "limit": limit, "ok": value <= limit}
            for name, value, limit in checks]


def stage_color(stage: Stage) -> None:
    from colorize_dist.bench import color

    stage.result = {"megapixels_per_call": COLOR_MEGAPIXELS, "rows": [],
                    "targets": {"copy_fraction": color.COPY_TARGET, "kornia_speedup": color.KORNIA_TARGET}}
    for size in COLOR_SIZES:
        measured = color.measure_gpu(color.random_images(size, COLOR_MEGAPIXELS), min_time=0.5)
        stage.result["rows"].append({**asdict(measured), "copy_fraction": measured.copy_fraction,
                                     "kornia_speedup": measured.kornia_speedup})
        stage.save()


COLOR_MEGAPIXELS = 32.0  # per call: ~0.5 GB moved, so that launches do not bound the GPU rates


def synthetic_shards(work: Path, resolution: int) -> Path:
    """SYNTH_IMAGES[resolution] synthetic JPEG images at `resolution`², made once per machine and shared."""
    from colorize_dist.data import synth
    from colorize_dist.data.make import ShardOptions

    n = SYNTH_IMAGES[resolution]
    final = work / "shards" / f"synth-{resolution}-{n}"
    if not final.is_dir():
        partial = final.with_name(final.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        synth.write_synthetic_shards(partial, n, resolution, options=ShardOptions(workers=os.cpu_count()))
        partial.rename(final)
    return final


def stage_data(stage: Stage) -> None:
    import torch

    from colorize_dist.bench import data as bench_data
    from colorize_dist.data.config import DataConfig

    batch, epochs = 32, 2
    runs = [("reference", "reference", os.cpu_count() or 1, "cuda"), ("dali_cpu", "dali", DATA_THREADS, "cpu"),
            ("dali_mixed", "dali", DATA_THREADS, "cuda")]
    stage.result = {"batch_size": batch, "epochs": epochs, "dali_threads": DATA_THREADS,
                    "reference_workers": os.cpu_count(), "rows": []}
    for resolution in DATA_RESOLUTIONS:
        shards = synthetic_shards(stage.work, resolution)
        row: dict[str, Any] = {"resolution": resolution, "images": SYNTH_IMAGES[resolution], "errors": {}}
        stage.result["rows"].append(row)
        for column, backend, threads, device in runs:
            cfg = DataConfig(shards=str(shards), resolution=resolution, backend=backend, num_threads=threads)
            try:
                # bench/data.py's throughput reads batch_size and epochs from its CLI namespace.
                row[column], row[f"{column}_cpu_ms"] = bench_data.throughput(
                    cfg, torch.device(device), SimpleNamespace(batch_size=batch, epochs=epochs, resume_at=None))
            except Exception as exc:  # recorded per cell; the other loaders still run
                row[column] = None
                row["errors"][column] = f"{type(exc).__name__}: {exc}"
            stage.save()


def train_overrides(batch: int) -> list[str]:
    return [f"train.batch_size={batch}", NO_VGG, f"data.num_threads={DATA_THREADS}"]


def stage_train(stage: Stage) -> None:
    from colorize_dist.bench import train as bench_train
    from colorize_dist.study.costs import point_cost
    from colorize_dist.training.config import load_training_config

    config, batch, resolution = TRAIN_GROUPS[stage.name]
    steps, warmup = stage.options["train_steps"], stage.options["train_warmup"]
    overrides = train_overrides(batch)
    cfg = load_training_config(config, overrides)
    matmul = stage.earlier("env").get("matmul_bf16_tflops")
    flops = point_cost(cfg).flops_per_image
    stage.result = {"config": config, "resolution": resolution, "batch_size": batch, "steps": steps,
                    "warmup": warmup, "overrides": overrides, "flops_per_image": flops,
                    "matmul_bf16_tflops": matmul, "rows": []}
    shards = synthetic_shards(stage.work, resolution)
    for index, name in enumerate(bench_train.VARIANTS):
        row: dict[str, Any] = {"variant": name}
        stage.result["rows"].append(row)
        left = stage.remaining()
        if left < 20:
            row["error"] = "not run: stage budget spent"
            continue
        try:
            measured = bench_train.run_variant(name, stage.work / "runs" / f"{stage.name}-{index}", config=config,
                                               shards=shards, overrides=overrides, steps=steps, warmup=warmup,
                                               timeout=left)
        except bench_train.VariantError as exc:
            row["error"] = str(exc)
            print(f"{name}: {exc}", flush=True)
        else:
            row |= asdict(measured)
            row["mfu_measured"] = flops * measured.images_per_s / (matmul * 1e12) if matmul else None
            row["mfu_spec"] = bench_train.mfu(cfg, measured.images_per_s, "fp32" not in name)
        stage.save()


def train_command(run_dir: Path, config: str, overrides: Sequence[str]) -> list[str]:
    from colorize_dist.bench.train import TRAIN_SCRIPT

    return [sys.executable, str(TRAIN_SCRIPT), "--run-dir", str(run_dir), "--resume", "none", "--config", config,
            *overrides]


def stage_converge(stage: Stage) -> None:
    """res256 through DALI until --converge-steps or the budget (SIGTERM: the loop checkpoints and stops)."""
    config, batch, resolution = CONVERGE
    steps = stage.options["converge_steps"]
    shards = synthetic_shards(stage.work, resolution)
    run_dir = stage.work / "runs" / "converge"
    shutil.rmtree(run_dir, ignore_errors=True)
    overrides = [*train_overrides(batch), f"data.shards={shards}", "data.backend=dali", f"train.max_steps={steps}",
                 f"train.pretrain_steps={min(500, steps // 4)}", "optim.warmup_steps=100", "train.log_every=50",
                 f"train.validate_every={max(1, steps // 6)}", f"train.checkpoint_every={10**9}",
                 f"train.sample_every={10**9}", "train.trackers=[tensorboard]"]
    command = train_command(run_dir, config, overrides)
    stage.result = {"config": config, "resolution": resolution, "batch_size": batch, "max_steps": steps,
                    "overrides": overrides,
                    "command": " ".join(["python3 colorize_dist/train.py", *map(shlex.quote, command[2:])])}
    stage.save()
    process = subprocess.Popen(command, cwd=REPO_ROOT)
    try:
        code = process.wait(timeout=max(10.0, stage.remaining() - 45))  # room to checkpoint and summarise
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)
        stage.result["stopped_at_budget"] = True
        try:
            code = process.wait(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
    stage.result["exit_status"] = code
    stage.result |= converge_summary(run_dir)
    stage.save()
    if code not in (0, 75):  # 75: stopped on request after a checkpoint
        raise SystemExit(f"training exited with status {code}")


def converge_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json's figures and the validation PSNR curve from the TensorBoard log."""
    from colorize_dist.training.summary import read_summary

    summary = read_summary(run_dir) or {}
    metrics = summary.get("metrics", {})
    found: dict[str, Any] = {
        "steps_done": summary.get("step"), "finished": summary.get("finished"), "wall_s": summary.get("wall_s"),
        "peak_memory_mib": summary.get("peak_memory_mib"), "psnr_lab": metrics.get("psnr_lab"),
        "psnr_lab_gray": metrics.get("psnr_lab_gray"), "curve": [], "images_per_s": None,
    }
    events = sorted((run_dir / "logs" / "colorize").glob("events.out.tfevents.*"))
    if events:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

        accumulator = EventAccumulator(str(events[-1]), size_guidance={"scalars": 0}).Reload()
        tags = accumulator.Tags().get("scalars", [])
        if "val/psnr_lab" in tags:
            found["curve"] = [[e.step, e.value] for e in accumulator.Scalars("val/psnr_lab")]
        if "images_per_s" in tags:
            rates = [e.value for e in accumulator.Scalars("images_per_s")]
            found["images_per_s"] = statistics.median(rates[len(rates) // 5:]) if rates else None
    return found


def stage_memory(stage: Stage) -> None:
    import torch

    total = torch.cuda.get_device_properties(0).total_memory if torch.cuda.is_available() else None
    stage.result = {"gpu_memory_mib": round(total / 2**20) if total else None, "steps": 3, "rows": []}
    for config, resolution, batches in MEMORY_SWEEP:
        shards = synthetic_shards(stage.work, resolution)
        for batch in batches:
            row: dict[str, Any] = {"config": config, "resolution": resolution, "batch_size": batch}
            stage.result["rows"].append(row)
            left = stage.remaining()
            if left < 20:
                row["status"] = "not run (budget)"
                continue
            run_dir = stage.work / "runs" / f"memory-{config}-{batch}"
            shutil.rmtree(run_dir, ignore_errors=True)
            overrides = [*train_overrides(batch), f"data.shards={shards}", "train.max_steps=3",
                         "train.pretrain_steps=0", "train.log_every=1", "train.trackers=[tensorboard]",
                         *(f"train.{key}={10**9}" for key in ("validate_every", "sample_every", "checkpoint_every"))]
            try:
                process = subprocess.run(train_command(run_dir, config, overrides), cwd=REPO_ROOT,
                                         capture_output=True, text=True, timeout=left)
            except subprocess.TimeoutExpired:
                row["status"] = "timeout"
            else:
                from colorize_dist.training.summary import read_summary

                summary = read_summary(run_dir) or {}
                row["peak_memory_mib"] = summary.get("peak_memory_mib")
                if process.returncode == 0:
                    row["status"] = "ok"
                elif "out of memory" in process.stderr.lower():
                    row["status"] = "OOM"
                else:
                    row["status"] = f"failed ({process.returncode}): {last_line(process.stderr)[:200]}"
                    print(process.stderr[-3000:], flush=True)
            stage.save()


STAGE_FUNCTIONS: dict[str, Callable[[Stage], None]] = {
    "build": stage_build, "env": stage_env, "tests": stage_tests, "color": stage_color, "data": stage_data,
    "train256": stage_train, "train512": stage_train, "converge": stage_converge, "memory": stage_memory,
}

# ---------------------------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------------------------


def md_table(headers: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value == 0 or 0.01 <= abs(value) < 100:
            return f"{value:.3g}"
        return f"{value:,.0f}" if 100 <= abs(value) < 1e12 else f"{value:.2g}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def pct(value: float | None) -> str:
    return "–" if value is None else f"{value:.0%}" if value >= 0.1 else f"{value:.1%}"


def merge_results(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Several calls' results.json as one: later calls' stages replace earlier ones of the same name."""
    merged: dict[str, Any] = {"command": " ; ".join(p.get("command", "") for p in parts),
                              "started": min(p.get("started", "") for p in parts),
                              "finished": max(p.get("finished", "") for p in parts), "stages": {}}
    for part in parts:
        for name, record in part.get("stages", {}).items():
            if record.get("status") != "not run" or name not in merged["stages"]:
                merged["stages"][name] = record
    return merged


def render_report(results: dict[str, Any]) -> str:
    """report.md: the environment, each stage's status, and one markdown table per stage that ran."""
    stages = results.get("stages", {})
    env = stages.get("env", {}).get("result", {})
    out = ["# GPU benchmarks: `colorize-dist bench gpu`", ""]
    out.append(f"Date {env.get('date') or results.get('started', '–')}; command(s): `{results.get('command', '')}`.")
    out += ["", md_table(["GPU", "driver", "torch", "CUDA (torch)", "nvcc", "cuDNN", "DALI", "Python",
                          "bf16 matmul TFLOP/s", "device copy GB/s"],
                         [[env.get("gpu"), env.get("driver"), env.get("torch"), env.get("torch_cuda"),
                           env.get("nvcc"), env.get("cudnn"), env.get("dali"), env.get("python"),
                           env.get("matmul_bf16_tflops"), env.get("copy_gb_s")]]), ""]
    out += ["## Stages", "", md_table(["stage", "status", "seconds", "budget s", "note"],
                                      [[name, r.get("status"), r.get("seconds"), r.get("budget_s"),
                                        (r.get("error") or "").splitlines()[-1][:300] if r.get("error") else ""]
                                       for name, r in stages.items()]), ""]
    for name, render in SECTIONS:
        for stage_name, record in stages.items():
            if stage_name.startswith(name) and record.get("result"):
                out += [render(stage_name, record["result"]), ""]
    return "\n".join(out)


def section_build(name: str, r: dict[str, Any]) -> str:
    how = "rebuilt" if r.get("rebuilt") else "up to date, not rebuilt"
    return f"## Build\n\n`{r.get('command')}` ({how}, {r.get('seconds', 0)} s; SASS for {r.get('arch')})."


def section_tests(name: str, r: dict[str, Any]) -> str:
    text = [f"## CUDA kernel tests\n\n`{r.get('command')}`: {r.get('summary')}"]
    if r.get("checks"):
        text += ["", "Every 24-bit colour (4096 × 4096 image) on the GPU:", "",
                 md_table(["check", "max \\|Δ\\|", "limit", "ok"],
                          [[c["check"], c["max_abs_diff"], c["limit"], c["ok"]] for c in r["checks"]])]
    return "\n".join(text)


def section_color(name: str, r: dict[str, Any]) -> str:
    targets = r.get("targets", {})
    rows = [[f"{row['size']}²", row["batch"], row["ours_mp_s"], row["ours_gb_s"], row["copy_gb_s"],
             pct(row["copy_fraction"]), row["kornia_mp_s"], f"{row['kornia_speedup']:.1f}×", row["ours_err"],
             row["kornia_err"]] for row in r.get("rows", [])]
    return (f"## RGB → Lab on the GPU (`bench color`)\n\nBatches of about {r.get('megapixels_per_call')} megapixels; "
            f"GB/s count uint8 RGB read + float32 Lab written. Targets: ≥ {pct(targets.get('copy_fraction'))} of "
            f"the copy's bandwidth, ≥ {fmt(targets.get('kornia_speedup'))}× kornia.\n\n"
            + md_table(["size", "images", "ours MP/s", "ours GB/s", "copy GB/s", "ours / copy", "kornia MP/s",
                        "ours / kornia", "ours max err", "kornia max err"], rows))


def section_data(name: str, r: dict[str, Any]) -> str:
    rows = []
    for row in r.get("rows", []):
        ref, mixed = row.get("reference"), row.get("dali_mixed")
        rows.append([f"{row['resolution']}²", row.get("images"), ref, row.get("dali_cpu"), mixed,
                     f"{mixed / ref:.2f}×" if ref and mixed else "–",
                     " / ".join(fmt(row.get(f"{column}_cpu_ms")) for column in DATA_COLUMNS)])
    errors = [f"- {row['resolution']}² {column}: {error}" for row in r.get("rows", [])
              for column, error in row.get("errors", {}).items()]
    return (f"## Data loading (`bench data`)\n\nImages/s, batch {r.get('batch_size')}, {r.get('epochs')} timed "
            f"epochs after a warm-up one; {r.get('dali_threads')} DALI threads, {r.get('reference_workers')} "
            "reference workers.\n\n"
            + md_table(["resolution", "images", "reference", "DALI cpu", "DALI mixed", "mixed / reference",
                        "CPU ms per image: ref / DALI cpu / mixed"], rows)
            + ("\n\n" + "\n".join(errors) if errors else ""))


def section_train(name: str, r: dict[str, Any]) -> str:
    rows = []
    for row in r.get("rows", []):
        if row.get("error"):
            rows.append([row["variant"], "–", "–", "–", "–", "–", "–", row["error"].splitlines()[0][:200]])
        else:
            rows.append([row["variant"], row["steps_per_s"], row["images_per_s"], row["data_wait"],
                         row.get("peak_memory_mib"), pct(row.get("mfu_measured")), row.get("mfu_spec"), ""])
    flops = r.get("flops_per_image")
    return (f"## Training step, {r.get('config')} at {r.get('resolution')}² (`bench train`)\n\n"
            f"Batch {r.get('batch_size')}, {r.get('steps')} steps ({r.get('warmup')} warm-up), one GPU; overrides "
            f"`{' '.join(r.get('overrides', []))}`. Model FLOPs per image and step "
            f"{fmt(flops / 1e9 if flops else None)} GFLOP; MFU against the measured bf16 matmul rate "
            f"({fmt(r.get('matmul_bf16_tflops'))} TFLOP/s) and against the data sheet.\n\n"
            + md_table(["variant", "steps/s", "images/s", "data wait", "peak MiB", "MFU (measured bf16)",
                        "MFU (data sheet)", "note"], rows))


def section_converge(name: str, r: dict[str, Any]) -> str:
    psnr, gray = r.get("psnr_lab"), r.get("psnr_lab_gray")
    gain = psnr - gray if psnr is not None and gray is not None else None
    curve = ", ".join(f"{step}: {value:.2f}" for step, value in r.get("curve", []))
    return (f"## Training run, {r.get('config')} at {r.get('resolution')}² through DALI (batch {r.get('batch_size')})"
            f"\n\n`{r.get('command')}`\n\n"
            + md_table(["steps", "finished", "wall s", "images/s", "PSNR Lab dB", "gray baseline dB", "gain dB",
                        "peak MiB"],
                       [[f"{r.get('steps_done')} / {r.get('max_steps')}", r.get("finished"), r.get("wall_s"),
                         r.get("images_per_s"), psnr, gray, gain, r.get("peak_memory_mib")]])
            + (f"\n\nValidation PSNR (Lab, dB) by step: {curve}." if curve else ""))


def section_memory(name: str, r: dict[str, Any]) -> str:
    total = r.get("gpu_memory_mib")
    rows = [[row["config"], f"{row['resolution']}²", row["batch_size"], row.get("peak_memory_mib"),
             pct(row["peak_memory_mib"] / total) if row.get("peak_memory_mib") and total else "–", row.get("status")]
            for row in r.get("rows", [])]
    text = (f"## Peak GPU memory per batch size\n\n{r.get('steps')} training steps per row of the preset (G and D, "
            "bf16, channels_last; one process, so ZeRO shards nothing); peak is torch's max_memory_allocated, of "
            f"{fmt(total)} MiB on the GPU.\n\n"
            + md_table(["config", "resolution", "batch", "peak MiB", "of the GPU", "status"], rows))
    fits = memory_fits(r.get("rows", []), total)
    if fits:
        text += ("\n\nA straight line through each config's two measured batches (memory = fixed + per image × "
                 "batch), and the largest batch whose peak stays under 90 % of the GPU:\n\n"
                 + md_table(["config", "MiB per image", "fixed MiB", "largest batch (extrapolated)"], fits))
    return text


def memory_fits(rows: Sequence[dict[str, Any]], total_mib: float | None) -> list[list[object]]:
    fits = []
    for config in dict.fromkeys(row["config"] for row in rows):
        points = sorted((row["batch_size"], row["peak_memory_mib"]) for row in rows
                        if row["config"] == config and row.get("status") == "ok" and row.get("peak_memory_mib"))
        if len(points) < 2 or points[-1][0] == points[0][0]:
            continue
        (b1, m1), (b2, m2) = points[0], points[-1]
        per_image = (m2 - m1) / (b2 - b1)
        fixed = m1 - per_image * b1
        largest = int((0.9 * total_mib - fixed) // per_image) if total_mib and per_image > 0 else None
        fits.append([config, per_image, fixed, largest])
    return fits


SECTIONS: list[tuple[str, Callable[[str, dict[str, Any]], str]]] = [
    ("build", section_build), ("tests", section_tests), ("color", section_color), ("data", section_data),
    ("train", section_train), ("converge", section_converge), ("memory", section_memory),
]


if __name__ == "__main__":
    cli_parser = argparse.ArgumentParser(prog="colorize-dist bench gpu", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(cli_parser)
    sys.exit(main(cli_parser.parse_args()))
