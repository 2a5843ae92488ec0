"""Reading the encoded, checked samples of each micro-batch out of tar shards; both loaders consume this.

Neighbouring samples of a shard in a micro-batch (see `sharding`: the training order comes in runs of them) are
read together: one `pread`, or one ranged request, from the first one's 512-byte tar header to the last one's
image bytes; each sample is then checked on its own. Before the bytes go to a
decoder they must be whole (not cut off by a truncated file), the header must be intact (its checksum, and its
size and name agreeing with the index) and the bytes must have the CRC-32 the manifest recorded when the shard
was made. Anything else is a ShardDataError naming the shard, the sample and the fix: a damaged shard ends the
run in one line, never in a decoder's traceback, and never trains silently. When the shard's bytes still match
the manifest (SHA-256) but its index does not describe them (a stale `.idx`), the fix named is
`shards index --repair`, not a remake.

`BatchReading` turns a micro-batch's slots (see `sharding`) into an `EncodedBatch`: keys, checked bytes and the
random numbers of its augmentations. A sample that cannot be read travels as its error, raised when its batch is
due (loaders read ahead). `ReadAhead` does that reading in a thread of its own, a few batches ahead, so that the
training thread never waits on the file system or the checksums (`pread` and `zlib.crc32` release the GIL).
"""

from __future__ import annotations

import queue
import tarfile
import threading
import zlib
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from colorize_dist.data.augment import Augment
from colorize_dist.data.dali_index import dali_index, index_images
from colorize_dist.data.manifest import MANIFEST, Shard, ShardDataError, ShardsUnavailable, verify_hint
from colorize_dist.data.sharding import MicroSlots, SplitSamples, epoch_order, epoch_seed, slot_positions
from colorize_dist.data.store import STARTUP_HINT, LocalStore, Store, StoreUnavailable, redact
from colorize_dist.files import sha256_of

BLOCK = 512  # tar header size


@dataclass(frozen=True)
class ShardSamples:
    """The samples with an image in one shard, from its index: tar key, image member, where its bytes are."""

    shard: Shard
    keys: tuple[str, ...]
    extensions: tuple[str, ...]
    members: tuple[str, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]


def parse_index(shard: Shard, store: Store) -> ShardSamples:
    """`shard`'s index, checked against the manifest (count) and the tar (every sample inside the file)."""
    where, hint = store.show(shard.index_path), verify_hint(store.where)
    try:
        images = index_images(store.read_text(shard.index_path))
    except StoreUnavailable as exc:  # the server, not the index
        raise ShardDataError(f"{exc}; {STARTUP_HINT}") from None
    except (OSError, ValueError, IndexError) as exc:
        raise ShardDataError(f"index {where} is unreadable ({redact(str(exc))}); rewrite it with "
                             f"`colorize-dist shards index {store.where} --repair`") from None
    if len(images) != shard.samples:
        raise ShardDataError(stale_index(shard, store) or f"index {where} lists {len(images)} images but {MANIFEST} "
                             f"says {shard.samples}; {hint}")
    if shard.crc32 is not None and len(shard.crc32) != shard.samples:
        raise ShardDataError(f"{MANIFEST} records {len(shard.crc32)} CRC-32s for the {shard.samples} samples of "
                             f"{store.show(shard.path)}; {hint}")
    size = shard.size if shard.size is not None else store.size(shard.path)
    if images and images[-1][1] + images[-1][2] > (size or 0):
        raise ShardDataError(stale_index(shard, store) or f"shard {store.show(shard.path)} ends before the samples "
                             f"its index lists (truncated?); {hint}")
    members = tuple(member for _, _, _, member in images)
    keys = tuple(map(tar_key, members))
    return ShardSamples(shard, keys, tuple(extension.lower() for extension, _, _, _ in images), members,
                        tuple(offset for _, offset, _, _ in images),
                        tuple(size for _, _, size, _ in images))


def stale_index(shard: Shard, store: Store) -> str | None:
    """The one line for an index that does not describe its shard while the shard's bytes match their SHA-256 in the
    manifest (so the index, not the shard, is wrong); None otherwise. Hashes the shard: for error paths only, and
    only on disk (a remote shard would be downloaded whole)."""
    if not isinstance(store, LocalStore):
        return None
    try:
        if shard.sha256 is None or sha256_of(shard.path) != shard.sha256:
            return None
        if shard.index_path.read_text() == dali_index(shard.path):
            return None
    except (OSError, tarfile.TarError):
        return None
    return (f"index {shard.index_path} does not match {shard.path.name}, whose bytes are those {MANIFEST} records "
            f"(a stale index); rewrite it with `colorize-dist shards index {store.where} --repair`")


def tar_key(member: str) -> str:
    """The WebDataset key of a tar member: its path up to the first dot of the file name."""
    directory, _, filename = member.rpartition("/")
    stem = filename.partition(".")[0]
    return f"{directory}/{stem}" if directory else stem


