"""What the manifest records about each shard, and who checks it: `shards verify` (and --deep), `shards index
--repair`, and the loaders (sizes before the first step, each sample's tar header and CRC-32 as it is read)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from PIL import Image

from colorize_dist.data import DataConfig, MissingShardsError, ShardDataError, build_loader, reading, store
from colorize_dist.data.dali_index import index_images
from colorize_dist.data.manifest import list_shards
from colorize_dist.data.verify import verify_set
from tests.data.helpers import (
    damaged_copy,
    flip_byte,
    flip_header,
    flip_payload,
    index_entries,
    misstate_size,
    needs_dali,
    remove_index,
    run_cli,
    stale_index,
    truncate,
)

BACKENDS = [pytest.param("dali", marks=needs_dali), "reference"]
SHARD = "train/train-000001.tar"
# How each fault shows in `shards verify` and in the loaders (the exception and words of its one line).
FAULTS = {
    "flipped payload": (flip_payload, "does not match its CRC-32", ShardDataError, "has CRC-32"),
    "flipped tar header": (flip_header, "not a readable tar", ShardDataError, "damaged tar header"),
    "truncated": (truncate, "(truncated or replaced)", ShardDataError, "(truncated or replaced)"),
    "missing index": (remove_index, "missing; rewrite it with `colorize-dist shards index", MissingShardsError,
                      "--repair"),
    "manifest mismatch": (misstate_size, "(truncated or replaced)", ShardDataError, "(truncated or replaced)"),
    "stale index": (stale_index, "does not match train-000001.tar; rewrite it with `colorize-dist shards index",
                    ShardDataError, "(a stale index); rewrite it with `colorize-dist shards index"),
}
REPAIRED = ("missing index", "stale index")  # the fix is `shards index --repair`, not a remake


@pytest.fixture(scope="module")
def jpeg_shards(tmp_path_factory) -> Path:
    """32 synthetic JPEGs at 32²: 4 train shards of 6 and a val shard."""
    out = tmp_path_factory.mktemp("jpeg") / "shards"
    assert run_cli("shards", "synth", out, "--n", 32, "--resolution", 32, "--shard-size", 6, "--val-fraction",
                   0.2, "--workers", 1) == 0
    return out


def test_manifest_records_size_hash_and_sample_checksums(jpeg_shards):
    manifest = json.loads((jpeg_shards / "manifest.json").read_text())
    assert manifest["sample_order"].startswith("sha1 of the relative path (pre-shuffled")
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            data = (jpeg_shards / entry["file"]).read_bytes()
            assert entry["bytes"] == len(data) and entry["sha256"] == hashlib.sha256(data).hexdigest()
            images = index_images((jpeg_shards / entry["file"]).with_suffix(".idx").read_text())
            assert entry["crc32"].split() == [f"{zlib.crc32(data[o:o + n]):08x}" for _, o, n, _ in images]
            assert entry["progressive_jpegs"] == 0


def snapshot(directory: Path) -> dict[str, tuple[int, str]]:
    return {path.relative_to(directory).as_posix(): (path.stat().st_mtime_ns, hashlib.sha256(path.read_bytes())
                                                     .hexdigest())
            for path in sorted(directory.rglob("*")) if path.is_file()}


@pytest.mark.parametrize("fault", FAULTS)
def test_verify_names_each_fault_and_changes_nothing(jpeg_shards, tmp_path, capsys, fault):
    damage, expected, _, _ = FAULTS[fault]
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", damage, SHARD)
    before = snapshot(shards)
    assert run_cli("shards", "verify", shards) == 1
    report = capsys.readouterr().out
    problems = [line for line in report.splitlines() if line.startswith("PROBLEM ")]
    assert any(str(damaged) in line and expected in line for line in problems), report
    assert snapshot(shards) == before  # nothing written, nothing touched


def test_flipped_jpeg_bytes_that_still_decode_are_caught(jpeg_shards, tmp_path, capsys):
    """The garbled image decodes (so a decode check says OK); its CRC-32 does not match."""
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", flip_payload, SHARD)
    _, offset, size, member = index_entries(damaged)[0]
    with Image.open(io.BytesIO(damaged.read_bytes()[offset:offset + size])) as image:
        image.load()  # no error: only the checksum tells
    assert run_cli("shards", "verify", shards) == 1
    assert f"PROBLEM {damaged}: sample {member} does not match its CRC-32" in capsys.readouterr().out


def test_verify_deep_rehashes_what_no_sample_covers(jpeg_shards, tmp_path, capsys):
    """A flipped byte in a tar's end padding: every sample is intact, the file is not."""
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", lambda root, shard: root / shard, SHARD)
    flip_byte(damaged, damaged.stat().st_size - 1)
    assert run_cli("shards", "verify", shards) == 0
    capsys.readouterr()
    assert run_cli("shards", "verify", shards, "--deep") == 1
    assert f"PROBLEM {damaged}: SHA-256 differs from manifest.json" in capsys.readouterr().out


