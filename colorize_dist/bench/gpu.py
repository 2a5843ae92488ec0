"""The benchmark of a GPU node: the other `bench` commands' measurements, run stage by stage on its GPU.

The report is rewritten after every stage and a failed stage is a row with its error, so a run stopped by Ctrl-C,
a time limit or an out-of-memory keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from tabulate import tabulate

from colorize_dist.bench import color as bench_color
from colorize_dist.bench import data as bench_data
from colorize_dist.bench import train as bench_train
from colorize_dist.bench.names import VARIANTS
from colorize_dist.files import atomic_write
from colorize_dist.training.config import load_training_config

EXIT_NO_GPU = 2
TRAIN_POINTS = (("res256", 32), ("res512", 16))  # (preset, batch size) of the train stage
MEMORY_POINTS = (("res512", (8, 32)), ("res1024", (4, 16)))  # (preset, two batch sizes) of the memory stage
MEMORY_VARIANT = "bf16 + channels_last"
MEMORY_HEADROOM = 0.9  # the largest batch keeps its peak under this share of the GPU's memory


@dataclass(frozen=True)
class BenchOptions:
    out: Path
    stages: tuple[str, ...]  # in STAGES, run in this order
    shards: Path | None = None  # read by the data and training stages; None: synthetic shards per resolution
    images: int = 2048  # synthetic images per resolution
    color_sizes: tuple[int, ...] = (256, 1024)
    color_megapixels: float = 32.0  # per call: enough bytes that kernel launches do not bound the rates
    data_resolutions: tuple[int, ...] = (256, 512)
    data_threads: int = 8  # DALI threads (the reference loader gets every core)
    data_batch_size: int = 32
    data_epochs: int = 2
    train_points: tuple[tuple[str, int], ...] = TRAIN_POINTS
    variants: tuple[str, ...] = tuple(VARIANTS)
    steps: int = 30
    warmup: int = 10
    memory_points: tuple[tuple[str, tuple[int, ...]], ...] = MEMORY_POINTS
    overrides: tuple[str, ...] = ()  # for every training run
    run_timeout: float = 1200.0  # seconds per training run


@dataclass
class Bench:
    """One run of the benchmark: its options, scratch folder, and the results so far (results.json)."""

    options: BenchOptions
    scratch: Path
    results: dict[str, Any] = field(default_factory=dict)
    _shards: dict[int, Path] = field(default_factory=dict)
    _runs: int = 0

    def shards(self, resolution: int) -> Path:
        """The shard set for `resolution`: --shards, or synthetic shards made once and shared by the stages."""
        if self.options.shards is not None:
            return self.options.shards
        if resolution not in self._shards:
            self._shards[resolution] = bench_data.synthetic_shards(
                self.scratch / f"shards-{resolution}", self.options.images, resolution, val_fraction=0.05)
        return self._shards[resolution]

    def run_dir(self) -> Path:
        """A new folder for one training run."""
        self._runs += 1
        return self.scratch / "runs" / str(self._runs)

    def stage_result(self, name: str) -> dict[str, Any]:
        return self.results["stages"].get(name, {}).get("result", {})

    def save(self) -> None:
        out = self.options.out
        atomic_write(out / "results.json", json.dumps(self.results, indent=1) + "\n")
        atomic_write(out / "report.md", render_report(self.results))


def run_benchmark(options: BenchOptions) -> int:
    """Runs the stages in order, recording each one's result or error; 0 if all succeeded, 1 if one failed, 130
    if interrupted (SIGINT or SIGTERM)."""
    results: dict[str, Any] = {"started": _now(), "options": json.loads(json.dumps(asdict(options), default=str)),
                               "stages": {}}
    with tempfile.TemporaryDirectory(prefix="bench-gpu-") as scratch, _sigterm_interrupts():
        bench = Bench(options, Path(scratch), results)
        try:
            for name in options.stages:
                _run_stage(bench, name)
        except KeyboardInterrupt:
            for name, record in results["stages"].items():
                if record["status"] == "running":
                    record["status"] = "interrupted"
                    print(f"bench gpu: {name} interrupted; {options.out / 'report.md'} holds what was measured",
                          file=sys.stderr)
            bench.save()
            return 130
    print(render_report(results))
    print(f"bench gpu: {options.out / 'report.md'}, {options.out / 'results.json'}", file=sys.stderr)
    return 0 if all(record["status"] == "ok" for record in results["stages"].values()) else 1


def _run_stage(bench: Bench, name: str) -> None:
    record: dict[str, Any] = {"status": "running", "result": {}}
    bench.results["stages"][name] = record
    print(f"bench gpu: {name} ...", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        STAGES[name](bench, record["result"])
        record["status"] = "ok"
    except Exception as exc:  # recorded; the next stage runs
        record |= {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
    finally:
        record["seconds"] = round(time.monotonic() - started, 1)
        bench.results["finished"] = _now()
    bench.save()
    print(f"bench gpu: {name} {record['status']} ({record['seconds']:.0f} s)"
          + (f": {_last_line(record['error'])}" if "error" in record else ""), file=sys.stderr, flush=True)
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """A job's time limit (SIGTERM) stops the benchmark like Ctrl-C: the running stage is recorded as interrupted.
    Processes forked meanwhile (loader workers) inherit the handler; they end as SIGTERM ends them by default."""
    benchmark = os.getpid()

    def interrupt(signum, frame):
        if os.getpid() == benchmark:
            raise KeyboardInterrupt
        signal.signal(signum, signal.SIG_DFL)
        os.kill(os.getpid(), signum)

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# --- the stages: each fills its result dict as it goes, so what a failing stage measured is kept ------------------


def env_stage(bench: Bench, result: dict[str, Any]) -> None:
    props = torch.cuda.get_device_properties(0)
    result |= {"date": _now(), "gpu": props.name, "capability": f"sm_{props.major}{props.minor}",
               "gpu_memory_mib": round(props.total_memory / 2**20), "driver": _driver_version(),
               "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
               "python": platform.python_version(), "cpus": os.cpu_count()}
    for module in ("nvidia.dali", "kornia", "accelerate"):
        try:
            result[module] = __import__(module, fromlist=["__version__"]).__version__
        except ImportError:
            result[module] = None
    result["matmul_bf16_tflops"] = matmul_tflops()


def _driver_version() -> str | None:
    try:
        process = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return process.stdout.strip().splitlines()[0] if process.returncode == 0 and process.stdout.strip() else None


def matmul_tflops(n: int = 8192, warmup: int = 3, repeats: int = 10) -> float:
    """TFLOP/s of an n×n by n×n bf16 matrix product on random data, timed with CUDA events after `warmup` calls."""
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(warmup):
        a @ b
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n**3 * repeats / (begin.elapsed_time(end) / 1e3) / 1e12


def color_stage(bench: Bench, result: dict[str, Any]) -> None:
    result["rows"] = rows = []
    for size in bench.options.color_sizes:
        images = bench_color.random_images(size, bench.options.color_megapixels)
        measured = bench_color.measure_gpu(images, min_time=0.5)
        rows.append({**asdict(measured), "copy_fraction": measured.copy_fraction,
                     "kornia_speedup": measured.kornia_speedup})


def data_stage(bench: Bench, result: dict[str, Any]) -> None:
    options = bench.options
    runs = bench_data.loader_runs(options.data_threads, on_gpu=torch.cuda.is_available())
    result |= {"batch_size": options.data_batch_size, "epochs": options.data_epochs,
               "loaders": [{"title": run.title, "threads": run.threads, "device": str(run.device)} for run in runs],
               "rows": [], "errors": []}
    for resolution in options.data_resolutions:
        shards = bench.shards(resolution)
        measured = []
        result["rows"].append({"resolution": resolution, "measured": measured})
        for run in runs:
            try:
                measured.append(bench_data.throughput(run.config(shards, resolution), run.device,
                                                      batch_size=options.data_batch_size, epochs=options.data_epochs))
            except Exception as exc:  # one loader that cannot run (no DALI, no nvJPEG) leaves the others' figures
                measured.append(None)
                result["errors"].append(f"{resolution}² {run.title}: {type(exc).__name__}: {exc}")


def train_stage(bench: Bench, result: dict[str, Any]) -> None:
    options = bench.options
    matmul = bench.stage_result("env").get("matmul_bf16_tflops")
    result |= {"steps": options.steps, "warmup": options.warmup, "overrides": list(options.overrides),
               "matmul_bf16_tflops": matmul, "rows": []}
    for config, batch in options.train_points:
        overrides = [f"train.batch_size={batch}", *options.overrides]
        cfg = load_training_config(config, overrides)
        shards = bench.shards(cfg.data.resolution)
        for variant in options.variants:
            row: dict[str, Any] = {"config": config, "resolution": cfg.data.resolution, "variant": variant}
            result["rows"].append(row)
            try:
                measured = run_variant(bench, variant, config, shards, overrides, options.steps, options.warmup)
            except bench_train.VariantError as exc:
                row["error"] = str(exc)
                continue
            row |= {"batch_size": measured.batch_size, "steps_per_s": measured.steps_per_s,
                    "images_per_s": measured.images_per_s, "data_wait": measured.data_wait,
                    "peak_memory_mib": measured.peak_memory_mib,
                    "mfu_measured": bench_train.mfu(cfg, measured.images_per_s, variant, matmul)
                    if matmul and "bf16" in variant else None,
                    "mfu_data_sheet": bench_train.mfu(cfg, measured.images_per_s, variant)}


def memory_stage(bench: Bench, result: dict[str, Any]) -> None:
    result |= {"variant": MEMORY_VARIANT, "gpu_memory_mib": bench.stage_result("env").get("gpu_memory_mib"),
               "rows": []}
    for config, batches in bench.options.memory_points:
        shards = bench.shards(load_training_config(config).data.resolution)
        for batch in batches:
            row: dict[str, Any] = {"config": config, "batch_size": batch}
            result["rows"].append(row)
            try:
                measured = run_variant(bench, MEMORY_VARIANT, config, shards,
                                       [f"train.batch_size={batch}", *bench.options.overrides], steps=4, warmup=1)
            except bench_train.VariantError as exc:
                row |= {"status": "OOM" if "out of memory" in str(exc).lower() else "failed", "error": str(exc)}
                continue
            row |= {"status": "ok", "peak_memory_mib": measured.peak_memory_mib}


def run_variant(bench: Bench, variant: str, config: str, shards: Path, overrides: Sequence[str], steps: int,
                warmup: int) -> bench_train.VariantResult:
    return bench_train.run_variant(variant, bench.run_dir(), config=config, shards=shards, overrides=overrides,
                                   steps=steps, warmup=warmup, timeout=bench.options.run_timeout)


# In the order they run; "env" first, the others chosen by --stages from names.GPU_STAGES (a test keeps them equal).
STAGES: dict[str, Callable[[Bench, dict[str, Any]], None]] = {
    "env": env_stage, "color": color_stage, "data": data_stage, "train": train_stage, "memory": memory_stage,
}


# --- the report ------------------------------------------------------------------------------------------------------


def render_report(results: dict[str, Any]) -> str:
    """report.md: the machine, each stage's status, and one table per stage that has results."""
    stages = results["stages"]
    options = results["options"]
    out = ["# `colorize-dist bench gpu`", "", f"Started {results['started']}; stages {', '.join(options['stages'])}; "
           f"training overrides `{' '.join(options['overrides']) or '(none)'}`.", ""]
    env = stages.get("env", {}).get("result")
    if env:
        out += [_table([[env.get("gpu"), env.get("gpu_memory_mib"), env.get("driver"), env.get("torch"),
                         env.get("cuda"), env.get("cudnn"), env.get("nvidia.dali"), env.get("python"), env.get("cpus"),
                         env.get("matmul_bf16_tflops")]],
                       ["GPU", "memory MiB", "driver", "torch", "CUDA", "cuDNN", "DALI", "Python", "CPUs",
                        "bf16 matmul TFLOP/s"], floatfmt=".0f"), ""]
    stage_rows = [[name, record["status"], record.get("seconds"), _last_line(record.get("error"))]
                  for name, record in stages.items()]
    out += ["## Stages", "", _table(stage_rows, ["stage", "status", "seconds", "error"], floatfmt=".0f")]
    for name, render in SECTIONS.items():
        if stages.get(name, {}).get("result", {}).get("rows"):
            out += ["", render(stages[name]["result"])]
    return "\n".join(out) + "\n"


