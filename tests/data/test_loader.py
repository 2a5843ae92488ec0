"""Loaders: DALI and reference agree, every key once per epoch over ranks, exact resume, clear errors."""

from __future__ import annotations

import io
import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import webdataset as wds
from PIL import Image

from colorize_dist.color import rgb_to_l_ab
from colorize_dist.config import ConfigError, load_config
from colorize_dist.data import DataConfig, ManifestError, MissingShardsError, build_loader, first_batch
from colorize_dist.data.reading import ShardReader
from tests.data.helpers import needs_dali, run_cli

BACKENDS = [pytest.param("dali", marks=needs_dali), "reference"]


def all_keys(shards: Path, split: str) -> list[str]:
    manifest = json.loads((shards / "manifest.json").read_text())
    return [f"{Path(entry['file']).stem}/{sample['__key__']}"
            for entry in manifest["splits"][split]["shards"]
            for sample in wds.DataPipeline(wds.SimpleShardList([str(shards / entry["file"])]),
                                           wds.tarfile_to_samples())]


def stored_images(shards: Path, split: str) -> dict[str, np.ndarray]:
    images = {}
    for tar in sorted((shards / split).glob("*.tar")):
        for sample in wds.DataPipeline(wds.SimpleShardList([str(tar)]), wds.tarfile_to_samples()):
            extension = next(ext for ext in ("png", "jpg", "jpeg") if ext in sample)
            with Image.open(io.BytesIO(sample[extension])) as image:
                images[f"{tar.stem}/{sample['__key__']}"] = np.asarray(image.convert("RGB"))
    return images


def epoch_samples(loader, epoch: int, start: int = 0) -> tuple[list[str], list[bool], list[torch.Tensor]]:
    keys, valid, ab = [], [], []
    for batch in loader.epoch(epoch, start):
        assert batch.l.shape == (len(batch.keys), 1, 24, 24) and batch.ab.shape == (len(batch.keys), 2, 24, 24)
        keys += batch.keys
        valid += batch.valid.tolist()
        ab += list(batch.ab)
    return keys, valid, ab


@pytest.mark.parametrize("backend", BACKENDS)
def test_val_batches_are_the_stored_images(synth_shards, backend):
    """Lossless shards at the loader's resolution: (l, ab) are exactly those of the stored pixels."""
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend)
    stored = stored_images(synth_shards, "val")
    seen = 0
    for batch in build_loader(cfg, "val", batch_size=4).epoch(0):
        rgb = torch.from_numpy(np.stack([stored[key] for key in batch.keys]))
        l, ab = rgb_to_l_ab(rgb)
        assert torch.equal(batch.l, l) and torch.equal(batch.ab, ab)
        seen += int(batch.valid.sum())
    assert seen == len(stored)


@needs_dali
def test_dali_and_reference_agree_on_jpeg(tmp_path):
    out = tmp_path / "jpeg"
    assert run_cli("shards", "synth", out, "--n", 12, "--resolution", 40, "--val-fraction", 0.5,
                   "--quality", 90, "--workers", 1) == 0
    batches = {}
    for backend in ("dali", "reference"):
        cfg = DataConfig(shards=str(out), resolution=40, backend=backend)
        batches[backend] = {key: (batch.l[i], batch.ab[i])
                            for batch in build_loader(cfg, "val", batch_size=5).epoch(0)
                            for i, key in enumerate(batch.keys)}
    assert batches["dali"].keys() == batches["reference"].keys()
    for key, (l, ab) in batches["dali"].items():
        ref_l, ref_ab = batches["reference"][key]
        assert (l - ref_l).abs().max() * 50 <= 1.0  # JPEG decoders may round IDCT differently
        assert (ab - ref_ab).abs().max() * 110 <= 2.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("world_size", [1, 3])
