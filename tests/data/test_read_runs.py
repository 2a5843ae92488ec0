"""The training order in runs of neighbouring samples (`data.samples_per_read`) and the reads that take each run at
once: the order stays a pure function of (seed, epoch), one sample per run is the earlier order draw for draw, and
a run read at once gives the bytes and the errors that reading its samples one by one gives, in fewer requests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from colorize_dist.bench.serve import Nginx
from colorize_dist.data import DataConfig, ShardDataError, build_loader
from colorize_dist.data.manifest import Shard, list_shards
from colorize_dist.data.reading import ShardReader, neighbour_runs
from colorize_dist.data.sharding import ORDER_STREAM, Layout, SplitSamples, epoch_order, micro_batches, slot_positions
from colorize_dist.data.store import open_store
from tests.data.helpers import index_entries
from tests.data.servers import good_and_bad_sets

SPLIT = SplitSamples(tuple(Shard(Path(f"s{i}.tar"), n) for i, n in enumerate([7, 13, 1, 20, 5, 16])))


def sample_level_order(split: SplitSamples, seed: int, window: int) -> np.ndarray:
    """The order before runs existed, as it was written: shards permuted, then each sample jittered."""
    positions = np.arange(split.total, dtype=np.int64)
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(ORDER_STREAM,)))
    runs = np.split(positions, split.starts[1:])
    positions = np.concatenate([runs[i] for i in rng.permutation(len(runs))])
    jitter = rng.uniform(0, max(1, window), len(positions))
    return positions[np.argsort(np.arange(len(positions)) + jitter, kind="stable")]


def segments(split: SplitSamples, order: np.ndarray) -> list[np.ndarray]:
    """The order cut wherever the next slot is not the next sample of the same shard."""
    shard = split.locate(order)[0]
    cuts = np.flatnonzero((np.diff(order) != 1) | (np.diff(shard) != 0)) + 1
    return np.split(order, cuts)


@pytest.mark.parametrize("window", [1, 5, 64])
def test_one_sample_per_read_is_the_earlier_order_draw_for_draw(window):
    for seed in range(20):
        assert np.array_equal(epoch_order(SPLIT, seed, window, 1), sample_level_order(SPLIT, seed, window))


@pytest.mark.parametrize("per_read", [2, 4, 8, 16])
def test_the_order_is_runs_of_neighbours_shuffled_as_units(per_read):
    orders = [epoch_order(SPLIT, seed, 24, per_read) for seed in range(30)]
    for seed, order in enumerate(orders):
        assert np.array_equal(np.sort(order), np.arange(SPLIT.total))  # each sample once
        assert np.array_equal(order, epoch_order(SPLIT, seed, 24, per_read))  # a function of the seed alone
        # neighbours stay together: at most one cut more per shard than its runs, none inside a run
        runs = sum(-(-shard.samples // per_read) + 1 for shard in SPLIT.shards)
        assert len(segments(SPLIT, order)) <= runs
    assert len({order.tobytes() for order in orders}) > 0.9 * len(orders)  # epochs differ (6 shards: a few alike)


@pytest.mark.parametrize("per_read", [2, 4, 8])
def test_where_runs_are_cut_moves_with_the_epoch(per_read):
    """Two neighbours of a shard are mostly read together, never always: no fixed groups, epoch after epoch."""
    together, seeds = np.zeros(SPLIT.total - 1), range(200)
    for seed in seeds:
        slot = np.argsort(epoch_order(SPLIT, seed, 24, per_read))
        together += slot[1:] == slot[:-1] + 1
    shard = SPLIT.locate(np.arange(SPLIT.total))[0]
    neighbours = together[shard[1:] == shard[:-1]]
    assert (neighbours < len(seeds)).all() and neighbours.mean() > len(seeds) * (per_read - 1) / per_read * 0.9


def test_runs_move_by_less_than_the_window():
    """window 1: the runs keep their places, so each shard is read front to back in one piece."""
    for seed in range(10):
        pieces = segments(SPLIT, epoch_order(SPLIT, seed, 1, 4))
        assert sorted(len(piece) for piece in pieces) == sorted(shard.samples for shard in SPLIT.shards)


def test_validation_keeps_shard_order():
    assert np.array_equal(epoch_order(SPLIT, None, 24, 8), np.arange(SPLIT.total))


@pytest.mark.parametrize("world_size", [1, 2])
def test_a_resume_at_any_step_reads_what_an_uninterrupted_epoch_reads(world_size):
    order = epoch_order(SPLIT, 5, 16, 4)
    layout = [Layout(8, 4 // world_size, rank, world_size) for rank in range(world_size)]

    def read(start: int) -> list[list[int]]:
        return [[p for slots in micro_batches(rank, SPLIT.total, 3, start)
                 for p in slot_positions(order, slots.slots[slots.valid]).tolist()] for rank in layout]

    whole = read(0)
    assert sorted(p for rank in whole for p in rank) == list(range(SPLIT.total))
    for start in range(0, SPLIT.total, 8):
        done = start // world_size  # each rank reads 8 / world_size samples of each full global batch
        assert read(start) == [rank[done:] for rank in whole]


def test_neighbour_runs_follow_the_batch_order():
    samples = [(0, 3), (0, 4), (0, 5), (1, 6), (0, 6), (1, 7), (1, 8), (1, 8)]
    assert neighbour_runs(samples) == [(0, range(3, 6)), (1, range(6, 7)), (0, range(6, 7)), (1, range(7, 9)),
                                       (1, range(8, 9))]


DAMAGED = "0000005"  # the damaged sample's key, the fourth in the second train shard of `bad/`


@pytest.fixture(scope="module")
def counted(synth_shards, tmp_path_factory):
    """nginx with an access log serving the synthetic set (`good/`) and a copy with one damaged sample (`bad/`)."""
    with good_and_bad_sets(synth_shards, tmp_path_factory.mktemp("www"), tmp_path_factory.mktemp("nginx"),
                           damaged_key=DAMAGED, access_log=True) as served:
        yield served


def shard_reader(server: Nginx, root: Path, folder: str, where: str) -> ShardReader:
    store = open_store(server.url + f"{folder}/" if where == "http" else str(root / folder))
    return ShardReader(tuple(list_shards(store, "train")), store)


@pytest.mark.parametrize("where", ["disk", "http"])
def test_a_run_read_at_once_is_its_samples_read_one_by_one(counted, where):
    server, root = counted
    reader = shard_reader(server, root, "good", where)
    try:
        for index, shard in enumerate(reader.shards):
            tar = root / "good" / shard.path  # the path itself on disk, relative to the URL over http
            data = tar.read_bytes()
            expected = [data[offset:offset + size] for _, offset, size, _ in index_entries(tar)]
            assert reader.read(index, range(shard.samples)) == expected
            assert [reader.read(index, range(i, i + 1))[0] for i in range(shard.samples)] == expected
            assert reader.read(index, range(1, shard.samples - 1)) == expected[1:-1]
    finally:
        reader.close()


@pytest.mark.parametrize("where", ["disk", "http"])
def test_a_damaged_sample_in_a_run_is_the_one_line_of_reading_it_alone(counted, where):
    server, root = counted
    reader = shard_reader(server, root, "bad", where)
    shard = reader.shards[1]
    damaged = [member.split(".")[0] for _, _, _, member in index_entries(root / "bad" / shard.path)].index(DAMAGED)
    try:
        alone = reader.read(1, range(damaged, damaged + 1))[0]
        run = reader.read(1, range(shard.samples))
    finally:
        reader.close()
    assert isinstance(alone, ShardDataError) and "\n" not in str(alone)
    assert str(alone).startswith(f"shard {reader.store.show(shard.path)} is damaged: sample {DAMAGED}.png has CRC-32")
    assert [type(data) for data in run] == [bytes] * damaged + [ShardDataError] + [bytes] * (len(run) - damaged - 1)
    assert str(run[damaged]) == str(alone)
    cfg = DataConfig(shards=reader.store.where, resolution=16, backend="reference", num_threads=1, samples_per_read=4)
    with pytest.raises(ShardDataError) as error, build_loader(cfg, "train", batch_size=4, seed=1) as loader:
        for _ in loader.epoch(0):
            pass
    assert str(error.value) == str(alone)


def test_runs_take_fewer_requests_and_read_the_same_epoch(counted):
    server, _ = counted
    log = server.run / "access.log"
    epochs, requests = {}, {}
    for per_read in (1, 8):
        cfg = DataConfig(shards=server.url + "good/", resolution=16, backend="reference", num_threads=1,
                         shuffle_buffer=64, samples_per_read=per_read)
        with build_loader(cfg, "train", batch_size=8, seed=4) as loader:
            before = log.read_text().count("GET /good/train/")
            epochs[per_read] = sorted(key for batch in loader.epoch(2)
                                      for key, real in zip(batch.keys, batch.valid.tolist(), strict=True) if real)
            requests[per_read] = log.read_text().count("GET /good/train/") - before
            slots = loader.batches_per_epoch * 8  # the samples and the last batch's padding
    assert epochs[1] == epochs[8]
    assert requests[1] == slots  # a request per sample (seed 4: no two neighbours in a batch by chance)
    # runs of 8 in batches of 8 over 5 shards: a request per run, cut at shard ends and batch edges (11 here)
    assert requests[8] < slots / 2