def _color_section(r: dict[str, Any]) -> str:
    rows = [[f"{row['size']}²", row["batch"], row["ours_mp_s"], row["ours_gb_s"], row["copy_gb_s"],
             f"{row['copy_fraction']:.0%}", row["kornia_mp_s"], f"{row['kornia_speedup']:.1f}×", row["ours_err"],
             row["kornia_err"]] for row in r["rows"]]
    return (f"## RGB → Lab (`bench color`)\n\nGB/s count the uint8 RGB read and the float32 Lab written; the copy "
            f"moves as many bytes. Targets: ≥ {bench_color.COPY_TARGET:.0%} of the copy's rate, "
            f"≥ {bench_color.KORNIA_TARGET:.0f}× kornia.\n\n"
            + _table(rows, ["size", "images", "ours MP/s", "ours GB/s", "copy GB/s", "ours / copy", "kornia MP/s",
                            "ours / kornia", "ours max err", "kornia max err"],
                     floatfmt=("", "", ",.0f", ",.0f", ",.0f", "", ",.0f", "", ".2g", ".2g")))


def _data_section(r: dict[str, Any]) -> str:
    loaders = ", ".join(f"{loader['title']} {loader['threads']} threads on {loader['device']}"
                        for loader in r["loaders"])
    table = bench_data.throughput_table([loader["title"] for loader in r["loaders"]],
                                        [(row["resolution"], row["measured"]) for row in r["rows"]], tablefmt="github")
    errors = "".join(f"\n- {_last_line(error)}" for error in r["errors"])
    return (f"## Data loading (`bench data`)\n\nImages/s and CPU ms per image, batch {r['batch_size']}, "
            f"{r['epochs']} timed epoch(s) after a warm-up one; {loaders}.\n\n{table}"
            + (f"\n{errors}" if errors else ""))


