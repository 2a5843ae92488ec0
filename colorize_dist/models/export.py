"""Exported generators: one `.safetensors` file holding the weights, the generator config and the resolution;
and `colorize-dist export --onnx RUN`, the same generator as an ONNX model for onnxruntime.

Everything needed to rebuild the model travels inside the file, in the safetensors header's string metadata
(no sidecar file to lose when copying it):

    "format":           "colorize_dist.generator/1"
    "generator_config": JSON of `dataclasses.asdict(GeneratorConfig)`
    "resolution":       the training resolution (side of the square crops), as a decimal string

A training run writes `RUN/export/generator_final.safetensors` and `RUN/export/generator_best.safetensors`
(EMA weights); `resolve_checkpoint` maps a run directory to the best one (falling back to final), and
`init_from_export` starts another run's generator from it (`train.init_generator`).

ONNX (`export_onnx`, the `onnx` extra): torch's dynamo exporter at opset 18, input "l" (N, 1, H, W)
normalised L, output "color" (N, 2 or 3, H, W); N, H and W are dynamic, H and W multiples of 2^depth from
2·2^depth up. The file's metadata repeats the safetensors fields and adds the opset, the size multiple, the
source file and its SHA-256, and the largest |Δ| between onnxruntime and PyTorch measured at export (CIELAB
ab units for an ab generator) on three inputs, one square at the resolution and two non-square; an export
over 0.05 is refused, nothing written.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from colorize_dist.color import AB_SCALE
from colorize_dist.config import ConfigError
from colorize_dist.errors import UserError
from colorize_dist.files import atomic_path, first_line, sha256_of
from colorize_dist.models.config import GeneratorConfig
from colorize_dist.models.generator import build_generator

FORMAT = "colorize_dist.generator/1"
ONNX_FORMAT = "colorize_dist.generator.onnx/1"
ONNX_OPSET = 18
ONNX_TOLERANCE = 0.05  # largest |Δ| accepted at export, in output units (CIELAB ab: 1/20 of a just-noticeable ΔE)
ONNX_MAX_SIDE = 16384  # the dynamic height and width go up to this many pixels
ONNX_EXTRA_HINT = "pip install 'colorize-dist[onnx]' (onnx, onnxscript and onnxruntime; onnxruntime-gpu for CUDA)"
# Output units of the |Δ| check: CIELAB ab units for ab (×110), 8-bit levels for rgb ((x + 1)/2 · 255).
_UNITS = {"ab": (1.0 / AB_SCALE, "CIELAB ab units"), "rgb": (127.5, "8-bit RGB levels")}
EXPORT_DIR = "export"
EXPORT_NAMES = ("generator_best.safetensors", "generator_final.safetensors")  # preference order in a run dir


class GeneratorFileError(UserError, ValueError):
    """A generator file that exists but cannot be used; the message names the file and what to do."""


def save_generator(model: nn.Module, cfg: GeneratorConfig, resolution: int, path: str | Path) -> None:
    """Write `model`'s weights with `cfg` and `resolution` to `path`, atomically (temporary file, then rename).

    Pass the bare module (e.g. `accelerator.unwrap_model(g)` or the EMA copy), not a DDP/compiled wrapper,
    so that the keys match `build_generator(cfg)`. Call it on one rank only: it is a plain file write.
    """
    state = {name: tensor.detach().to("cpu").contiguous() for name, tensor in model.state_dict().items()}
    metadata = {"format": FORMAT, "generator_config": json.dumps(dataclasses.asdict(cfg)),
                "resolution": str(int(resolution))}
    with atomic_path(path) as temporary:
        save_file(state, temporary, metadata=metadata)


def load_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[nn.Module, GeneratorConfig, int]:
    """(generator in eval mode on `device`, its config, its training resolution) from a `save_generator` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generator file {path} does not exist: pass a file written by training "
                                f"(RUN/{EXPORT_DIR}/{EXPORT_NAMES[0]}) or the run directory itself")
    try:
        with safe_open(path, framework="pt", device="cpu") as file:
            metadata = file.metadata() or {}
            state = {name: file.get_tensor(name) for name in file.keys()}  # noqa: SIM118 (not a dict)
    except (SafetensorError, OSError) as exc:
        raise GeneratorFileError(f"{path} is not a readable safetensors file ({exc}); re-export it from "
                                 "its training run or copy it again") from None
    if metadata.get("format") != FORMAT:
        raise GeneratorFileError(f"{path} was not written by save_generator (format {metadata.get('format')!r}, "
                                 f"expected {FORMAT!r}); export the generator with colorize_dist.models.export")
    try:
        cfg = GeneratorConfig(**json.loads(metadata["generator_config"]))
        resolution = int(metadata["resolution"])
        model = build_generator(cfg)
        model.load_state_dict(state)
    except (KeyError, TypeError, ValueError, ConfigError, RuntimeError) as exc:
        raise GeneratorFileError(f"{path}: its generator config or weights do not fit this version of "
                                 f"colorize_dist ({first_line(exc)}); re-export it with this version") from None
    return model.to(device).eval(), cfg, resolution