def test_verify_set_reports_exactly_the_one_flipped_sample(jpeg_shards, tmp_path):
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", flip_payload, SHARD)
    _, _, _, member = index_entries(damaged)[0]
    report = verify_set(shards, deep=False)
    assert report.problems == [f"{damaged}: sample {member} does not match its CRC-32 in manifest.json (its bytes "
                               "changed); remake the set (`colorize-dist shards make ... --force`) or restore the "
                               "shard"]
    assert report.splits == [("train", 5, 25), ("val", 2, 7)] and report.checksums_recorded
    assert report.where == str(shards)
    assert verify_set(jpeg_shards, deep=True).problems == []


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fault", FAULTS)
def test_loaders_refuse_each_fault_in_one_line(jpeg_shards, tmp_path, backend, fault):
    """Size and index faults before the first batch; changed bytes and headers when the sample is read."""
    damage, _, error, words = FAULTS[fault]
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", damage, SHARD)
    cfg = DataConfig(shards=str(shards), resolution=32, backend=backend, num_threads=1)
    started = time.perf_counter()
    with pytest.raises(error) as raised, build_loader(cfg, "train", batch_size=4, seed=1) as loader:
        for _ in loader.epoch(0):
            pass
    assert time.perf_counter() - started < 30
    message = str(raised.value)
    assert "\n" not in message and str(damaged) in message and words in message
    if fault in REPAIRED:
        assert message.endswith(f"rewrite it with `colorize-dist shards index {shards} --repair`"), message
    else:
        assert f"run `colorize-dist shards verify {shards}`, then remake the set" in message


def strip_checksums(shards: Path) -> dict:
    """Make `shards`' manifest one written before checksums were recorded; returns it."""
    manifest = json.loads((shards / "manifest.json").read_text())
    for split in manifest["splits"].values():
        for entry in split["shards"]:
            for key in ("bytes", "sha256", "crc32", "progressive_jpegs"):
                entry.pop(key)
    (shards / "manifest.json").write_text(json.dumps(manifest))
    return manifest


@pytest.mark.parametrize("backend", BACKENDS)
def test_an_image_that_does_not_decode_is_one_line_without_checksums(jpeg_shards, tmp_path, backend):
    """Sets indexed before checksums were recorded: a broken image reaches the decoder, which names it."""
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", lambda root, shard: root / shard, SHARD)
    strip_checksums(shards)
    data = bytearray(damaged.read_bytes())
    _, offset, size, _ = index_entries(damaged)[0]
    data[offset + 2: offset + size] = bytes(size - 2)  # a JPEG start marker, then zeros
    damaged.write_bytes(bytes(data))
    cfg = DataConfig(shards=str(shards), resolution=32, backend=backend, num_threads=1)
    with pytest.raises(ShardDataError) as raised, build_loader(cfg, "train", batch_size=4, seed=1) as loader:
        for _ in loader.epoch(0):
            pass
    message = str(raised.value)
    assert "\n" not in message and str(damaged) in message and "shards verify" in message