def _train_section(r: dict[str, Any]) -> str:
    rows = [[row["config"], f"{row['resolution']}²", row.get("batch_size"), row["variant"], row.get("steps_per_s"),
             row.get("images_per_s"), row.get("data_wait"), row.get("peak_memory_mib"),
             _percent(row.get("mfu_measured")), _percent(row.get("mfu_data_sheet")), _last_line(row.get("error"))]
            for row in r["rows"]]
    return (f"## Training step (`bench train`)\n\n{r['steps']} steps per run, the first {r['warmup']} left out of the "
            f"rates; one process; overrides `{' '.join(r['overrides']) or '(none)'}`. MFU against the measured bf16 "
            "matrix product (bf16 variants) and against the data sheet's peak at the variant's precision.\n\n"
            + _table(rows, ["config", "resolution", "batch", "variant", "steps/s", "images/s", "data wait",
                            "peak MiB", "MFU (measured)", "MFU (data sheet)", "error"],
                     floatfmt=("", "", "", "", ".2f", ",.0f", ".3f", ",.0f")))


def _memory_section(r: dict[str, Any]) -> str:
    rows = [[row["config"], row["batch_size"], row.get("peak_memory_mib"), row["status"], _last_line(row.get("error"))]
            for row in r["rows"]]
    total = r.get("gpu_memory_mib")
    text = (f"## Peak memory per batch size\n\nA few `{r['variant']}` training steps per row (G and D, one "
            "process); the peak torch reserved plus the device memory outside torch (CUDA context, DALI's pool, "
            "nvJPEG)" + (f", of {total:,} MiB on the GPU" if total else "") + ".\n\n"
            + _table(rows, ["config", "batch", "peak MiB", "status", "error"], floatfmt=",.0f"))
    fits = memory_fits(r["rows"], total)
    if fits:
        text += (f"\n\nA straight line through each config's two batches, and the largest batch whose peak stays "
                 f"under {MEMORY_HEADROOM:.0%} of the GPU's memory:\n\n"
                 + _table(fits, ["config", "MiB per image", "fixed MiB", "largest batch"], floatfmt=",.0f"))
    return text


