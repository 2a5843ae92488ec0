"""Shards on a web server (nginx, and a proxy in front of it playing latency and faults) read as from disk: the same
batches, the same one-line errors naming the URL, transient faults retried."""

from __future__ import annotations

import json
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
import webdataset as wds
from safetensors.torch import load_file

from colorize_dist.bench.serve import Nginx, Proxy
from colorize_dist.config import ConfigError
from colorize_dist.data import DataConfig, ManifestError, MissingShardsError, ShardDataError, build_loader, store
from colorize_dist.data.manifest import ShardsUnavailable
from colorize_dist.data.store import open_store, redact
from colorize_dist.launch.resources import SlurmResources
from colorize_dist.launch.slurm import training_job
from colorize_dist.training.config import load_training_config
from tests.data.helpers import index_entries, run_cli
from tests.data.servers import good_and_bad_sets
from tests.training.helpers import (
    LAUNCH_ENV,
    REPO,
    TRAIN_SCRIPT,
    assert_same_weights,
    checkpoint_names,
    launch,
    launch_command,
    probe_weights,
    subprocess_env,
    tiny_overrides,
    train_once,
    train_process,
)


@pytest.fixture(scope="module")
def served(synth_shards, tmp_path_factory):
    """nginx serving a folder holding the synthetic set (`good/`) and a copy with one damaged sample (`bad/`)."""
    with good_and_bad_sets(synth_shards, tmp_path_factory.mktemp("www"), tmp_path_factory.mktemp("nginx"),
                           damaged_key="0000020") as served:
        yield served


def epoch_batches(shards: str | Path, rank: int = 1, **settings) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
    cfg = DataConfig(shards=str(shards), resolution=16, backend="reference", num_threads=1, **settings)
    with build_loader(cfg, "train", batch_size=4, global_batch=8, rank=rank, world_size=2, seed=3) as loader:
        return [(batch.keys, batch.l, batch.ab) for batch in loader.epoch(1)]


def read_if_there(path: Path) -> str:
    return path.read_text() if path.is_file() else ""


def assert_same_batches(first, second) -> None:
    assert len(first) == len(second) > 0
    for (keys_a, l_a, ab_a), (keys_b, l_b, ab_b) in zip(first, second, strict=True):
        assert keys_a == keys_b
        assert torch.equal(l_a, l_b) and torch.equal(ab_a, ab_b)


def test_an_epoch_over_http_is_the_epoch_on_disk(served, synth_shards):
    server, _ = served
    assert_same_batches(epoch_batches(synth_shards), epoch_batches(server.url + "good/"))


def test_any_fsspec_url_reads_the_same_samples(synth_shards):
    """fsspec's own local filesystem behind a URL scheme: the fsspec store, byte for byte."""
    fsspec_store = store.FsspecStore(f"local://{synth_shards}")
    path = Path("train/train-000000.tar")
    _, offset, size, _ = index_entries(synth_shards / path)[2]
    assert fsspec_store.read(path, offset, size) == (synth_shards / path).read_bytes()[offset:offset + size]
    assert fsspec_store.size(path) == (synth_shards / path).stat().st_size
    assert fsspec_store.size(Path("train/nothing.tar")) is None


def test_a_damaged_sample_over_http_is_one_line_naming_its_url(served):
    server, _ = served
    with pytest.raises(ShardDataError) as error:
        for rank in (0, 1):  # the rank that reads the damaged sample
            epoch_batches(server.url + "bad/", rank)
    message = str(error.value)
    assert message.startswith(f"shard {server.url}bad/train/train-000001.tar is damaged: sample 0000020.png has "
                              "CRC-32") and "\n" not in message


def test_a_missing_set_is_one_line_before_anything_is_read(served):
    server, _ = served
    with pytest.raises(MissingShardsError, match=rf"^{server.url}nowhere/manifest.json is not there \(404\); check "
                                                 "the URL"):
        epoch_batches(server.url + "nowhere/")