class ShardReader:
    """Checked reads of the samples of some shards; each index is fetched and parsed on first use."""

    def __init__(self, shards: tuple[Shard, ...], store: Store):
        self.shards, self.store = shards, store
        self._tables: dict[int, ShardSamples] = {}

    def table(self, shard_index: int) -> ShardSamples:
        if shard_index not in self._tables:
            self._tables[shard_index] = parse_index(self.shards[shard_index], self.store)
        return self._tables[shard_index]

    def batch_key(self, shard_index: int, sample_index: int) -> str:
        """`<shard name>/<key in the tar>`, the sample's identity across the set."""
        table = self.table(shard_index)
        return f"{table.shard.path.stem}/{table.keys[sample_index].removeprefix('./')}"

    def check_indexes(self) -> None:
        """Fetch and parse (and so check) every shard's index now: a bad index is refused before the first step."""
        for _ in self.store.map(self.table, range(len(self.shards))):
            pass

    def read(self, shard_index: int, samples: range) -> list[bytes | ShardDataError]:
        """The image bytes of neighbouring samples of one shard, read together (one read from the first one's tar
        header to the last one's end) and each checked (header, length, CRC-32); a sample that fails is its error."""
        table = self.table(shard_index)
        shard = table.shard
        where, hint = self.store.show(shard.path), verify_hint(self.store.where)
        begin = min(table.offsets[i] for i in samples) - BLOCK  # min, max: a stale index may list them out of order
        end = max(table.offsets[i] + table.sizes[i] for i in samples)
        try:
            span = self.store.read(shard.path, begin, end - begin)
        except FileNotFoundError:
            return [ShardDataError(f"shard {where} is missing (it was there when the run started); {hint}")] * len(
                samples)
        except StoreUnavailable as exc:
            raise ShardsUnavailable(str(exc)) from None
        except OSError as exc:
            return [ShardDataError(f"shard {where}: reading sample {table.members[i]} failed "
                                   f"({redact(exc.strerror or str(exc))}); {hint}") for i in samples]
        return [self._checked(table, i, span, begin) for i in samples]

    def _checked(self, table: ShardSamples, sample_index: int, span: bytes, begin: int) -> bytes | ShardDataError:
        """A sample's image bytes out of `span` (the shard's bytes read from `begin` on), or what is wrong with them."""
        shard, size, member = table.shard, table.sizes[sample_index], table.members[sample_index]
        block = span[table.offsets[sample_index] - BLOCK - begin:table.offsets[sample_index] + size - begin]
        problem = (f"is cut off ({len(block) - BLOCK} of {size} bytes; the file is truncated)"
                   if len(block) < BLOCK + size else _header_problem(block[:BLOCK], member, size))
        data = block[BLOCK:]
        if problem is None and shard.crc32 is not None:
            expected, actual = shard.crc32[sample_index], zlib.crc32(data)
            if actual != expected:
                problem = f"has CRC-32 {actual:08x}, {MANIFEST} says {expected:08x} (its bytes changed)"
        if problem is not None:
            return ShardDataError(stale_index(shard, self.store) or f"shard {self.store.show(shard.path)} is "
                                  f"damaged: sample {member} {problem}; {verify_hint(self.store.where)}")
        return data

    def close(self) -> None:
        self.store.close()


def _header_problem(header: bytes, member: str, size: int) -> str | None:
    """What is wrong with the tar header in front of a sample's bytes, if anything."""
    try:
        stored = int(header[148:156].replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        stored = -1
    unsigned = sum(header) - sum(header[148:156]) + 8 * ord(" ")
    if stored != unsigned:
        return "has a damaged tar header (bad checksum)"
    if header[124] & 0x80 == 0:  # octal size (base-256 sizes are for files over 8 GiB)
        try:
            header_size = int(header[124:136].replace(b"\0", b" ").strip() or b"0", 8)
        except ValueError:
            header_size = -1
        if header_size != size:
            return f"has a tar header saying {header_size} bytes where the index says {size}"
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:263] == b"ustar\0" else b""  # POSIX, not GNU
    full = (prefix + b"/" + name if prefix else name).decode("utf-8", "replace")
    if len(member.encode()) < 100 and full != member:  # longer names live in a PAX/GNU header before this one
        return f"is {full!r} in the tar, not what the index says (the index belongs to another tar)"
    return None


@dataclass
class EncodedBatch:
    """One micro-batch as read: what both loaders decode, and what identifies each of its samples."""

    slots: MicroSlots
    positions: np.ndarray  # split position of each sample
    keys: list[str]  # "<shard>/<key>", unique per sample of the set
    shards: list[str]  # the shard each sample is in (to name it when a decoder fails)
    data: list[bytes | None]  # checked image bytes; None where a sample could not be read
    augment: Augment  # the epoch's augmentations
    draws: np.ndarray | None  # (B, DRAWS) random numbers of each sample (see `augment`); None for validation
    error: ShardDataError | None  # the first read or decoding error: raised when this batch is due