SECTIONS: dict[str, Callable[[dict[str, Any]], str]] = {
    "color": _color_section, "data": _data_section, "train": _train_section, "memory": _memory_section,
}


def memory_fits(rows: Sequence[dict[str, Any]], total_mib: float | None) -> list[list[Any]]:
    """Per config with two measured batches: [config, MiB per image, fixed MiB, largest batch under the headroom]."""
    fits = []
    for config in dict.fromkeys(row["config"] for row in rows):
        points = sorted((row["batch_size"], row["peak_memory_mib"]) for row in rows
                        if row["config"] == config and row["status"] == "ok" and row.get("peak_memory_mib"))
        if len(points) < 2 or points[0][0] == points[-1][0]:
            continue
        (b1, m1), (b2, m2) = points[0], points[-1]
        per_image = (m2 - m1) / (b2 - b1)
        fixed = m1 - per_image * b1
        largest = int((MEMORY_HEADROOM * total_mib - fixed) // per_image) if total_mib and per_image > 0 else None
        fits.append([config, per_image, fixed, largest])
    return fits


def _table(rows: Sequence[Sequence[Any]], headers: Sequence[str], floatfmt: str | Sequence[str] = "g") -> str:
    return tabulate(rows, headers, tablefmt="github", floatfmt=floatfmt, missingval="–")


def _percent(value: float | None) -> str | None:
    return None if value is None else f"{value:.1%}"


def _last_line(text: str | None) -> str:
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[-1].replace("|", "/")[:300] if lines else ""


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