def test_transient_faults_are_retried_and_change_nothing(served, synth_shards):
    """Every 5th answer a 503, 429, reset or short body: the epoch is still the epoch on disk."""
    server, _ = served
    kinds = ("503", "429", "reset", "short")
    proxy = Proxy(server.port, faults=kinds, period=5).start()
    try:
        assert_same_batches(epoch_batches(synth_shards), epoch_batches(proxy.url + "good/"))
    finally:
        proxy.stop()
    assert set(proxy.faults) == set(kinds)


def test_a_server_that_stays_down_is_one_line_naming_the_url_and_what_was_tried(served, monkeypatch):
    server, _ = served
    down = Proxy(server.port, faults=("503",)).start()
    monkeypatch.setattr(store, "RETRIES", 3)
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError) as error:
            epoch_batches(down.url.replace("://", "://reader:s3cret@") + "good/?X-Signature=abc")
        took = time.monotonic() - started
    finally:
        down.stop()
    message = str(error.value)
    assert "s3cret" not in message and "abc" not in message and "\n" not in message, message
    assert message.startswith(f"http://127.0.0.1:{down.port}/good/manifest.json?*** did not answer: GET tried 4 "
                              "times over"), message
    assert "last HTTP 503" in message and took < 5


def test_shards_verify_reads_a_url(served, capsys):
    server, _ = served
    assert run_cli("shards", "verify", server.url + "good/") == 0
    assert capsys.readouterr().out.strip().endswith(f"{server.url}good/: OK")
    assert run_cli("shards", "verify", server.url + "bad/") == 1
    out = capsys.readouterr().out
    assert (f"PROBLEM {server.url}bad/train/train-000001.tar: sample 0000020.png does not match its CRC-32 in "
            "manifest.json") in out and "/tmp" not in out.replace(str(server.root), ""), out


@pytest.mark.parametrize(("text", "shown"), [
    ("https://user:pw@host.org/a/b.tar", "https://***@host.org/a/b.tar"),
    ("see s3://bucket/x?X-Amz-Signature=0f&X-Amz-Credential=k, then", "see s3://bucket/x?*** then"),
    ("/local/path/x.tar", "/local/path/x.tar"),
])
def test_credentials_in_urls_are_redacted(text, shown):
    assert redact(text) == shown


def test_an_open_store_names_files_without_credentials():
    remote = open_store("https://me:secret@example.org/faces?sig=1")
    assert remote.show(Path("train/a.tar")) == "https://example.org/faces/train/a.tar?***"
    with pytest.raises(FileNotFoundError, match=r"^s3://\*\*\*@bucket/faces/ cannot be read here: Install s3fs"):
        open_store("s3://me:secret@bucket/faces/")


@pytest.mark.slow
def test_training_over_http_equals_training_from_disk_and_writes_no_credentials(served, tmp_path):
    """4 steps from the shards on disk, from the same shards over HTTP (with credentials in the URL), and over HTTP
    through the node cache (data.cache_dir): the same generator and discriminator, and no file or log line of the
    run holds the password."""
    server, root = served
    url = server.url.replace("://", "://reader:s3cret@") + "good/"
    runs = {}
    for name, shards, cache in (("disk", root / "good", {}), ("http", url, {}),
                                ("cached", url, {"data.cache_dir": str(tmp_path / "cache")})):
        runs[name] = tmp_path / name
        result = train_once(runs[name], tiny_overrides(shards, **{"train.max_steps": 4, "train.validate_every": 4,
                                                                   "train.sample_every": 4, **cache}), timeout=300)
        assert result.returncode == 0, result.stderr
        assert "s3cret" not in result.stdout + result.stderr
    weights = sorted(path.relative_to(runs["disk"]) for path in runs["disk"].rglob("*.safetensors"))
    assert Path("export/generator_final.safetensors") in weights and len(weights) > 2  # and the checkpoint's
    for name in ("http", "cached"):
        assert weights == sorted(path.relative_to(runs[name]) for path in runs[name].rglob("*.safetensors"))
        for relative in weights:
            disk, http = load_file(runs["disk"] / relative), load_file(runs[name] / relative)
            assert disk.keys() == http.keys()
            for key in disk:
                assert torch.equal(disk[key], http[key]), f"{name} {relative}: {key}"
        written = [path for path in runs[name].rglob("*") if path.is_file()]
        assert not [path for path in written if b"s3cret" in path.read_bytes()]
    assert list((tmp_path / "cache").glob("*.tar"))  # the cached run filled the cache
    assert f"shards: http://***@127.0.0.1:{server.port}/good/" in (runs["http"] / "config.yaml").read_text()