class BatchReading:
    """One rank's reads of one split: micro-batch slots → `EncodedBatch`es."""

    def __init__(self, split: SplitSamples, store: Store, *, resolution: int, seed: int | None, window: int,
                 crop_scale: tuple[float, float], flip: bool, samples_per_read: int):
        self.split, self.store, self.samples_per_read = split, store, samples_per_read
        self.resolution, self.seed, self.window, self.crop_scale, self.flip = resolution, seed, window, crop_scale, flip
        self.reader = ShardReader(split.shards, store)
        self.reader.check_indexes()
        self._orders: dict[int, np.ndarray] = {}  # the current and the previous epoch's

    def augment(self, epoch: int) -> Augment:
        seed = None if self.seed is None else epoch_seed(self.seed, epoch)
        return Augment(self.resolution, seed, self.crop_scale, self.flip)

    def order(self, epoch: int) -> np.ndarray:
        """The split positions epoch `epoch` visits, in order (its slots → positions)."""
        if epoch not in self._orders:
            seed = None if self.seed is None else epoch_seed(self.seed, epoch)
            self._orders = {epoch: epoch_order(self.split, seed, self.window, self.samples_per_read),
                            **{key: value for key, value in self._orders.items() if key == epoch - 1}}
        return self._orders[epoch]

    def read(self, slots: MicroSlots) -> EncodedBatch:
        positions = slot_positions(self.order(slots.epoch), slots.slots)
        augment = self.augment(slots.epoch)
        batch = EncodedBatch(slots, positions, [], [], [], augment, augment.draws(slots.slots), None)
        samples = list(zip(*map(np.ndarray.tolist, self.split.locate(positions)), strict=True))
        for shard_index, sample_index in samples:
            batch.keys.append(self.reader.batch_key(shard_index, sample_index))
            batch.shards.append(self.store.show(self.split.shards[shard_index].path))
        for run in self.store.map(self._read, neighbour_runs(samples)):  # in flight together from a remote store
            for data in run:
                batch.data.append(data if isinstance(data, bytes) else None)
                if isinstance(data, ShardDataError):
                    batch.error = batch.error or data
        return batch

    def _read(self, run: tuple[int, range]) -> list[bytes | ShardDataError]:
        try:
            return self.reader.read(*run)
        except ShardDataError as exc:  # the shard's index, or its server stopped answering
            return [exc] * len(run[1])

    def batches_in_flight(self, micro_batch: int) -> int:
        """Micro-batches to read at once: one from disk; over a network, enough for `reads_in_flight` requests (a
        micro-batch is about micro_batch / samples_per_read of them)."""
        if isinstance(self.store, LocalStore):
            return 1
        return max(1, -(-self.store.connections // -(-micro_batch // self.samples_per_read)))

    def close(self) -> None:
        self.reader.close()


def neighbour_runs(samples: list[tuple[int, int]]) -> list[tuple[int, range]]:
    """(shard, sample) pairs cut into runs of neighbours in one shard, in order: (shard, its samples)."""
    runs: list[tuple[int, range]] = []
    for shard_index, sample_index in samples:
        if runs and runs[-1][0] == shard_index and runs[-1][1].stop == sample_index:
            runs[-1] = (shard_index, range(runs[-1][1].start, sample_index + 1))
        else:
            runs.append((shard_index, range(sample_index, sample_index + 1)))
    return runs


Item = TypeVar("Item")
_END = object()


class ReadAhead(Generic[Item]):
    """`load(slots)` for each of `plan`, in order, in a thread of its own, up to `depth` items ahead of `next()`;
    `parallel` loads at once (remote shards: each waits on round trips, not on a core).

    The thread starts at the first `next()` (a DataLoader forks its workers before it asks for work, and a fork
    should not copy a thread in the middle of a read). What `load` raises is raised by the `next()` that would have
    returned its item; `close()` stops the thread within one `load`.
    """

    def __init__(self, load: Callable[[MicroSlots], Item], plan: Iterator[MicroSlots], depth: int, parallel: int = 1):
        self._items: queue.Queue = queue.Queue(maxsize=depth)
        self._parallel = parallel
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(load, plan), name="colorize-read-ahead", daemon=True)

    def _run(self, load: Callable[[MicroSlots], Item], plan: Iterator[MicroSlots]) -> None:
        try:
            with ThreadPoolExecutor(self._parallel, thread_name_prefix="colorize-read-batch") as pool:
                loading: deque[Future] = deque()  # in plan order
                for slots in plan:
                    if self._stop.is_set():
                        return
                    loading.append(pool.submit(load, slots))
                    if len(loading) == self._parallel and not self._put(loading.popleft().result()):
                        return
                while loading:
                    if not self._put(loading.popleft().result()):
                        return
        except BaseException as exc:  # re-raised in the consumer's thread
            self._put(exc)
        else:
            self._put(_END)

    def _put(self, item) -> bool:
        while not self._stop.is_set():
            try:
                self._items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> ReadAhead[Item]:
        return self

    def __next__(self) -> Item:
        if self._thread.ident is None:
            self._thread.start()
        item = self._items.get()
        if item is _END:
            self._items.put(_END)  # every later next() ends too
            raise StopIteration
        if isinstance(item, BaseException):
            raise item
        return item

    def close(self) -> None:
        self._stop.set()
        if self._thread.ident is not None:
            self._thread.join()