def test_each_key_once_per_epoch_over_ranks(synth_shards, backend, world_size):
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, shuffle_buffer=8)
    expected = all_keys(synth_shards, "train")
    assert len(expected) % (world_size * 4) != 0  # padding is exercised
    real, counts = [], set()
    for rank in range(world_size):
        loader = build_loader(cfg, "train", batch_size=4, rank=rank, world_size=world_size, seed=3)
        keys, valid, _ = epoch_samples(loader, epoch=1)
        assert len(keys) == loader.batches_per_epoch * 4
        real += [key for key, ok in zip(keys, valid, strict=True) if ok]
        assert set(keys) <= set(expected)
        counts.add(loader.batches_per_epoch)
    assert sorted(real) == sorted(expected)
    assert len(counts) == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_yields_exactly_the_remaining_batches(synth_shards, backend):
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, shuffle_buffer=16)
    loader = build_loader(cfg, "train", batch_size=4, rank=1, world_size=2, seed=7)
    keys, valid, ab = epoch_samples(loader, epoch=2)
    again, _, _ = epoch_samples(build_loader(cfg, "train", batch_size=4, rank=1, world_size=2, seed=7), epoch=2)
    other_epoch, _, _ = epoch_samples(loader, epoch=3)
    assert keys == again and keys != other_epoch  # (seed, epoch) fix the order; each epoch has its own
    resumed_keys, resumed_valid, resumed_ab = epoch_samples(loader, epoch=2, start=16)  # 2 global batches of 8
    assert resumed_keys == keys[8:] and resumed_valid == valid[8:]
    assert all(torch.equal(a, b) for a, b in zip(resumed_ab, ab[8:], strict=True))  # same crops and flips
    assert epoch_samples(loader, epoch=2, start=loader.samples)[0] == []
    with pytest.raises(ValueError, match="start must be in"):
        next(loader.epoch(2, start=loader.samples + 1))