def test_index_repair_rewrites_missing_indexes_of_intact_shards_only(jpeg_shards, tmp_path, capsys):
    shards, index = damaged_copy(jpeg_shards, tmp_path / "set", remove_index, SHARD)
    manifest_before = (shards / "manifest.json").read_text()
    assert run_cli("shards", "index", shards, "--repair") == 0
    assert f"rewrote 1 index file(s)\n  {index}" in capsys.readouterr().out
    assert index.read_text() == (jpeg_shards / SHARD).with_suffix(".idx").read_text()
    assert (shards / "manifest.json").read_text() == manifest_before
    assert run_cli("shards", "verify", shards) == 0
    capsys.readouterr()

    index.unlink()
    truncate(shards, SHARD)
    assert run_cli("shards", "index", shards, "--repair") == 2
    assert capsys.readouterr().err == (f"shards index: shard {shards / SHARD} is not the size manifest.json records; "
                                       "its index is not rewritten: remake the set or restore the shard\n")
    assert not index.exists()


def test_index_force_keeps_what_the_manifest_said_about_the_set(jpeg_shards, tmp_path, capsys):
    shards, _ = damaged_copy(jpeg_shards, tmp_path / "set", lambda root, shard: root / shard, SHARD)
    before = json.loads((shards / "manifest.json").read_text())
    assert run_cli("shards", "index", shards) == 2
    assert "--force to replace it, or --repair" in capsys.readouterr().err
    assert run_cli("shards", "index", shards, "--force") == 0
    after = json.loads((shards / "manifest.json").read_text())
    assert (after["resolution"], after["image_format"], after["source"]) == (32, "jpg", before["source"])
    assert after["splits"] == before["splits"]


def test_old_manifests_without_checksums_still_load(jpeg_shards, tmp_path, capsys):
    shards, _ = damaged_copy(jpeg_shards, tmp_path / "set", lambda root, shard: root / shard, SHARD)
    manifest = strip_checksums(shards)
    cfg = DataConfig(shards=str(shards), resolution=32, backend="reference", num_threads=1)
    with build_loader(cfg, "val", batch_size=4) as loader:
        assert sum(int(batch.valid.sum()) for batch in loader.epoch(0)) == manifest["splits"]["val"]["samples"]
    assert run_cli("shards", "verify", shards) == 0
    assert "records no sizes or checksums" in capsys.readouterr().out


def test_reference_workers_ignore_sigterm_yet_a_failing_process_exits_at_once(jpeg_shards, tmp_path):
    """The root cause of the hang: workers ignore SIGTERM (Slurm's), so nothing may wait for them to obey it."""
    shards, damaged = damaged_copy(jpeg_shards, tmp_path / "set", lambda root, shard: root / shard,
                                   "val/val-000000.tar")
    _, offset, size, _ = index_entries(damaged)[-1]
    flip_byte(damaged, offset + size // 2)  # the last sample of the split: read after the first batches
    script = f"""
import multiprocessing, os, signal
from colorize_dist.data import DataConfig, build_loader
loader = build_loader(DataConfig(shards={str(shards)!r}, resolution=32, backend="reference", num_threads=2),
                      "val", batch_size=1)
batches = loader.epoch(0)
next(batches)
workers = [process.pid for process in multiprocessing.active_children()]
print(" ".join(map(str, workers)), flush=True)
os.kill(workers[0], signal.SIGTERM)  # ignored, as Slurm's is
for batch in batches:
    pass
"""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                            cwd=Path(__file__).resolve().parents[2])
    assert time.perf_counter() - started < 60
    assert result.returncode == 1 and f"ShardDataError: shard {damaged} is damaged" in result.stderr
    workers = list(map(int, result.stdout.split()))
    assert len(workers) == 2
    for pid in workers:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


def test_a_reader_keeps_few_files_open(jpeg_shards, monkeypatch):
    monkeypatch.setattr(store, "MAX_OPEN_FILES", 2)
    shards = list_shards(jpeg_shards, "train")
    reader = reading.ShardReader(tuple(shards), store.LocalStore(jpeg_shards))
    for _ in range(2):
        for index, shard in enumerate(shards):
            _, offset, size, _ = index_entries(shard.path)[0]
            assert reader.read(index, range(1)) == [shard.path.read_bytes()[offset:offset + size]]
            assert len(reader.store._files) <= 2
    reader.close()