def resolve_checkpoint(run_or_file: str | Path) -> Path:
    """A generator file given itself or its run directory (→ export/generator_best, else generator_final)."""
    path = Path(run_or_file)
    if not path.is_dir():
        return path
    for name in EXPORT_NAMES:
        candidate = path / EXPORT_DIR / name
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"run directory {path} has no exported generator ({' or '.join(EXPORT_NAMES)} "
                            f"in {path / EXPORT_DIR}); train until the first export, or pass a .safetensors file")


def init_from_export(model: nn.Module, cfg: GeneratorConfig, run_or_file: str | Path) -> Path:
    """Copy an exported generator's weights into `model`, a `build_generator(cfg)`; returns the file used.

    For `train.init_generator`: e.g. a GAN run started from a U-Net trained without the discriminator (seed
    002's best variant). `run_or_file` is a file or a run directory (its best export, else its final one).
    The file's generator config must equal `cfg`; any problem is a ConfigError of one line.
    """
    setting = f"train.init_generator={run_or_file}"
    try:
        path = resolve_checkpoint(run_or_file)
        loaded, loaded_cfg, _ = load_generator(path)
    except (FileNotFoundError, GeneratorFileError) as exc:
        raise ConfigError(f"{setting}: {first_line(exc)}") from None
    if loaded_cfg != cfg:
        differences = ", ".join(f"{field.name}={getattr(loaded_cfg, field.name)!r}"
                                for field in dataclasses.fields(cfg)
                                if getattr(loaded_cfg, field.name) != getattr(cfg, field.name))
        raise ConfigError(f"{setting}: {path} is another architecture ({differences}); set model.generator "
                          "to match it")
    model.load_state_dict(loaded.state_dict())
    return path


@dataclass(frozen=True)
class OnnxExport:
    path: Path
    opset: int
    max_delta: float  # largest |onnxruntime − PyTorch| over the checked inputs, in `unit`
    unit: str
    sizes: tuple[tuple[int, int], ...]  # the (height, width) checked
    size_multiple: int  # height and width must be multiples of it