def _distributed_epoch(rank: int, world_size: int, port: int, shards: str, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        cfg = DataConfig(shards=shards, resolution=24, num_threads=1, shuffle_buffer=8)
        loader = build_loader(cfg, "train", batch_size=5, rank=rank, world_size=world_size, seed=11)
        keys = [key for batch in loader.epoch(0) for key, ok in zip(batch.keys, batch.valid.tolist(), strict=True)
                if ok]
        gathered = [None] * world_size
        dist.all_gather_object(gathered, (loader.batches_per_epoch, keys))
        if rank == 0:
            results.put(gathered)
    finally:
        dist.destroy_process_group()


def test_two_processes_see_every_key_once(synth_shards):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    context = mp.get_context("spawn")
    results = context.SimpleQueue()
    mp.start_processes(_distributed_epoch, args=(2, port, str(synth_shards), results), nprocs=2,
                       start_method="spawn")
    (batches0, keys0), (batches1, keys1) = results.get()
    assert batches0 == batches1
    assert not set(keys0) & set(keys1)
    assert sorted(keys0 + keys1) == sorted(all_keys(synth_shards, "train"))


def test_missing_shards_give_clear_errors(synth_shards, tmp_path):
    cfg = DataConfig(shards=str(tmp_path / "nowhere"), backend="reference")
    with pytest.raises(MissingShardsError, match="nowhere does not exist; make one with `colorize-dist shards"):
        build_loader(cfg, "train", batch_size=2)
    broken = tmp_path / "broken"
    shutil.copytree(synth_shards, broken)
    (broken / "train" / "train-000001.tar").unlink()
    cfg.shards = str(broken)
    with pytest.raises(MissingShardsError, match=r"shard file .*train-000001.tar listed in .* is missing"):
        build_loader(cfg, "train", batch_size=2)
    (broken / "manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="is not a valid shard manifest"):
        build_loader(cfg, "train", batch_size=2)
    (broken / "manifest.json").unlink()
    with pytest.raises(MissingShardsError, match=r"manifest.json is missing \(an interrupted `shards make`\?\)"):
        build_loader(cfg, "val", batch_size=2)
    with pytest.raises(ValueError, match=r"data\.shards is not set"):
        build_loader(DataConfig(), "train", batch_size=2)


def test_config_validation(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("data:\n  resolution: 128\n  crop_scale: [0.5, 1.0]\n")
    cfg = load_config(DataConfig, path, ["backend=reference"], section="data")
    assert (cfg.resolution, cfg.crop_scale, cfg.backend) == (128, [0.5, 1.0], "reference")
    with pytest.raises(ConfigError, match=r"data\.backend must be one of auto, dali, reference"):
        load_config(DataConfig, overrides=["backend=opencv"])
    with pytest.raises(ConfigError, match=r"data\.crop_scale must be \[min, max\]"):
        load_config(DataConfig, overrides=["crop_scale=[0.9,0.2]"])


# ---------------------------------------------------------------- pipelines built once, exact resume, one geometry

def epoch_keys_and_ab(loader, epoch: int, start: int = 0) -> tuple[list[str], torch.Tensor]:
    keys, ab = [], []
    for batch in loader.epoch(epoch, start):
        keys += batch.keys
        ab.append(batch.ab)
    return keys, torch.cat(ab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_loader_serves_every_epoch_and_validation_as_fresh_ones_would(synth_shards, backend):
    """The order contract with a reused pipeline: epoch e of a long-lived loader == epoch e of a new loader."""
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, shuffle_buffer=8)
    with build_loader(cfg, "train", batch_size=4, rank=1, world_size=2, seed=5) as loader, \
            build_loader(cfg, "val", batch_size=4) as val_loader:
        passes = [epoch_keys_and_ab(val_loader, 0)]
        for epoch in range(3):
            keys, ab = epoch_keys_and_ab(loader, epoch)
            with build_loader(cfg, "train", batch_size=4, rank=1, world_size=2, seed=5) as fresh:
                fresh_keys, fresh_ab = epoch_keys_and_ab(fresh, epoch)
            assert keys == fresh_keys and torch.equal(ab, fresh_ab)
            passes.append(epoch_keys_and_ab(val_loader, 0))
        assert all(keys == passes[0][0] and torch.equal(ab, passes[0][1]) for keys, ab in passes)
        if backend == "dali":  # built once each; consecutive epochs and passes flowed without dropping a batch
            assert (loader.source.builds, val_loader.source.builds) == (1, 1)
            assert (loader.source.dropped, val_loader.source.dropped) == (0, 0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_reads_nothing_before_its_start_batch(synth_shards, backend, monkeypatch):
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, num_threads=1, prefetch=1)
    with build_loader(cfg, "train", batch_size=4, seed=2) as loader:
        expected = epoch_keys_and_ab(loader, 3)
        batches = loader.batches_per_epoch
    reads = []
    original = ShardReader.read
    monkeypatch.setattr(ShardReader, "read",
                        lambda self, shard, samples: reads.extend(samples) or original(self, shard, samples))
    start = (batches - 2) * 4
    with build_loader(cfg, "train", batch_size=4, seed=2) as loader:
        keys, ab = epoch_keys_and_ab(loader, 3, start)
    assert keys == expected[0][start:] and torch.equal(ab, expected[1][start:])
    # Only the two batches resumed, plus what DALI's pipeline and read-ahead queue take of the next epoch (the
    # reference loader stops at the epoch's end); replaying would read `start` samples.
    read_ahead = 2 * cfg.prefetch + 1 if backend == "dali" else 0
    assert len(reads) <= (2 + read_ahead) * 4 < start


def test_dali_and_reference_cut_the_same_training_crops(synth_shards):
    """Same order, same flips, same boxes: only the resize implementations (PIL, torch) differ, by rounding."""
    results = {}
    for backend in ("dali", "reference"):
        cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, shuffle_buffer=8)
        with build_loader(cfg, "train", batch_size=4, seed=9) as loader:
            results[backend] = epoch_keys_and_ab(loader, 1)
    assert results["dali"][0] == results["reference"][0]
    difference = (results["dali"][1] - results["reference"][1]).abs() * 110  # in ab units
    # ±1 in RGB where the resizes round differently (a few ab units in the darkest pixels, where Lab is steep)
    assert difference.mean() < 0.05 and (difference > 1.0).float().mean() < 0.005


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_batch_closes_its_loader_and_loaders_say_what_decodes(synth_shards, backend, monkeypatch):
    source_class = type(build_loader(DataConfig(shards=str(synth_shards), resolution=24, backend=backend), "val",
                                     batch_size=4).source)
    closed = []
    original = source_class.close
    monkeypatch.setattr(source_class, "close", lambda self: closed.append(self) or original(self))
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend)
    batch = first_batch(cfg, "val", batch_size=3)
    assert batch.l.shape == (3, 1, 24, 24) and len(closed) == 1
    description = build_loader(cfg, "val", batch_size=3).describe()
    assert description.startswith("DALI 2." if backend == "dali" else "reference loader: PIL decodes")
    if backend == "dali":
        assert "on the CPU" in description


@needs_dali
def test_gpu_decoding_says_which_images_cannot_use_the_hardware_decoder(synth_shards):
    """Checked without a GPU: the notes come from the shards (PNG here), not from the device."""
    from colorize_dist.data.dali import DaliSource

    cfg = DataConfig(shards=str(synth_shards), resolution=24)
    loader = build_loader(cfg, "val", batch_size=4)
    on_gpu = DaliSource(loader.source.reading, loader.layout, cfg, device=torch.device("cuda", 0))
    assert "mixed: baseline JPEGs on the hardware decoder" in on_gpu.describe()
    assert "resize and flip on the device" in on_gpu.describe()
    (note,) = on_gpu.gpu_notes()
    assert note.startswith(f"{loader.samples} of this split's images are PNG or WebP, which DALI decodes on the CPU")
    assert loader.source.gpu_notes() == []


# Reads epoch after epoch (each starts new DataLoader workers) while stop signals hit the whole process group, as
# Slurm sends them; this process takes them as stop requests, as the trainer does.
SIGNALLED_EPOCHS_SCRIPT = """
import os, signal, sys, threading, time
from colorize_dist.data.config import DataConfig
from colorize_dist.data.loader import build_loader

stops = []
for sig in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(sig, lambda signum, frame: stops.append(signum))
done = threading.Event()

def signal_the_job():
    while not done.is_set():
        os.killpg(0, signal.SIGTERM)
        time.sleep(0.002)

threading.Thread(target=signal_the_job, daemon=True).start()
cfg = DataConfig(shards=sys.argv[1], resolution=24, backend="reference", num_threads=2)
with build_loader(cfg, "train", batch_size=4) as loader:
    for epoch in range(int(sys.argv[2])):
        assert sum(1 for _ in loader.epoch(epoch)) == loader.batches_per_epoch
done.set()
print(f"{len(stops)} stop signals", flush=True)
"""


def test_stop_signals_while_workers_start_never_kill_a_worker(synth_shards: Path) -> None:
    """A worker ignores the job's stop signals from its first instruction on, not only after it has started."""
    result = subprocess.run([sys.executable, "-c", SIGNALLED_EPOCHS_SCRIPT, str(synth_shards), "20"],
                            capture_output=True, text=True, timeout=300, start_new_session=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.split()[0]) > 0


# ---------------------------------------------------------------- one global order, the device graph on the CPU

def global_batches(cfg: DataConfig, world_size: int, micro: int, global_batch: int, epoch: int,
                   start: int = 0) -> list[dict[str, torch.Tensor]]:
    """Each optimizer step's real samples over all ranks, {key: ab}, as `world_size` ranks read them."""
    loaders = [build_loader(cfg, "train", batch_size=micro, global_batch=global_batch, rank=rank,
                            world_size=world_size, seed=4) for rank in range(world_size)]
    steps: dict[int, dict[str, torch.Tensor]] = {}
    for loader in loaders:
        with loader:
            for batch in loader.epoch(epoch, start):
                step = steps.setdefault(batch.slots.step_start, {})
                for key, ok, ab in zip(batch.keys, batch.valid.tolist(), batch.ab, strict=True):
                    if ok:
                        assert key not in step
                        step[key] = ab
    return [steps[start] for start in sorted(steps)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_global_batch_holds_the_same_samples_and_crops_for_any_number_of_ranks(synth_shards, backend):
    """1 rank × 12, 3 ranks × 2 × 2 micro-batches, 2 ranks × 6: the same global batches of the same crops, from
    the epoch's start and from a resumed sample that is no multiple of the batch (a resume at another batch)."""
    cfg = DataConfig(shards=str(synth_shards), resolution=24, backend=backend, shuffle_buffer=8)
    for start in (0, 5):
        one = global_batches(cfg, 1, 12, 12, epoch=1, start=start)
        assert sum(map(len, one)) == len(all_keys(synth_shards, "train")) - start
        for world_size, micro in ((3, 2), (2, 6)):
            other = global_batches(cfg, world_size, micro, 12, epoch=1, start=start)
            assert [step.keys() for step in other] == [step.keys() for step in one]
            for step, reference in zip(other, one, strict=True):
                assert all(torch.equal(step[key], reference[key]) for key in step)
    # The order is the epoch's whatever the batch: a batch of 5 from sample 5 reads what a batch of 12 read.
    by_five = global_batches(cfg, 1, 5, 5, epoch=1, start=5)
    assert [key for step in by_five for key in step] == [key for step in one for key in step]


@needs_dali
def test_the_device_graph_run_on_the_cpu_cuts_the_reference_loaders_boxes(tmp_path):
    """The GPU path's graph (window decode → DALI resize → flip, one dense batch) built on the CPU: the same samples
    in the same order as the reference loader, each image the reference's crop up to the two resize filters."""
    from colorize_dist.data.dali import DaliSource

    shards = tmp_path / "jpeg"
    assert run_cli("shards", "synth", shards, "--n", 60, "--resolution", 40, "--val-fraction", 0.2,
                   "--quality", 90, "--shard-size", 20, "--workers", 1) == 0
    results = {}
    for backend in ("dali", "reference"):
        cfg = DataConfig(shards=str(shards), resolution=24, backend=backend, shuffle_buffer=8)
        with build_loader(cfg, "train", batch_size=4, seed=9) as loader:
            if backend == "dali":  # the loader's own reads, into the graph a GPU gets
                loader.source = DaliSource(loader.source.reading, loader.layout, cfg, device=torch.device("cpu"),
                                           resize_in_dali=True)
                assert "resize in DALI" in loader.describe()
            keys, l, ab = [], [], []
            for batch in loader.epoch(1):
                keys += batch.keys
                l.append(batch.l)
                ab.append(batch.ab)
            results[backend] = keys, torch.cat(l), torch.cat(ab)
    assert results["dali"][0] == results["reference"][0]
    lightness = (results["dali"][1] - results["reference"][1]).abs() * 50  # L units
    chroma = (results["dali"][2] - results["reference"][2]).abs() * 110  # ab units
    # DALI's antialiased linear resize and PIL's bilinear differ by a few levels at edges; a box off by a pixel or a
    # wrong flip moves the means by an order of magnitude (measured: L 0.07, ab 0.17).
    assert lightness.mean() < 0.15 and chroma.mean() < 0.3 and (chroma > 1.0).float().mean() < 0.02


@needs_dali
def test_windows_follow_the_exif_orientation_as_the_reference_loader_does(tmp_path):
    """JPEGs kept with their EXIF rotation (`--keep-original`): DALI places each window in the displayed image, as
    PIL's exif_transpose does; a window placed on the stored size would cut another part of it."""
    source = tmp_path / "photos"
    source.mkdir()
    for index, orientation in enumerate((1, 6, 8, 3)):
        stored = np.zeros((40, 64, 3), np.uint8)  # not square: the rotation changes which side is longer
        stored[:, :20] = (200, 30, 30)
        stored[:10, :, 1] = 220
        stored[:, 40 + index:] = (20, 40, 200)
        image, exif = Image.fromarray(stored), Image.Exif()
        exif[0x0112] = orientation
        image.save(source / f"photo{index}.jpg", quality=95, exif=exif.tobytes())
    shards = tmp_path / "shards"
    assert run_cli("shards", "make", source, shards, "--resolution", 32, "--keep-original", "--val-fraction", 1,
                   "--workers", 1) == 0
    batches = {}
    for backend in ("dali", "reference"):
        cfg = DataConfig(shards=str(shards), resolution=24, backend=backend)
        with build_loader(cfg, "val", batch_size=4) as loader:
            batch = next(loader.epoch(0))
            batches[backend] = dict(zip(batch.keys, batch.l, strict=True))
    assert batches["dali"].keys() == batches["reference"].keys()
    for key, l in batches["dali"].items():
        assert (l - batches["reference"][key]).abs().mean() * 50 < 1.0, key  # L units; JPEG decoders round apart
