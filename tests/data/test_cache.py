"""The node cache of remote shards (`data.cache_dir`) against a real nginx, its requests counted in its access log:
the same bytes, one whole download per shard per node however many processes want it, no partial file ever
used, the size bound held."""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from colorize_dist.bench.serve import Nginx, Proxy
from colorize_dist.config import ConfigError
from colorize_dist.data import DataConfig, build_loader
from colorize_dist.data.cache import ShardCache
from colorize_dist.data.manifest import list_shards
from colorize_dist.data.store import open_store
from tests.data.servers import require_nginx


def read_through_cache(url: str, cache_dir: Path, barrier: Path, me: str, expected: Path) -> None:
    """A process of the node: read the first shard whole as soon as the other process is ready too, then wait
    until it reads from the cache; exits 0 when both reads were the shard's bytes."""
    store = open_store(url)
    shards = list_shards(store, "train")
    store.cache = ShardCache(cache_dir, tuple(shards), max_bytes=1 << 30)
    (barrier / me).touch()
    while len(list(barrier.iterdir())) < 2:  # both processes read at once
        time.sleep(0.01)
    shard = shards[0]
    assert store.read(shard.path, 0, shard.size) == expected.read_bytes()
    assert wait_cached(store.cache, store, shard) == expected.read_bytes()
    store.close()


def node_process(*args) -> multiprocessing.Process:
    """Forked: this process has imported everything already, so the child starts at once."""
    process = multiprocessing.get_context("fork").Process(target=read_through_cache, args=args)
    process.start()
    return process


@pytest.fixture(scope="module")
def served(synth_shards, tmp_path_factory):
    """nginx serving the synthetic set at /set/, every request a line of its access log."""
    require_nginx()
    root = tmp_path_factory.mktemp("www")
    shutil.copytree(synth_shards, root / "set")
    server = Nginx(root, tmp_path_factory.mktemp("nginx"), access_log=True).start()
    yield server
    server.stop()


def whole_downloads(server: Nginx, file: str) -> int:
    """GETs of the whole of `file` (status 200; a ranged read is a 206)."""
    return (server.run / "access.log").read_text().count(f'"GET /set/{file} HTTP/1.1" 200 ')


def tar_requests(server: Nginx) -> int:
    return sum('.tar HTTP/1.1"' in line for line in (server.run / "access.log").read_text().splitlines())


def wait_cached(cache: ShardCache, store, shard) -> bytes:
    deadline = time.monotonic() + 20
    while (data := cache.read(shard.path, 0, shard.size, store)) is None:
        assert time.monotonic() < deadline, f"{shard.path} was not cached in 20 s"
        time.sleep(0.01)
    return data


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_an_epoch_through_the_cache_is_the_epoch_on_disk_and_cached_shards_are_read_locally(served, synth_shards,
                                                                                            tmp_path):
    def epochs(shards, **settings) -> list[tuple[list[str], torch.Tensor, torch.Tensor]]:
        cfg = DataConfig(shards=str(shards), resolution=16, backend="reference", num_threads=1, **settings)
        with build_loader(cfg, "train", batch_size=4, seed=3) as loader:
            first = [(batch.keys, batch.l, batch.ab) for batch in loader.epoch(1)]
            if "cache_dir" in settings:  # every shard of the set cached: the next epoch asks nginx for nothing
                store = loader.source.reading.store
                for shard in loader.source.reading.split.shards:
                    wait_cached(store.cache, store, shard)
                requests = tar_requests(served)
            second = [(batch.keys, batch.l, batch.ab) for batch in loader.epoch(2)]
            if "cache_dir" in settings:
                assert tar_requests(served) == requests
        return first + second

    on_disk, cached = epochs(synth_shards), epochs(served.url + "set/", cache_dir=str(tmp_path / "cache"))
    assert len(on_disk) == len(cached) > 0
    for (keys_a, l_a, ab_a), (keys_b, l_b, ab_b) in zip(on_disk, cached, strict=True):
        assert keys_a == keys_b and torch.equal(l_a, l_b) and torch.equal(ab_a, ab_b)
    for shard in list_shards(synth_shards, "train"):
        assert sha256(tmp_path / "cache" / f"{shard.sha256}.tar") == shard.sha256
        assert whole_downloads(served, f"train/{shard.path.name}") == 1


def test_two_processes_download_a_shard_once(served, synth_shards, tmp_path):
    """Two processes read the same shard at the same moment through a proxy that delays each answer by 0.2 s: one
    whole download at nginx, and both read the cached copy."""
    proxy = Proxy(served.port, delay_s=0.2).start()
    (tmp_path / "barrier").mkdir()
    shard = synth_shards / "train/train-000000.tar"
    before = whole_downloads(served, "train/train-000000.tar")
    try:
        readers = [node_process(proxy.url + "set/", tmp_path / "cache", tmp_path / "barrier", str(me), shard)
                   for me in range(2)]
        for reader in readers:
            reader.join(timeout=60)
    finally:
        proxy.stop()
    assert [reader.exitcode for reader in readers] == [0, 0]
    assert whole_downloads(served, "train/train-000000.tar") == before + 1