class OnnxGenerator:
    """An exported ONNX generator run by onnxruntime, called as the PyTorch one: normalised L (N, 1, H, W) → colour.

    It runs on CUDA when `device` is a GPU and this onnxruntime has CUDA (onnxruntime-gpu), else on the CPU."""

    def __init__(self, path: str | Path, device: torch.device | str = "cpu"):
        ort = _onnxruntime()
        device = torch.device(device)
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            # This rank's GPU: without device_id onnxruntime puts every process on GPU 0.
            index = device.index if device.index is not None else torch.cuda.current_device()
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": index}))
        try:
            self.session = ort.InferenceSession(str(path), providers=providers)
        except Exception as exc:  # onnxruntime raises its own exception types, not exported in one place
            raise GeneratorFileError(f"{path} is not a readable ONNX model ({first_line(exc)}); export it again "
                                     "with `colorize-dist export --onnx RUN`") from None
        self.metadata = self.session.get_modelmeta().custom_metadata_map
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, l: torch.Tensor) -> torch.Tensor:
        color = self.session.run(None, {self.input_name: l.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(color).to(l.device)


def load_onnx_generator(path: str | Path, device: torch.device | str = "cpu") -> tuple[OnnxGenerator,
                                                                                       GeneratorConfig, int]:
    """(generator, its config, its training resolution) from an `export_onnx` file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ONNX model {path} does not exist: write one with `colorize-dist export --onnx RUN`")
    generator = OnnxGenerator(path, device)
    if generator.metadata.get("format") != ONNX_FORMAT:
        raise GeneratorFileError(f"{path} was not written by `colorize-dist export --onnx` (format "
                                 f"{generator.metadata.get('format')!r}, expected {ONNX_FORMAT!r}); export it again")
    try:
        cfg = GeneratorConfig(**json.loads(generator.metadata["generator_config"]))
        resolution = int(generator.metadata["resolution"])
    except (KeyError, TypeError, ValueError) as exc:
        raise GeneratorFileError(f"{path}: its generator config does not fit this version of colorize_dist "
                                 f"({first_line(exc)}); export it again with this version") from None
    return generator, cfg, resolution


def check_sizes(cfg: GeneratorConfig, resolution: int) -> tuple[tuple[int, int], ...]:
    """The (height, width) the export is checked on: the resolution square, one wider and one taller."""
    multiple = 2**cfg.depth
    wide = -(-resolution * 3 // 2 // multiple) * multiple
    short = max(2 * multiple, resolution // 2 // multiple * multiple)
    return (resolution, resolution), (resolution, wide), (wide, short)


def export_onnx(source: str | Path, out: str | Path, opset: int = ONNX_OPSET) -> OnnxExport:
    """Write the generator of `source` (a save_generator file) as ONNX to `out`, atomically, once its outputs
    match PyTorch's within ONNX_TOLERANCE on `check_sizes`; GeneratorFileError (nothing written) otherwise."""
    source, out = Path(source), Path(out)
    ort, onnx = _onnxruntime(), _onnx()
    model, cfg, resolution = load_generator(source)
    multiple = 2**cfg.depth
    sides = {axis: torch.export.Dim(f"{axis}_blocks", min=2, max=ONNX_MAX_SIDE // multiple) for axis in ("h", "w")}
    dynamic = {0: torch.export.Dim("batch", min=1, max=4096), 2: multiple * sides["h"], 3: multiple * sides["w"]}
    example = torch.zeros(1, 1, resolution, resolution)
    program = torch.onnx.export(model, (example,), input_names=["l"], output_names=["color"], opset_version=opset,
                                dynamo=True, dynamic_shapes=(dynamic,), verbose=False)
    proto = program.model_proto
    scale, unit = _UNITS[cfg.color_space]
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(0)
    max_delta = 0.0
    sizes = check_sizes(cfg, resolution)
    for height, width in sizes:
        l = torch.rand(2, 1, height, width, generator=generator) * 2 - 1
        with torch.no_grad():
            expected = model(l).numpy()
        produced = session.run(None, {"l": l.numpy()})[0]
        max_delta = max(max_delta, float(np.abs(produced - expected).max()) * scale)
    if not max_delta <= ONNX_TOLERANCE:
        raise GeneratorFileError(f"the ONNX model of {source} differs from PyTorch by up to {max_delta:.3g} {unit} "
                                 f"(tolerance {ONNX_TOLERANCE}); nothing written — report it with the versions of "
                                 "torch and onnxruntime")
    metadata = {"format": ONNX_FORMAT, "generator_config": json.dumps(dataclasses.asdict(cfg)),
                "resolution": str(resolution), "opset": str(opset), "size_multiple": str(multiple),
                "source": str(source), "source_sha256": sha256_of(source),
                "max_abs_delta_vs_pytorch": f"{max_delta:.6g} {unit}", "exporter": f"torch {torch.__version__} dynamo"}
    onnx.helper.set_model_props(proto, metadata)
    proto.doc_string = (f"colorize_dist generator: input l (N, 1, H, W) = L/50 − 1, output color (N, "
                        f"{cfg.out_channels}, H, W) {cfg.color_space} in (−1, 1); H, W multiples of {multiple}")
    with atomic_path(out) as temporary:
        onnx.save_model(proto, str(temporary))
    return OnnxExport(path=out, opset=opset, max_delta=max_delta, unit=unit, sizes=sizes, size_multiple=multiple)


def _onnxruntime():
    try:
        import onnxruntime
    except ModuleNotFoundError:
        raise ModuleNotFoundError(f"onnxruntime is not installed: {ONNX_EXTRA_HINT}") from None
    return onnxruntime


def _onnx():
    try:
        import onnx
        import onnxscript  # noqa: F401 (torch's dynamo exporter needs it)
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"{exc.name} is not installed: {ONNX_EXTRA_HINT}") from None
    return onnx