def test_slurm_jobs_refuse_credentials_in_the_shard_url(tmp_path):
    """A requeued job trains from RUN/config.yaml, which the trainer records with the credentials redacted."""
    cfg = load_training_config("tiny", ["data.shards=https://reader:s3cret@data.example.org/faces/"])
    with pytest.raises(ConfigError, match=r"^data.shards holds credentials in its URL; .* ~/.netrc"):
        training_job(cfg, tmp_path / "run", SlurmResources(gpus_per_node=0))
    assert not (tmp_path / "run").exists()


def test_webdataset_reads_our_shards_by_url_as_by_path(served, synth_shards):
    """The `webdataset` library streams a served shard (its own http reader) to the same keys and bytes as the
    file on disk, and as our ranged reads."""
    server, _ = served
    tar = "train/train-000002.tar"

    def samples(location: str) -> dict[str, bytes]:
        pipeline = wds.DataPipeline(wds.SimpleShardList([location]), wds.tarfile_to_samples())
        return {sample["__key__"]: sample["png"] for sample in pipeline}

    by_path, by_url = samples(str(synth_shards / tar)), samples(f"{server.url}good/{tar}")
    assert by_url == by_path and len(by_path) == 7
    remote = open_store(server.url + "good/")
    ours = {key: remote.read(Path(tar), offset, size)
            for key, (_, offset, size, _) in zip(by_path, index_entries(synth_shards / tar), strict=True)}
    assert ours == by_path


@pytest.mark.slow
def test_two_processes_over_a_faulty_server_train_as_from_disk(served, tmp_path):
    """2 processes (DDP), 4 steps, from disk and over HTTP through a proxy that answers every 7th request with a
    503, a 429, a reset or a short body: every weight of both ranks the same, bit for bit."""
    server, root = served
    proxy = Proxy(server.port, faults=("503", "429", "reset", "short"), period=7).start()
    try:
        for name, shards in (("disk", root / "good"), ("http", proxy.url + "good/")):
            result = launch("cpu_2proc.yaml", tmp_path / name,
                            tiny_overrides(shards, **{"train.max_steps": 4, "train.batch_size": 8}), timeout=400)
            assert result.returncode == 0, result.stderr[-3000:]
    finally:
        proxy.stop()
    assert len(proxy.faults) >= 4
    for rank in (0, 1):
        assert_same_weights(probe_weights(tmp_path / "disk", rank), probe_weights(tmp_path / "http", rank),
                            rtol=0, atol=0)


def test_a_server_going_down_mid_epoch_is_one_line_naming_the_url_in_bounded_time(served, monkeypatch):
    server, _ = served
    monkeypatch.setattr(store, "RETRIES", 3)
    proxy = Proxy(server.port).start()
    cfg = DataConfig(shards=proxy.url + "good/", resolution=16, backend="reference", num_threads=1,
                     reads_in_flight=2, prefetch=1)
    with build_loader(cfg, "train", batch_size=2, seed=3) as loader:
        batches = loader.epoch(0)
        next(batches)
        proxy.stop()  # the outage: connections refused from now on
        started = time.monotonic()
        with pytest.raises(ShardsUnavailable) as error:
            for _ in batches:
                pass
        took = time.monotonic() - started
    message = str(error.value)
    assert re.match(rf"{proxy.url}good/train/train-00000\d\.tar did not answer: GET bytes \d+-\d+ tried 4 times over "
                    r"\d+\.\d s, last \w+; rerun once it answers$", message), message
    assert "\n" not in message and took < 10