def test_a_killed_download_leaves_a_partial_file_that_is_never_used_and_is_replaced(served, synth_shards, tmp_path):
    """A process killed (SIGKILL) while its download waits on a slow server (0.5 s a round trip): its `.partial` (the
    full size, zeros) is never read, and the next reader downloads the shard again and renames the right bytes into
    place."""
    cache = tmp_path / "cache"
    shards = list_shards(synth_shards, "train")
    shard, expected = shards[0], shards[0].path.read_bytes()
    partial = cache / f"{shard.sha256}.tar.partial"
    proxy = Proxy(served.port, delay_s=0.5).start()
    (tmp_path / "barrier").mkdir()
    (tmp_path / "barrier" / "other").touch()
    try:
        killed = node_process(proxy.url + "set/", cache, tmp_path / "barrier", "0", shard.path)
        deadline = time.monotonic() + 60
        while not partial.exists():
            assert time.monotonic() < deadline and killed.is_alive()
            time.sleep(0.01)
        os.kill(killed.pid, signal.SIGKILL)
        killed.join(timeout=10)
    finally:
        proxy.stop()
    assert partial.stat().st_size == shard.size and not (cache / f"{shard.sha256}.tar").exists()

    store = open_store(served.url + "set/")
    store.cache = ShardCache(cache, tuple(list_shards(store, "train")), max_bytes=1 << 30)
    remote_shard = store.cache.shards[shard.path.relative_to(synth_shards)]
    assert store.read(remote_shard.path, 0, shard.size) == expected  # ranged: the partial file is not read
    assert wait_cached(store.cache, store, remote_shard) == expected
    store.close()
    assert not partial.exists() and sha256(cache / f"{shard.sha256}.tar") == shard.sha256


def test_the_cache_stays_within_its_bound_removing_other_sets_shards_least_recently_used_first(served, synth_shards,
                                                                                                tmp_path, caplog):
    """Two shards of another set in the cache (one used long ago, one lately), room for three shards: caching
    this set's shards removes the older first, then the other, then stops (the set's own shards stay)."""
    caplog.set_level(logging.WARNING, logger="colorize_dist.data.cache")
    cache = tmp_path / "cache"
    cache.mkdir()
    store = open_store(served.url + "set/")
    shards = list_shards(store, "train")[:4]
    largest = max(shard.size for shard in shards)
    assert min(shard.size for shard in shards) > 0.8 * largest  # so three fill the bound and a fourth does not fit
    old, new = cache / f"{'a' * 64}.tar", cache / f"{'b' * 64}.tar"
    for age, other in ((1000, old), (10, new)):
        other.write_bytes(b"x" * largest)
        os.utime(other, (time.time() - age, time.time() - age))
    bound = 3 * largest
    store.cache = ShardCache(cache, tuple(shards), max_bytes=bound)

    def cache_next(shard) -> None:
        assert store.read(shard.path, 0, shard.size) == (synth_shards / shard.path).read_bytes()
        assert wait_cached(store.cache, store, shard) == (synth_shards / shard.path).read_bytes()
        assert sum(path.stat().st_size for path in cache.glob("*.tar*")) <= bound

    cache_next(shards[0])
    assert old.exists() and new.exists()
    cache_next(shards[1])
    assert not old.exists() and new.exists()
    cache_next(shards[2])
    assert not new.exists()
    assert store.read(shards[3].path, 0, shards[3].size) == (synth_shards / shards[3].path).read_bytes()
    deadline = time.monotonic() + 20
    while "is full" not in caplog.text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert store.cache.read(shards[3].path, 0, shards[3].size, store) is None  # a remote read, from now on
    assert sorted(path.name for path in cache.glob("*.tar*")) == sorted(f"{shard.sha256}.tar" for shard in shards[:3])
    store.close()


def test_a_cache_dir_that_is_a_file_is_one_line_naming_the_setting(served, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    cfg = DataConfig(shards=served.url + "set/", cache_dir=str(tmp_path / "taken"), backend="reference")
    with pytest.raises(ConfigError, match=rf"^data.cache_dir {tmp_path}/taken is an existing file; name a folder"):
        build_loader(cfg, "train", batch_size=4)


def test_a_download_that_does_not_match_the_manifest_is_not_cached(served, synth_shards, tmp_path, caplog):
    """The server's shard is not the one the manifest hashed (here: the manifest's hash is another): one warning,
    no file left in the cache, and the samples still come (checked) by ranged reads."""
    caplog.set_level(logging.WARNING, logger="colorize_dist.data.cache")
    store = open_store(served.url + "set/")
    shard = dataclasses.replace(list_shards(store, "train")[0], sha256="f" * 64)
    store.cache = ShardCache(tmp_path / "cache", (shard,), max_bytes=1 << 30)
    assert store.read(shard.path, 0, shard.size) == (synth_shards / shard.path).read_bytes()
    deadline = time.monotonic() + 20
    while "failed" not in caplog.text:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert f"caching {served.url}set/train/train-000000.tar failed (the download is {shard.size:,} bytes with " \
           f"SHA-256" in caplog.text and "the manifest says" in caplog.text
    assert store.cache.read(shard.path, 0, shard.size, store) is None
    assert not list((tmp_path / "cache").glob("*.tar*"))
    store.close()
