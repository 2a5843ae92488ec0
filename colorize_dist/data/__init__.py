"""The data path: image folders → WebDataset shards → (l, ab) batches on every rank (DALI or reference)."""

from colorize_dist.data.config import DataConfig
from colorize_dist.data.loader import Batch, ColorLoader, build_loader, first_batch
from colorize_dist.data.manifest import ManifestError, MissingShardsError, ShardDataError
from colorize_dist.data.synth import synth_image

__all__ = [
    "Batch", "ColorLoader", "DataConfig", "ManifestError", "MissingShardsError", "ShardDataError", "build_loader",
    "first_batch", "synth_image",
]