@pytest.mark.parametrize("stage", ["manifest", "sizes", "indexes"])
def test_a_server_going_down_at_start_up_is_one_line_naming_the_url_in_bounded_time(served, synth_shards, stage,
                                                                                    monkeypatch):
    """The server stops answering at the manifest's GET, the shards' HEADs or the indexes' GETs: each is the line
    of a server that did not answer (never a damaged index), before the first batch."""
    server, _ = served
    monkeypatch.setattr(store, "RETRIES", 3)
    shards = len([entry for entry in json.loads((synth_shards / "manifest.json").read_text())["splits"]["train"]
                  ["shards"] if entry["samples"] > 0])
    down = Proxy(server.port, answers={"manifest": 0, "sizes": 1, "indexes": 1 + 2 * shards}[stage]).start()
    try:
        started = time.monotonic()
        with pytest.raises(ManifestError) as error:
            epoch_batches(down.url + "good/")
        took = time.monotonic() - started
    finally:
        down.stop()
    message = str(error.value)
    what = {"manifest": r"manifest\.json did not answer: GET",
            "sizes": r"train/train-00000\d\.tar did not answer: HEAD",
            "indexes": r"train/train-00000\d\.idx did not answer: GET"}[stage]
    assert re.match(rf"{down.url}good/{what} tried 4 times over \d\.\d s, last \w+; rerun once it answers$",
                    message), message
    assert error.value.exit_status == 2 and "\n" not in message and took < 5

@pytest.mark.slow
def test_an_outage_during_validation_stops_at_that_steps_checkpoint(served, tmp_path):
    """Only the validation split's folder goes down, after step 2: the validation of step 12 gives up, the run
    saves step 12 (no periodic checkpoint in the run) and ends in one line naming a validation shard; resumed, it
    finishes with the final weights of an uninterrupted run from disk, bit for bit."""
    server, root = served
    settings = {"train.max_steps": 16, "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
                "train.validate_every": 12, "train.sample_every": 100}
    straight = train_once(tmp_path / "straight", tiny_overrides(root / "good", **settings), timeout=300)
    assert straight.returncode == 0, straight.stderr[-3000:]
    proxy = Proxy(server.port, part="good/val/").start()
    try:
        run_dir = tmp_path / "resumed"
        process = train_process(run_dir, tiny_overrides(proxy.url + "good/", **settings))
        deadline = time.monotonic() + 120
        while '"step": 2' not in read_if_there(run_dir / "metrics.jsonl") and process.poll() is None:
            assert time.monotonic() < deadline, "no step 2"
            time.sleep(0.01)
        proxy.take_down_part()
        _, stderr = process.communicate(timeout=120)
    finally:
        proxy.stop()
    lines = [line for line in stderr.splitlines() if "did not answer" in line]
    assert process.returncode == 2 and len(lines) == 1, stderr[-3000:]
    assert re.match(rf"train: {proxy.url}good/val/val-\d+\.tar did not answer: GET .* tried 7 times over \d+\.\d s, "
                    r"last \w+; checkpoint at step 12 saved; once it answers, rerun with `--resume auto` to continue "
                    r"from it$", lines[0]), lines[0]
    assert checkpoint_names(run_dir) == {"step-0000012"}
    resumed = train_once(run_dir, tiny_overrides(server.url + "good/", **settings), "--resume", "auto", timeout=300)
    assert resumed.returncode == 0 and "done at step 16" in resumed.stdout, resumed.stderr[-3000:]
    assert_same_final_weights(tmp_path / "straight", run_dir, step=16, exports="generator_final")  # best: not run


