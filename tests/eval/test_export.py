"""Exported generators: exact round trip with config and resolution, run directories, one-line errors, starting
a run from one (`train.init_generator`), and ONNX export against PyTorch."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from colorize_dist import cli
from colorize_dist.color import AB_SCALE, L_SCALE, L_SHIFT, rgb_to_lab
from colorize_dist.config import ConfigError
from colorize_dist.data import synth_image
from colorize_dist.models import GeneratorConfig, build_generator
from colorize_dist.models.export import (
    ONNX_OPSET,
    GeneratorFileError,
    init_from_export,
    load_generator,
    load_onnx_generator,
    resolve_checkpoint,
    save_generator,
)
from tests.training.helpers import tiny_overrides, train_once


def test_round_trip_keeps_weights_config_and_resolution(tmp_path: Path):
    cfg = GeneratorConfig(ndims=4, depth=2, color_space="rgb", attention_gates=False)
    model = build_generator(cfg)
    path = tmp_path / "export" / "generator_final.safetensors"
    save_generator(model, cfg, 48, path)
    loaded, loaded_cfg, resolution = load_generator(path)
    assert (loaded_cfg, resolution, loaded.training) == (cfg, 48, False)
    for (name, expected), actual in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0, msg=name)
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind
    assert resolve_checkpoint(tmp_path) == path  # falls back to final when there is no best


def test_bad_files_give_one_line_naming_the_file(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=f"generator file {tmp_path / 'missing.safetensors'} does not exist"):
        load_generator(tmp_path / "missing.safetensors")
    corrupt = tmp_path / "corrupt.safetensors"
    corrupt.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(GeneratorFileError, match=f"{corrupt} is not a readable safetensors file"):
        load_generator(corrupt)
    with pytest.raises(FileNotFoundError, match=f"run directory {tmp_path} has no exported generator"):
        resolve_checkpoint(tmp_path)


def test_init_from_export_copies_weights_and_refuses_another_architecture(tmp_path: Path):
    cfg = GeneratorConfig(ndims=4, depth=2)
    torch.manual_seed(1)
    source = build_generator(cfg)
    save_generator(source, cfg, 32, tmp_path / "pretrain" / "export" / "generator_final.safetensors")
    target = build_generator(cfg)
    assert init_from_export(target, cfg, tmp_path / "pretrain") == tmp_path / "pretrain" / "export" / \
        "generator_final.safetensors"
    for expected, actual in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    wider = GeneratorConfig(ndims=8, depth=2)
    with pytest.raises(ConfigError, match=r"is another architecture \(ndims=4\); set model.generator to match"):
        init_from_export(build_generator(wider), wider, tmp_path / "pretrain")
    with pytest.raises(ConfigError, match=f"train.init_generator={tmp_path / 'nothing'}: run directory .* has no "):
        (tmp_path / "nothing").mkdir()
        init_from_export(target, cfg, tmp_path / "nothing")


def test_a_run_starts_from_init_generator_and_its_resume_does_not_need_it(shards: Path, tmp_path: Path):
    """Seed 002's CGAN + pretrained U-Net: G and its EMA start at the export; a resume takes the checkpoint."""
    cfg = GeneratorConfig(ndims=4, depth=2)  # tiny_overrides' generator
    torch.manual_seed(7)
    pretrained = build_generator(cfg)
    init_file = tmp_path / "unet.safetensors"
    save_generator(pretrained, cfg, 16, init_file)
    run_dir = tmp_path / "gan"
    overrides = tiny_overrides(shards, **{"train.max_steps": 1, "train.pretrain_steps": 0, "optim.lr": 1e-12,
                                          "train.init_generator": init_file, "train.validate_every": 100})
    first = train_once(run_dir, overrides)
    assert first.returncode == 0, first.stderr
    assert f"generator initialised from {init_file}" in first.stdout
    ema, _, _ = load_generator(run_dir / "export" / "generator_final.safetensors")  # one step at lr 1e-12
    for expected, actual in zip(pretrained.state_dict().values(), ema.state_dict().values(), strict=True):
        torch.testing.assert_close(actual, expected, rtol=0, atol=1e-8)

    init_file.unlink()
    resumed = train_once(run_dir, [*overrides, "train.max_steps=2"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from" in resumed.stdout and "initialised" not in resumed.stdout
    fresh = train_once(tmp_path / "fresh", overrides)
    assert fresh.returncode == 2
    assert fresh.stderr.strip() == (f"train: train.init_generator={init_file}: generator file {init_file} does not "
                                    "exist: pass a file written by training (RUN/export/generator_best.safetensors) "
                                    "or the run directory itself")


ONNX_TOLERANCE_AB = 0.01  # CIELAB ab units; measured 2e-4 here, 8e-4 for the default generator at 64²


@pytest.fixture(scope="module")
def onnx_file(generator_file: Path) -> Path:
    """`colorize-dist export --onnx RUN` of the small generator, written beside it."""
    assert cli.main(["export", "--onnx", str(generator_file.parents[1])]) == 0
    return generator_file.with_suffix(".onnx")


def test_onnx_equals_pytorch_on_three_sizes(generator_file: Path, onnx_file: Path):
    """Square at the resolution, wide and tall: the ONNX model's H and W are dynamic (multiples of 2^depth)."""
    onnx = pytest.importorskip("onnx")
    model, cfg, resolution = load_generator(generator_file)
    generator, onnx_cfg, onnx_resolution = load_onnx_generator(onnx_file)
    assert (onnx_cfg, onnx_resolution) == (cfg, resolution)
    for index, (height, width) in enumerate([(32, 32), (32, 48), (64, 24)]):
        rgb = np.array(Image.fromarray(synth_image(20 + index, 64)).resize((width, height), Image.BILINEAR))
        l = rgb_to_lab(torch.from_numpy(rgb)[None])[:, :1] * L_SCALE + L_SHIFT
        with torch.no_grad():
            expected = model(l)
        produced = generator(l)
        assert produced.shape == expected.shape == (1, 2, height, width)
        assert (produced - expected).abs().max().item() / AB_SCALE <= ONNX_TOLERANCE_AB
    proto = onnx.load(str(onnx_file))
    assert [opset.version for opset in proto.opset_import if opset.domain == ""] == [ONNX_OPSET]
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    assert [bool(dim.dim_param) for dim in dims] == [True, False, True, True]  # N, 1, H, W
    metadata = {prop.key: prop.value for prop in proto.metadata_props}
    assert metadata["opset"] == str(ONNX_OPSET) and metadata["source"] == str(generator_file)
    assert float(metadata["max_abs_delta_vs_pytorch"].split()[0]) <= ONNX_TOLERANCE_AB


def test_export_reports_opset_and_difference(generator_file: Path, onnx_file: Path, capsys: pytest.CaptureFixture):
    out = onnx_file.with_name("again.onnx")
    assert cli.main(["export", "--onnx", str(generator_file), "--out", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"export: wrote {out} (ONNX opset {ONNX_OPSET}; ") and "32×32, 32×48, 48×16" in line
    assert float(line.split("max |Δ| ")[1].split()[0]) <= ONNX_TOLERANCE_AB and line.endswith("CIELAB ab units")


def test_colorize_with_onnx_matches_pytorch(generator_file: Path, onnx_file: Path, tmp_path: Path):
    source = tmp_path / "photo.png"
    Image.fromarray(synth_image(9, 300)).resize((450, 300), Image.BILINEAR).save(source)
    for flag, model in [("--checkpoint", generator_file), ("--onnx", onnx_file)]:
        assert cli.main(["colorize", flag, str(model), str(source), "--out", str(tmp_path / flag[2:])]) == 0
    with Image.open(tmp_path / "checkpoint" / "photo.png") as a, Image.open(tmp_path / "onnx" / "photo.png") as b:
        difference = np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))
    # A 2e-4 ab difference changes the 8-bit rounding of 0.02 % of the pixels here, by 1, and by up to 3 where the
    # gamut mapping's chroma bisection sits on the sRGB boundary.
    assert (difference > 0).any(axis=2).mean() < 1e-3 and difference.max() <= 5


def test_missing_onnxruntime_and_bad_onnx_files_are_one_line(generator_file: Path, onnx_file: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture,
                                                           monkeypatch: pytest.MonkeyPatch):
    source = tmp_path / "photo.png"
    Image.fromarray(synth_image(9, 40)).save(source)
    not_onnx = tmp_path / "model.onnx"
    not_onnx.write_bytes(b"not a model")
    assert cli.main(["colorize", "--onnx", str(not_onnx), str(source), "--out", str(tmp_path / "out")]) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and line.startswith(f"colorize: {not_onnx} is not a readable ONNX model")
    assert cli.main(["colorize", "--onnx", str(generator_file), str(source), "--out", str(tmp_path / "out")]) == 2
    assert "is not a readable ONNX model" in capsys.readouterr().err

    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # what `import onnxruntime` finds when it is not installed
    assert cli.main(["colorize", "--onnx", str(onnx_file), str(source), "--out", str(tmp_path / "out")]) == 2
    assert cli.main(["export", "--onnx", str(generator_file), "--out", str(tmp_path / "x.onnx")]) == 2
    for line in capsys.readouterr().err.strip().split("\n"):
        assert "onnxruntime is not installed: pip install 'colorize-dist[onnx]'" in line
    assert not (tmp_path / "x.onnx").exists()


def test_onnx_runs_on_this_ranks_gpu(onnx_file: Path, monkeypatch: pytest.MonkeyPatch):
    """`colorize --onnx` on the rank of cuda:3 gives onnxruntime's CUDA provider that GPU (without device_id every
    rank runs on GPU 0). Recorded here, where the session itself is made on the CPU."""
    ort = pytest.importorskip("onnxruntime")
    make_session, requested = ort.InferenceSession, []

    def recorded_session(path, providers):
        requested.append(providers)
        return make_session(path, providers=["CPUExecutionProvider"])

    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"])
    monkeypatch.setattr(ort, "InferenceSession", recorded_session)
    load_onnx_generator(onnx_file, device=torch.device("cuda", 3))
    load_onnx_generator(onnx_file, device="cpu")
    assert requested == [[("CUDAExecutionProvider", {"device_id": 3}), "CPUExecutionProvider"],
                         ["CPUExecutionProvider"]]
