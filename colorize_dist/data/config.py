"""The `data` section of a run's config: where the shards are and how batches are made from them."""

from __future__ import annotations

from dataclasses import dataclass, field

from colorize_dist.config import ConfigError

BACKENDS = ("auto", "dali", "reference")
ASPECT_RATIO_RANGE = (3 / 4, 4 / 3)  # random-resized-crop aspect ratios (width / height), in both loaders


@dataclass
class DataConfig:
    # Directory made by `colorize-dist shards make|synth`, or the URL of one (http(s)://host/path/, or any fsspec
    # URL: s3://, gs://, ...); None: the trainer synthesizes
    shards: str | None = None
    resolution: int = 64  # side of the square (L, ab) crops fed to the model
    backend: str = "auto"  # auto (DALI if installed, else reference) | dali | reference
    num_threads: int = 2  # DALI worker threads, or DataLoader worker processes for the reference loader
    crop_scale: list[float] = field(default_factory=lambda: [0.8, 1.0])  # random-resized-crop area range
    flip: bool = True  # random horizontal flips for training
    hw_decoder_load: float = 0.65  # GPU only: share of JPEGs sent to the hardware decoder, rest to CUDA
    prefetch: int = 2  # batches prepared ahead
    reads_in_flight: int = 64  # remote shards: ranged requests (one per run of neighbours) in flight at once, per rank
    # remote shards: a folder on each node's own disk where every shard a rank reads is downloaded whole, in the
    # background, once per node, and read locally from then on; None: no cache
    cache_dir: str | None = None
    cache_max_gb: float = 100.0  # the cache's bound on the node (GiB); see README "Data on a web server ..."
    shuffle_buffer: int = 1024  # shuffle window: each sample moves by less than this in an epoch; larger mixes more
    # training order in runs of this many neighbouring samples of a shard, shuffled as units within the window: a
    # micro-batch reads each run at once (one ranged request over a network); 1: every sample on its own
    samples_per_read: int = 8

    def validate(self) -> None:
        if self.resolution < 8:
            raise ConfigError(f"data.resolution must be at least 8, got {self.resolution}")
        if self.backend not in BACKENDS:
            raise ConfigError(f"data.backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
        if self.num_threads < 1:
            raise ConfigError(f"data.num_threads must be at least 1, got {self.num_threads}")
        if len(self.crop_scale) != 2 or not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ConfigError(f"data.crop_scale must be [min, max] with 0 < min <= max <= 1, got {self.crop_scale}")
        if not 0.0 <= self.hw_decoder_load <= 1.0:
            raise ConfigError(f"data.hw_decoder_load must be in [0, 1], got {self.hw_decoder_load}")
        if self.prefetch < 1:
            raise ConfigError(f"data.prefetch must be at least 1, got {self.prefetch}")
        if self.reads_in_flight < 1:
            raise ConfigError(f"data.reads_in_flight must be at least 1, got {self.reads_in_flight}")
        if self.cache_max_gb <= 0:
            raise ConfigError(f"data.cache_max_gb must be positive, got {self.cache_max_gb}")
        if self.shuffle_buffer < 1:
            raise ConfigError(f"data.shuffle_buffer must be at least 1, got {self.shuffle_buffer}")
        if self.samples_per_read < 1:
            raise ConfigError(f"data.samples_per_read must be at least 1, got {self.samples_per_read}")