@pytest.mark.slow
def test_a_server_outage_stops_every_rank_at_a_checkpoint_and_resumes_exactly(served, tmp_path):
    """2 processes, 20 steps from disk in one go; over HTTP, nginx stopped after step 4 (no periodic checkpoint
    in the run): both ranks save the last finished step together and the run ends in one line naming the URL and
    that step, in bounded time; once nginx is back, `--resume auto` finishes with the same weights, bit for bit
    (every .safetensors of the final checkpoint and the export)."""
    _, root = served
    server = Nginx(root, tmp_path / "nginx").start()
    settings = {"train.max_steps": 20, "train.checkpoint_every": 100, "train.keep_checkpoints": 1,
                "train.validate_every": 20, "train.sample_every": 20, "train.batch_size": 8,
                "data.reads_in_flight": 4}  # reads ahead by a step or two, so the outage comes before the end

    def two_processes(run_dir: Path, shards: str | Path) -> subprocess.Popen:
        command = launch_command("cpu_2proc.yaml", [str(TRAIN_SCRIPT), "--run-dir", str(run_dir),
                                                    *tiny_overrides(shards, **settings)])
        return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                                env=subprocess_env() | LAUNCH_ENV["cpu_2proc.yaml"], start_new_session=True)

    try:
        straight = two_processes(tmp_path / "straight", root / "good")
        assert straight.wait(timeout=400) == 0, straight.communicate()[1][-3000:]
        run_dir = tmp_path / "resumed"
        process = two_processes(run_dir, server.url + "good/")
        deadline = time.monotonic() + 200
        while '"step": 4' not in read_if_there(run_dir / "metrics.jsonl") and process.poll() is None:
            assert time.monotonic() < deadline, "no step 4"
            time.sleep(0.02)
        server.stop()  # the outage: connections refused from now on
        stopped = time.monotonic()
        stdout, stderr = process.communicate(timeout=120)
        took = time.monotonic() - stopped
        lines = [line for line in stderr.splitlines() if "did not answer" in line]
        assert process.returncode != 0 and len(lines) == 1, stderr[-3000:]  # one node: one line
        match = re.match(rf"train: {server.url}good/\S+ did not answer: GET .* tried 7 times over \d+\.\d s, last "
                         r"\w+; checkpoint at step (\d+) saved; once it answers, rerun with `--resume auto` to "
                         r"continue from it$", lines[0])
        assert match, lines[0]
        step = int(match.group(1))
        assert 4 <= step < 20 and took < 30 and "done at step 20" not in stdout
        assert checkpoint_names(run_dir) == {f"step-{step:07d}"}  # the stop checkpoint, the run's only one
        server.start()  # back, at the same address
        resumed = two_processes(run_dir, server.url + "good/")
        stdout, stderr = resumed.communicate(timeout=400)
        assert resumed.returncode == 0, stderr[-3000:]
        assert "resumed from" in stdout and "done at step 20" in stdout, stdout[-3000:]
    finally:
        server.stop()
    assert_same_final_weights(tmp_path / "straight", run_dir, step=20)


def assert_same_final_weights(expected_run: Path, run: Path, *, step: int, exports: str = "*") -> None:
    """Every .safetensors of the step's checkpoint and of export/ (those matching `exports`) equal, bit for bit."""
    def final_weights(run: Path) -> list[Path]:
        folders = ((run / "checkpoints" / f"step-{step:07d}", "*"), (run / "export", exports))
        return sorted(path.relative_to(run) for folder, pattern in folders
                      for path in folder.rglob(f"{pattern}.safetensors"))

    weights = final_weights(expected_run)
    assert len(weights) > 2 and weights == final_weights(run)
    for relative in weights:
        expected, got = load_file(expected_run / relative), load_file(run / relative)
        assert expected.keys() == got.keys()
        for key in expected:
            assert torch.equal(expected[key], got[key]), f"{relative}: {key}"
